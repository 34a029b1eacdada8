"""Hot standbys: processes booted ahead, holding no worker index, that take a worker's place at
once (``PoolSpec(standby=K)``). A mixin of :class:`corral._monitor.Monitor`.

A standby runs :func:`corral._bootstrap.run_standby`: corral's bootstrap, the target's module,
the warm-up hook; then it says hello and blocks on its pipe. When the monitor would start a
process for a worker (a restart after the policy's delay, recycling, a rolling restart, a
scale-up), :meth:`StandbyPart._give_place` sends it the worker's index, name and arguments
instead; it takes the slot (heartbeats, title, stdio) and runs the target. A new standby is then
started in the background. A standby that dies is replaced with a backoff of its own and is
never charged to the pool's restart budget.
"""

from __future__ import annotations

import enum
import itertools
import logging
import pickle
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from corral._bootstrap import Handover
from corral._command import Launch
from corral._slots import POOL, Deadline, DeadlineKey, SpawnRequest, WorkerSlot
from corral.events import Event, EventKind, ExitRecord, StopReason
from corral.policy import BackoffState
from corral.process import ProcessLike
from corral.states import WorkerState
from corral.status import WorkerStatus

if TYPE_CHECKING:
    from corral._reactor import DeadlineSpace, Reactor
    from corral.heartbeat import HeartbeatTable
    from corral.spec import PoolSpec

    class _Core:
        spec: PoolSpec
        log: logging.Logger
        _reactor: Reactor[Any]
        _hb: HeartbeatTable
        _clock: Callable[[], float]
        _stopping: bool
        _emit_cb: Callable[[Event], None]
        _live: dict[int, ProcessLike]
        _hand_lock: threading.RLock
        _hb_path: str
        _wake_path: str
        _dl: DeadlineSpace[DeadlineKey]

        def _cb(self, fn: Callable[..., None]) -> Callable[..., None]: ...
        def _request_standby(self, sb: Standby) -> None: ...
        def _spawned(self, req: Any, result: ProcessLike | BaseException) -> None: ...
else:
    _Core = object

__all__ = ["Standby", "StandbyPart", "StandbyState"]

_HOLD = 0.02  # seconds between a handover and the start of the next standby


class StandbyState(enum.Enum):
    SPAWNING = "spawning"  # queued for the spawner thread
    BOOTING = "booting"  # its process runs the bootstrap and the warm-up
    READY = "ready"  # waiting for a worker's place
    HANDED = "handed"  # told to take a place; the restart that gives it follows at once
    LEAVING = "leaving"  # told to go (the pool stops, or it failed its warm-up)


@dataclass(eq=False)
class Standby:
    """One hot standby. Examples: id 3, state READY, proc pid 5151, conn its pipe."""

    id: int
    state: StandbyState = StandbyState.SPAWNING
    proc: ProcessLike | None = None
    conn: Connection | None = None
    pending_conn: Connection | None = None  # set by the spawner thread with the process
    warm_up_error: str | None = None

    @property
    def name(self) -> str:
        return f"standby-{self.id}"


class StandbyPart(_Core):
    """The standbys of a pool (on the monitor thread)."""

    def _standby_init(self) -> None:
        self._standbys: dict[int, Standby] = {}
        self._standby_ids = itertools.count(1)
        self._standby_backoff = BackoffState(self.spec.backoff)
        self._standby_not_before = 0.0

    # -------------------------------------------------------------------------- keeping K

    def _replenish(self, now: float) -> None:
        """Start standbys until there are ``spec.standby`` of them (none once stopping)."""
        if self._stopping or not self.spec.standby or self.spec.backend != "local":
            return
        if now < self._standby_not_before:
            self._dl_standby(self._standby_not_before)
            return
        while len(self._standbys) < self.spec.standby:
            sb = Standby(next(self._standby_ids))
            self._standbys[sb.id] = sb
            self._request_standby(sb)

    def _dl_standby(self, when: float) -> None:
        self._dl.set((POOL, Deadline.STANDBY), when)

    def _standby_spawned(self, sb: Standby, result: ProcessLike | BaseException,
                         conn: Connection | None) -> None:
        now = self._clock()
        if isinstance(result, BaseException) or self._stopping or sb.id not in self._standbys:
            if not isinstance(result, BaseException):
                result.kill_and_reap()
            if conn is not None:
                conn.close()
            self._standbys.pop(sb.id, None)
            if isinstance(result, BaseException) and not self._stopping:
                self.log.warning("pool %r: could not start a standby: %s: %s", self.spec.name,
                                 type(result).__name__, result)
                self._standby_failed(now, 0.0)
            return
        assert conn is not None
        sb.proc, sb.conn, sb.state = result, conn, StandbyState.BOOTING
        self._live[result.pid] = result
        self._reactor.add_reader(result.waitable(),
                                 self._cb(lambda: self._on_standby_exit(sb)), priority=1)
        self._reactor.add_reader(conn.fileno(), self._cb(lambda: self._on_standby_message(sb)))
        self._emit_standby(EventKind.SPAWNED, sb)

    def _on_standby_message(self, sb: Standby) -> None:
        conn = sb.conn
        if conn is None:
            return
        try:
            if not conn.poll():
                return
            msg = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError, pickle.UnpicklingError):
            self._reactor.remove_reader(conn.fileno())
            return  # it is going: its exit says how
        if msg[0] == "h" and sb.state is StandbyState.BOOTING:
            sb.state = StandbyState.READY
            self._standby_backoff.streak = 0
            self.log.debug("pool %r: %s (pid %s) is ready", self.spec.name, sb.name,
                           sb.proc.pid if sb.proc else None)
            self._emit_standby(EventKind.READY, sb)
        elif msg[0] == "i":
            sb.warm_up_error = str(msg[1])
            sb.state = StandbyState.LEAVING

    def _on_standby_exit(self, sb: Standby) -> None:
        proc = sb.proc
        if proc is None:
            return
        proc.kill_group_leftovers()
        self._live.pop(proc.pid, None)
        status = proc.reap()
        if status is None:
            self._live[proc.pid] = proc
            return
        self._reactor.remove_reader(proc.waitable())
        with self._hand_lock:  # not sent into a place from here on
            conn, sb.conn = sb.conn, None
        if conn is not None:
            self._reactor.remove_reader(conn.fileno())
            conn.close()
        proc.close()
        self._standbys.pop(sb.id, None)
        now = self._clock()
        uptime = now - proc.started
        record = ExitRecord(-sb.id, sb.name, proc.pid, status,
                            StopReason.SHUTDOWN if self._stopping else (
                                StopReason.KILLED if status.signal else StopReason.EXITED),
                            time.time(), uptime, sb.warm_up_error)
        self._emit_standby(EventKind.EXITED, sb, exit=record)
        if self._stopping:
            self.log.info("pool %r: %s (pid %s) stopped", self.spec.name, sb.name, proc.pid)
            return
        if sb.warm_up_error is not None:
            self.log.error("pool %r: %s (pid %s) failed its warm-up (standby_init); workers "
                           "are started cold until a standby boots:\n%s", self.spec.name,
                           sb.name, proc.pid, sb.warm_up_error.rstrip())
        else:
            self.log.warning("pool %r: %s (pid %s) ended while waiting: %s", self.spec.name,
                             sb.name, proc.pid, record.describe())
        self._standby_failed(now, uptime)

    def _standby_failed(self, now: float, uptime: float) -> None:
        """A standby died or could not start: the next one waits its own backoff (never the
        pool's budget)."""
        delay = self._standby_backoff.on_death(uptime)
        self._standby_not_before = now + delay
        self._replenish(now)

    # ----------------------------------------------------------------------------- handover

    def _take_standby(self) -> Standby | None:
        for sb in self._standbys.values():
            if sb.state is StandbyState.READY and sb.conn is not None and sb.proc is not None:
                return sb
        return None

    def _give_place(self, w: WorkerSlot, stdio: tuple[str | None, str | None] | None,
                    launch: Launch | None) -> bool:
        """Give worker ``w``'s place to a ready standby; False if none can take it (then
        the caller starts a process as usual). On the restart path: kept lean, the message
        goes out first and the bookkeeping follows."""
        sb = self._send_handover(w, stdio)
        if sb is None:
            return False
        self._finish_handover(w, sb, launch)
        return True

    def _send_handover(self, w: WorkerSlot, stdio: tuple[str | None, str | None] | None,
                       ) -> Standby | None:
        """Tell a ready standby to become worker ``w`` (the message only); None if none can."""
        with self._hand_lock:
            return self._send_handover_locked(w, stdio)

    def _send_handover_locked(self, w: WorkerSlot,
                              stdio: tuple[str | None, str | None] | None) -> Standby | None:
        sb = self._take_standby()
        if sb is None:
            return None
        try:
            data = pickle.dumps(Handover(w.index, w.name, w.args, self._hb_path,
                                         self._wake_path, self.spec.ready_when == "beat",
                                         stdio), pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # arguments a fork child could inherit, but not be sent
            self.log.debug("%s: its arguments cannot be sent to a standby (%s); starting it "
                           "cold", w.who, exc)
            return None
        conn = sb.conn
        assert conn is not None
        try:
            conn.send_bytes(data)
        except OSError:
            return None  # it died just now: its exit is handled next
        sb.state = StandbyState.HANDED
        return sb

    def _finish_handover(self, w: WorkerSlot, sb: Standby, launch: Launch | None) -> None:
        """The bookkeeping of a handover sent: the standby is worker ``w``'s process now."""
        conn, proc = sb.conn, sb.proc
        assert conn is not None and proc is not None
        self._reactor.remove_reader(conn.fileno())
        conn.close()
        sb.conn = None
        del self._standbys[sb.id]
        # As a worker it starts now: its uptime, max_age and the backoff's reading of an early
        # death count from the handover, not from the standby's own start.
        proc.started, proc.started_wall = time.monotonic(), time.time()
        if self.log.isEnabledFor(logging.INFO):
            self.log.info("%s (pid %s) takes the place of worker %r (index %d)", sb.name,
                          proc.pid, w.name, w.index)
        self._spawned(SpawnRequest(w.index, w.generation, None, w.args, launch), proc)
        # Its successor starts a moment later: a process start (a fork copies page tables
        # holding the GIL; the child's boot takes a CPU) would compete with the worker that
        # has just taken over, the one the standby is there to speed up.
        self._standby_not_before = max(self._standby_not_before, self._clock() + _HOLD)
        self._dl_standby(self._standby_not_before)

    def _withdraw_handover(self, sb: Standby) -> None:
        """A handover sent that no restart took (cannot happen while the exit path's checks
        match the policy's): the standby may already run the target; it goes."""
        self.log.error("standby %s (pid %s) was told to take a place no restart gave it; "
                       "killing it", sb.name, sb.proc.pid if sb.proc else None)
        self._let_go(sb)
        if sb.proc is not None:
            sb.proc.send_group(signal.SIGKILL)

    def _let_go(self, sb: Standby) -> None:
        """``sb`` is leaving: its pipe is closed (a waiting standby then exits at once)."""
        with self._hand_lock:
            sb.state = StandbyState.LEAVING
            conn, sb.conn = sb.conn, None
        if conn is not None:
            self._reactor.remove_reader(conn.fileno())
            conn.close()

    # -------------------------------------------------------------------------- stopping

    def _stop_standbys(self) -> None:
        """The pool stops: every standby goes (its pipe closes: it exits at once); the pool's
        stop deadline kills any that does not."""
        for sb in list(self._standbys.values()):
            self._let_go(sb)
            if sb.proc is not None:
                sb.proc.send_stop(self.spec.stop_signal)
            else:
                self._standbys.pop(sb.id, None)  # not started yet: the spawner skips it

    def _kill_standbys(self) -> None:
        for sb in self._standbys.values():
            if sb.proc is not None:
                sb.proc.send_group(signal.SIGKILL)

    # --------------------------------------------------------------------------- outputs

    def _standby_statuses(self, now: float) -> list[WorkerStatus]:
        out = []
        for sb in sorted(self._standbys.values(), key=lambda s: s.id):
            proc = sb.proc
            state = (WorkerState.RUNNING if sb.state is StandbyState.READY
                     else WorkerState.PENDING if proc is None
                     else WorkerState.STOPPING if sb.state is StandbyState.LEAVING
                     else WorkerState.STARTING)
            out.append(WorkerStatus(
                index=-sb.id, name=f"{self.spec.name}-{sb.name}",
                pid=proc.pid if proc else None, state=state,
                ready=sb.state is StandbyState.READY, restarts=0,
                started_at=proc.started_wall if proc else None,
                uptime=0.0 if proc is None else now - proc.started, heartbeat_age=None,
                status_text="standby", last_exit=None, next_restart_in=None, standby=True))
        return out

    def _emit_standby(self, kind: EventKind, sb: Standby, exit: ExitRecord | None = None,
                      ) -> None:
        pid = sb.proc.pid if sb.proc is not None else None
        self._emit_cb(Event(kind, self.spec.name, None, f"{self.spec.name}-{sb.name}", pid,
                            time.time(), exit, None, "standby", standby=True))
