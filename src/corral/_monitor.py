"""The monitor: the one thread that owns every worker slot of a pool, on a reactor.

Data flow::

    Supervisor methods --call(fn, *args)--> reactor inbox --merged wake byte--+
    spawner thread --batch of started processes--> reactor inbox -------------+
    health / memory threads --results--> reactor inbox -----------------------+
    worker ready() --1 byte--> reactor wake pipe ------------------------------+--> epoll
    worker exits --> pidfd / forkserver sentinel readable (add_reader) -------+      |
    keyed deadlines (Deadline: backoff, kill, dump, ...) and the liveness look -timeout+
                                                                                     v
                                          triggers -> states.check -> actions -> events, logs

It never sleeps a fixed tick: each round blocks until something happens or the next deadline
falls (see ``_slots.Deadline`` for the kinds). Processes are started by the pool's spawner
thread (``_spawner``), so a restart never delays the supervision of other workers.

State (one pool "web" of 4 as an example):
    _slots: {0: WorkerSlot(...), ...}: every slot by index; only through _add/_remove.
    _counts: {WorkerState.RUNNING: 4, ...}: slots per state (kept by _move).
    _steady: 4 when slots 0..3 are all RUNNING and heartbeats are watched, else 0.
    _live_at: the next liveness look (monotonic), inf for none.
    _live: {pid: process}: processes not reaped yet, for signals from other threads.
    _budget: the restart budget's window; _history: the last ExitRecords.
    _stopping / _stop_request / _stop_deadline: the pool's stop, once begun.
    _group: a one_for_all / rest_for_one restart in progress (GroupRestart), or None.
    _rolling, _rolling_current, _rolling_waiters: a rolling restart in progress.
    _ready_waiters: [(n, Reply)] of wait_ready() callers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import random
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from corral import states
from corral._eventlog import event_extra
from corral._health import HealthRunner
from corral._identity import worker_settings
from corral._keeper import keeper
from corral._monitor_exits import ExitPart
from corral._monitor_parts import ControlPart, GroupRestart, WatchPart
from corral._monitor_remote import RemotePart
from corral._monitor_spawns import SLOW_START, SpawnPart
from corral._monitor_standby import StandbyPart
from corral._observe import PoolFacts
from corral._reactor import Reactor
from corral._reply import Reply
from corral._slots import POOL, AfterStop, Deadline, DeadlineKey, SpawnRequest, WorkerSlot
from corral._spawner import START_OVERTIME, Spawner, preload_for_forkserver, stuck_start_hint
from corral._stats import PoolStats
from corral._workerio import WorkerIO
from corral.errors import GaveUp, SupervisorStateError
from corral.events import Event, EventKind, ExitRecord, StopReason
from corral.heartbeat import HeartbeatTable
from corral.policy import BackoffState, BudgetWindow
from corral.process import ProcessLike, own_fd, settle
from corral.spec import PoolSpec
from corral.states import Trigger, WorkerState
from corral.status import WorkerStatus

S = WorkerState
_HISTORY = 32  # exit records kept for GaveUp and status
# A batch of starts (a pool's start, a scale-up) reaches the loop at the latest this long after
# its first start (seconds). Each hand-over in the middle of a fork burst costs the loop a round
# whose pages are copied again by every later fork, and takes the GIL from the forking thread:
# with 5 ms, the loop's share of a start of 128 workers was ~20 ms of CPU, with 50 ms ~6 ms. A
# lone restart is still delivered at once.
_SPAWN_BATCH_TIME = 0.05
# How long the monitor thread, ending, waits for the spawner thread (idle by then) to end.
_SPAWNER_JOIN = 1.0


def _pong(reply: Reply) -> None:
    reply.finish(True)


StartProcess = Callable[[SpawnRequest], ProcessLike]

if TYPE_CHECKING:
    from corral._deathwatch import DeathWatch
    from corral.ray._starter import RayStarter


class Monitor(SpawnPart, ExitPart, RemotePart, StandbyPart, ControlPart, WatchPart):
    """Runs a pool. Created and driven by :class:`corral.Supervisor`; not public.

    Args:
        spec: the pool.
        emit: called with every :class:`Event` (on the monitor thread; it must not block).
        clock: the monotonic clock (a fake in unit tests).
        start_process: ``start_process(request) -> process`` on the spawner thread (a fake in
            unit tests); default: a multiprocessing process running corral's bootstrap.
    """

    def __init__(self, spec: PoolSpec, emit: Callable[[Event], None], *,
                 clock: Callable[[], float] = time.monotonic,
                 start_process: StartProcess | None = None,
                 host: Reactor[Any] | None = None, io: WorkerIO | None = None) -> None:
        self.spec = spec
        self._emit_cb = emit
        self._clock = clock
        self._io = io
        # One logger per pool ("corral.pool.<name>"), so a pool's logs can be tuned alone.
        self.log = logging.getLogger(f"corral.pool.{spec.name}")
        self._ctx = multiprocessing.get_context(spec.start_method)
        if spec.start_method == "forkserver" and start_process is None and spec.command is None:
            preload_for_forkserver(self._ctx, [getattr(spec.target, "__module__", "")])
        # Resolved first: an unknown user or a missing cwd fails before anything exists.
        self._settings = worker_settings(spec)
        self._ray_starter: RayStarter | None = None
        if start_process is None and spec.backend == "ray":
            from corral.ray._starter import RayStarter, attach

            attach()  # connects to (or starts) the Ray cluster: seconds, once per process
            # A RayWorker is process-like (see corral.ray._backend), not a ProcessLike to mypy.
            self._ray_starter = RayStarter(
                spec.name, spec.target, spec.ray_options, spec.ready_when == "beat",
                spec.startup_timeout, spares=spec.standby)
            self._ray_starter.refill()
            start_process = cast(StartProcess, self._ray_starter)
        self._start_process: StartProcess = start_process or self._start_worker
        # The heartbeat table first: it is the one resource that can fail for lack of space,
        # and nothing else exists yet to clean up if it does.
        # With standbys, workers also hold a death lock in their slot: the death watch learns
        # of a death as it begins, a standby is sent in before the pidfd tells.
        self._hb = HeartbeatTable(spec.workers, death_locks=bool(spec.standby)
                                  and spec.backend == "local")
        own_fd(self._hb.fd)
        # Hosted: this pool's loop runs as a guest on a reactor the caller drives (the corral
        # command runs every program's pool, its log pipes and its control socket on one
        # thread); else the monitor has a reactor and a thread of its own.
        self._hosted = host is not None
        try:
            self._reactor: Reactor[Any] = host if host is not None else Reactor(
                f"pool {spec.name!r}", clock=clock)
        except BaseException:
            self._hb.close()
            raise
        # Held wherever a standby may be sent into a place (or let go), on either thread: the
        # death watch's thread sends one itself (see ExitPart._on_death_notice).
        self._hand_lock = threading.RLock()
        self._deathwatch: DeathWatch | None = None
        if self._hb.death_locks:
            from corral._deathwatch import DeathWatch  # only pools with standbys use it

            def on_notice(index: int, pid: int) -> None:  # the monitor's turn
                self._on_death_notice(index, pid)

            notice = self._cb(on_notice)

            def tell(index: int, pid: int) -> None:  # on the watch's thread
                # Sent from here when it can be: on a busy machine, waiting for the monitor
                # thread to be scheduled is the longest part of a hand-over.
                try:
                    if self._on_death_notice(index, pid, watch_thread=True):
                        # Sent: the pidfd brings the rest. Waking the monitor thread now would
                        # only compete for a CPU with the standby that was just told to go.
                        return
                except Exception:  # e.g. state changing under it: the monitor's turn decides
                    self.log.debug("death notice for index %d (pid %d) left to the monitor",
                                   index, pid, exc_info=True)
                with contextlib.suppress(RuntimeError):  # closed: the pool is gone
                    self._reactor.call_soon_threadsafe(notice, index, pid)

            self._deathwatch = DeathWatch(self._hb.fd, spec.name, tell)
            self._hb.on_grow = self._deathwatch.poke
        self._dl = self._reactor.deadline_space(self._cb(self._on_deadline))
        self._wake_cb = self._cb(self._on_wake)
        self._reactor.add_wake_callback(self._wake_cb)
        self._spawner: Spawner[SpawnRequest, ProcessLike] = Spawner(
            f"corral-spawner[{spec.name}]", self._start_process,
            lambda batch: self._reactor.call_soon_threadsafe(self._cb(self._spawned_batch),
                                                             batch),
            lambda: self._stopping, lambda proc: proc.kill_and_reap(), settle=settle,
            batch_time=_SPAWN_BATCH_TIME,
            # A pool's first fork workers come from a single-threaded template.
            start_many=self._start_many if (
                start_process is None and spec.start_method == "fork"
                and spec.command is None) else None)
        # While begin() queues a pool's first starts: they go to the spawner as one request.
        self._collecting: list[SpawnRequest] | None = None
        # A fork restart may be forked on this pool's own loop thread (see _fork_here): not a
        # host's loop (other pools' turns), not a custom start or a command.
        self._fork_here_ok = (start_process is None and spec.start_method == "fork"
                              and spec.command is None and host is None)
        # Starts handed over (to the spawner, or forked by _fork_here) whose results the loop
        # has not taken yet.
        self._starts_out = 0
        # Seconds after which a start still with the spawner is logged (0: never; see
        # SLOW_START): forkserver and spawn starts of a local pool's Python workers.
        self._slow_start = 0.0 if (
            start_process is not None or spec.start_method == "fork" or spec.command is not None
            or clock is not time.monotonic) else min(SLOW_START, spec.startup_timeout or SLOW_START)
        self._slow_warned: SpawnRequest | None = None  # the stuck start logged last
        self._slots: dict[int, WorkerSlot] = {}
        self._abandoned = False  # a start was given up on at the stop's deadline
        self._stop_overtime = False  # the stop's deadline was extended for a start under way
        self._counts: dict[WorkerState, int] = dict.fromkeys(WorkerState, 0)
        # Bumped by every change of what PoolFacts holds; the facts are published at the end
        # of the round (observed() serves them to other threads without a round trip).
        self._changes = 0
        self._facts: PoolFacts | None = None
        self._published = -1
        self._dense = True  # the indexes are 0..len(_slots)-1 (the liveness fast path)
        self._hbt = spec.heartbeat_timeout or 0.0
        self._steady = 0
        self._scaling_down = False  # some slot is on its way out (AfterStop.REMOVE)
        self._live_at = math.inf
        self._live_lock = threading.Lock()
        self._live: dict[int, ProcessLike] = {}
        self._budget = BudgetWindow(spec.budget)
        self.stats = PoolStats()  # for metrics; read from other threads through snapshot()
        self.stats.budget_remaining = spec.budget.max_restarts
        self._history: deque[ExitRecord] = deque(maxlen=_HISTORY)
        self._rng = random.Random()
        self._stopping = False
        self._stop_request: float | None = None  # set by request_stop() before any signal
        self._stop_deadline = 0.0
        self._stop_waiters: list[Reply] = []
        self._group: GroupRestart | None = None
        self._rolling: deque[int] = deque()
        self._rolling_current: int | None = None
        self._rolling_old: int | None = None  # the pid the rolling restart is replacing
        self._rolling_waiters: list[Reply] = []
        self._ready_waiters: list[tuple[int | None, Reply]] = []
        self._needs_ready_scan = spec.ready_when != "started"
        self._health = HealthRunner(spec.name, lambda: len(self._slots) + 1)
        self._memory_pending = False
        self._no_thread_logged = False  # a check could not run for want of a thread
        self.gave_up: GaveUp | None = None
        self.finished = threading.Event()
        self._standby_init()
        self._remote_init()
        if self._remote:
            self._hbt = 0.0  # no shared table: probes decide (see _monitor_remote)
        self._hb_path = self._hb.path
        self._wake_path = f"/proc/{os.getpid()}/fd/{self._reactor.wake_fd}"
        self._snapshot: tuple[WorkerStatus, ...] = ()
        self._thread = threading.Thread(target=self._run, name=f"corral-monitor[{spec.name}]",
                                        daemon=True)
        # Under fork the child shares our mapping of the table and keeps the wakeup pipe's
        # write end: nothing to open or map at each start.
        self._fork_extras: dict[str, Any] = {}
        if spec.start_method == "fork":
            self._fork_extras = dict(forked=True, table=self._hb,
                                     wake_fd=self._reactor.wake_fd)

    # ----------------------------------------------------------------- called from other threads

    def start(self, initial: list[tuple[str, tuple[Any, ...]]]) -> None:
        """Start the spawner and monitor threads with one slot per ``(name, args)`` (hosted:
        the host's thread begins the pool)."""
        if self._hosted:
            self._reactor.call_soon_threadsafe(self._cb(self.begin), initial)
            return
        self.begin(initial)
        self._thread.start()

    def begin(self, initial: list[tuple[str, tuple[Any, ...]]]) -> None:
        """The slots, the spawner thread and the first starts, without the monitor thread (unit
        tests then drive the loop themselves with :meth:`step`).

        The first starts are queued here, on the caller's thread, before the monitor thread
        exists: the spawner forks while the monitor thread is still being started.
        """
        for index, (name, args) in enumerate(initial):
            self._add(WorkerSlot(index, name, args, BackoffState(self.spec.backoff)))
        now = self._clock()
        self._collecting = []
        try:
            for w in list(self._slots.values()):
                self._spawn(w, now)
        finally:
            first, self._collecting = self._collecting, None
        self._starts_out += len(first)
        self._spawner.request_batch(first)
        if not first:  # nothing to start (no workers): the keeper's own start may begin
            keeper.open_gate()
        self._replenish(now)  # standbys after the workers
        # Queued before the thread exists: it forks the first worker as soon as it runs.
        self._spawner.start()

    def step(self, max_wait: float) -> None:
        """One round of the loop on the calling thread, waiting at most ``max_wait`` real
        seconds (unit tests, with a fake clock)."""
        self._round(max_wait)

    def discard(self) -> None:
        """Undo a monitor whose start() did not complete: whatever the spawner started is
        killed, and every resource is released."""
        self._stopping = True  # queued starts that have not begun are skipped
        self._spawner.close(timeout=30)
        for callback, args in self._reactor.drain_inbox():
            if callback == self._spawned_batch:
                for _, result in args[0]:
                    if not isinstance(result, BaseException):
                        result.kill_and_reap()
        self._close()

    def call(self, fn: Callable[..., None], *args: Any, wait: bool = True,
             timeout: float | None = None) -> Any:
        """Run ``fn(reply, *args)`` on the monitor thread; return what it answers.

        Raises:
            RuntimeError: the pool has stopped (status and stop are answered at once).
            TimeoutError: no answer within ``timeout``.
        """
        reply = self.submit(fn, *args)
        return reply.wait(timeout, getattr(fn, "__name__", "the command")) if wait else None

    def submit(self, fn: Callable[..., None], *args: Any, reply: Reply | None = None) -> Reply:
        """Queue ``fn(reply, *args)`` for the monitor thread; ``reply`` (default: a new one)
        is finished with the answer (an asyncio caller passes one that wakes its loop)."""
        reply = Reply() if reply is None else reply
        try:
            self._reactor.call_soon_threadsafe(self._cb(self._run_command), reply, fn, args)
        except RuntimeError:
            self._answer_late(reply, fn)
        return reply

    def request_stop(self, grace: float, sig: int) -> None:
        """Begin stopping the pool from the calling thread (any thread).

        The stop signal reaches every live worker's group before this returns, even if the
        process exits right after (Duck's ``App.stop()`` calls ``os._exit`` next). The monitor
        is told first, so an exit this signal causes is never taken for a crash.
        """
        self._stop_request = grace
        with self._live_lock:
            for proc in self._live.values():
                if sig == signal.SIGKILL:
                    proc.send_group(sig)
                else:
                    proc.send_stop(sig)
        self.submit(self.do_stop, grace)

    def join(self, timeout: float | None = None) -> None:
        if self._hosted:
            self.finished.wait(timeout)
        else:
            self._thread.join(timeout)

    def history(self) -> tuple[ExitRecord, ...]:
        return tuple(self._history)

    def not_ready_error(self, n: int | None) -> BaseException:
        """What wait_ready() raises once the pool has stopped before enough workers were ready."""
        if self.gave_up is not None:
            return self.gave_up
        return SupervisorStateError(
            f"pool {self.spec.name!r} stopped before {'all' if n is None else n} worker(s) "
            "were ready")

    def ping(self, timeout: float | None) -> bool:
        """True if the monitor thread answers within ``timeout`` seconds: it is not wedged
        (an idle loop blocks in epoll, so the time of its last round says nothing)."""
        if self.finished.is_set():
            return False
        try:
            return bool(self.call(_pong, timeout=timeout))
        except (TimeoutError, RuntimeError):
            return False

    # --------------------------------------------------------------------------- monitor loop

    def _run(self) -> None:
        try:
            while not self.finished.is_set():
                self._round()
        except BaseException:
            try:
                # A raising log handler must not keep us from cleaning up.
                self.log.critical("pool %r: the monitor thread failed; stopping every worker",
                                  self.spec.name, exc_info=True)
            except Exception:
                pass
            finally:
                self._emergency_kill()
            raise
        finally:
            # Joined (it is idle by now): stop() returns with none of the pool's threads left.
            # Not when a start was given up on: that thread is stuck in it.
            self._spawner.close(timeout=0.0 if self._abandoned else _SPAWNER_JOIN)

    def _round(self, max_wait: float | None = None) -> None:
        self._round_body(max_wait)
        if self._changes != self._published:
            self._publish_facts()

    def _round_body(self, max_wait: float | None) -> None:
        reactor = self._reactor
        live_at = self._live_at
        timeout = reactor.timeout(live_at)
        if max_wait is not None:
            timeout = max_wait if timeout is None else min(timeout, max_wait)
        batch = reactor.get_events(timeout)
        if not batch and self._stop_request is None:
            # The idle round of a pool with heartbeats (a liveness look every ~second): kept
            # lean, since on a VM the wake-up itself is most of its cost.
            now = self._clock()
            if live_at <= now:
                n = self._steady
                oldest = self._hb.oldest_beat(n) if n else 0.0
                if oldest > 0 and oldest + self._hbt > now:
                    # Every worker RUNNING and beating: the next look is one timeout after the
                    # oldest beat, found in C.
                    self._live_at = oldest + self._hbt
                else:
                    self._live_at = math.inf
                    self._check_liveness(now)
            reactor.run_due(now)
            if self._stopping:
                self._maybe_finish()
            return
        if self._stop_request is not None and not self._stopping:
            # Before any exit of this round: a worker our stop signal ended is no crash.
            self._begin_stop(self._stop_request, StopReason.SHUTDOWN, self._clock())
        reactor.process_events(batch)
        now = self._clock()
        if self._live_at <= now:
            self._live_at = math.inf
            self._check_liveness(now)
        reactor.run_due(now)
        # Slots reach a final state only through an exit or a command (a deadline at most
        # starts a stop), so only such rounds look for the end.
        self._maybe_finish()

    def _run_command(self, reply: Reply, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        if self.finished.is_set():  # hosted: the host's loop runs on after this pool ended
            self._answer_late(reply, fn)
            return
        try:
            fn(reply, *args)
        except Exception as exc:
            reply.finish(error=exc)

    def _cb(self, fn: Callable[..., None]) -> Callable[..., None]:
        """``fn`` as a callback of the reactor: as is when the monitor runs its own rounds;
        hosted, wrapped to do what a round does around it (see :meth:`_guarded`)."""
        if not self._hosted:
            return fn

        def guarded(*args: Any) -> None:
            self._guarded(fn, args)

        return guarded

    def _guarded(self, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        """Hosted: one callback, with what ``_round`` does around a batch: a stop requested by
        another thread begins first, the end of the pool is looked for after, and a failure
        of this pool's loop stops this pool, never the host's loop."""
        if self.finished.is_set() and fn != self._spawned_batch and fn != self._run_command:
            return
        try:
            if self._stop_request is not None and not self._stopping:
                self._begin_stop(self._stop_request, StopReason.SHUTDOWN, self._clock())
            fn(*args)
            self._live_changed()
            if not self.finished.is_set():
                self._maybe_finish()
            if self._changes != self._published:
                self._publish_facts()
        except Exception:
            try:
                self.log.critical("pool %r: its loop failed; stopping every worker",
                                  self.spec.name, exc_info=True)
            except Exception:
                pass
            finally:
                self._emergency_kill()

    def _live_changed(self) -> None:
        """Hosted: the liveness look is a keyed deadline (no round of our own checks it)."""
        if self._hosted:
            if self._live_at < math.inf:
                self._dl.set((POOL, Deadline.LIVENESS), self._live_at)
            else:
                self._dl.cancel((POOL, Deadline.LIVENESS))

    # ------------------------------------------ from the worker IO, on the loop thread

    def _slot_of(self, index: int, pid: int) -> WorkerSlot | None:
        w = self._slots.get(index)
        return w if w is not None and w.proc is not None and w.proc.pid == pid else None

    def mark_ready(self, index: int, pid: int) -> None:
        """Worker ``index`` (process ``pid``) is ready: sd_notify READY=1, a probe passed."""
        w = self._slot_of(index, pid)
        if w is not None and w.state is S.STARTING:
            now = self._clock()
            self._hb.mark(index, now, ready=True)
            self._become_ready(w)
            self._live_changed()

    def mark_beat(self, index: int, pid: int) -> None:
        """Worker ``index`` showed life (sd_notify WATCHDOG=1)."""
        if self._slot_of(index, pid) is not None:
            self._hb.mark(index, self._clock())

    def mark_status(self, index: int, pid: int, text: str) -> None:
        """Worker ``index`` published a status text (sd_notify STATUS=...)."""
        if self._slot_of(index, pid) is not None:
            self._hb.set_status_text(index, text)

    def _on_wake(self) -> None:
        # A worker's ready() writes a byte to the wake pipe.
        if self._needs_ready_scan:
            self._scan_ready(self._clock())

    # ------------------------------------------------------------------------------ transitions

    def _move(self, w: WorkerSlot, trigger: Trigger, new: WorkerState) -> None:
        states.check(w.state, trigger, new, w.who)
        self._counts[w.state] -= 1
        self._counts[new] += 1
        w.state = new
        self._changes += 1
        self._note_steady()

    def _add(self, w: WorkerSlot) -> None:
        self._slots[w.index] = w
        self._counts[w.state] += 1
        self._changes += 1
        self._dense = max(self._slots) == len(self._slots) - 1
        self._note_steady()

    def _remove(self, w: WorkerSlot) -> None:
        del self._slots[w.index]
        self._counts[w.state] -= 1
        self._changes += 1
        self._dense = not self._slots or max(self._slots) == len(self._slots) - 1
        if self._group is not None:
            self._group.members.discard(w.index)
            self._group.down.discard(w.index)
        self._note_scaling()
        self._note_steady()

    def _note_steady(self) -> None:
        """``_steady``: n when heartbeats are watched and slots 0..n-1 are all RUNNING (then
        one C-level min over their beats decides the next liveness look), else 0."""
        n = len(self._slots)
        self._steady = (n if self._hbt and self._dense and self._counts[S.RUNNING] == n
                        else 0)

    def _note_scaling(self) -> None:
        self._scaling_down = any(w.after_stop is AfterStop.REMOVE for w in self._slots.values())

    def _maybe_finish(self) -> None:
        counts = self._counts
        final = counts[S.EXITED] + counts[S.STOPPED]
        if not self._stopping:
            # Hosted (the corral command): a program whose workers are all stopped or exited
            # stays, to be started again; it ends only when stopped.
            if (self._slots and final == len(self._slots) and not self._rolling_waiters
                    and not self._hosted):
                # Every worker finished and none will be restarted: the pool is done.
                self.log.info("pool %r: every worker has finished", self.spec.name)
                self._begin_stop(0.0, StopReason.SHUTDOWN, self._clock())
            else:
                return
        if final < len(self._slots) or self._standbys:
            return
        self._publish()
        self._health.shutdown()
        self._close()
        self.finished.set()
        event = self._emit(EventKind.STOPPED, None,
                           message="gave up" if self.gave_up else "stopped")
        self._answer_waiters()
        self.log.info("pool %r stopped", self.spec.name,
                      extra=event_extra(self.log, logging.INFO, event))

    def _close(self) -> None:
        """Release the pool's fds: its reactor's (hosted: its part of the host's), and the
        heartbeat table."""
        keeper.open_gate()  # a pool ended before its first starts came back: not left gated
        if self._io is not None:
            self._io.close()
        if self._remote:
            from corral.ray._starter import detach

            if self._ray_starter is not None:
                self._ray_starter.close()
            detach()
        if self._hosted:
            self._dl.clear()
            self._reactor.remove_wake_callback(self._wake_cb)
            with self._live_lock:
                for proc in self._live.values():
                    self._reactor.remove_reader(proc.waitable())
        else:
            self._reactor.close()
        if self._deathwatch is not None:
            self._deathwatch.close()
        self._hb.close()

    def _emergency_kill(self) -> None:
        for sb in list(self._standbys.values()):
            if sb.proc is not None:
                try:
                    sb.proc.kill_and_reap()
                except Exception:
                    pass
        for w in self._slots.values():
            if w.proc is not None:
                try:
                    w.proc.kill_and_reap()
                except Exception:
                    pass
        try:
            self._close()
        except Exception:
            pass
        self.finished.set()
        self._answer_waiters()

    # ------------------------------------------------------------------------------ deadlines

    def _on_deadline(self, key: DeadlineKey, now: float) -> None:
        owner, kind = key
        if owner == POOL:
            if kind is Deadline.STOP:
                for straggler in self._slots.values():
                    if straggler.state is S.STOPPING:
                        self._kill(straggler)
                pending = [s for s in self._slots.values() if s.state is S.PENDING]
                if pending and not self._stop_overtime:
                    # A start still under way (a spawn takes a few hundred ms): its process is
                    # stopped as it arrives. Only one that takes longer still is given up on.
                    self._stop_overtime = True
                    self._dl.set((POOL, Deadline.STOP), now + START_OVERTIME)
                else:
                    for late in pending:
                        self._abandon_start(late)
                self._kill_standbys()
            elif kind is Deadline.MEMORY:
                self._measure_memory(now)
            elif kind is Deadline.GROUP:
                self._group_maybe_restart(now)
            elif kind is Deadline.LIVENESS:
                self._live_at = math.inf
                self._check_liveness(now)
            elif kind is Deadline.STANDBY:
                self._replenish(now)
            elif kind is Deadline.PROBE:
                self._probe_round(now)
            return
        w = self._slots.get(owner)
        if w is None:
            return
        if kind is Deadline.BACKOFF and w.state is S.BACKOFF:
            self._move(w, Trigger.BACKOFF_OVER, S.PENDING)
            self._spawn(w, now)
        elif kind is Deadline.KILL and w.state is S.STOPPING:
            self._move(w, Trigger.KILL, S.STOPPING)
            self._kill(w)
        elif kind is Deadline.DUMP and w.state is S.STOPPING:
            self._collect_dump(w, now)
        elif kind is Deadline.HEALTH and w.state is S.RUNNING:
            self._run_health_check(w, now)
        elif kind is Deadline.HEALTH_TIMEOUT and w.state is S.RUNNING:
            self._health_failed(w, f"health check still running after "
                                   f"{self.spec.health_check_timeout:g}s", now)
        elif kind is Deadline.START and w.state is S.PENDING:
            self._start_slow(w, now)
        elif kind is Deadline.AGE and w.state in (S.STARTING, S.RUNNING):
            assert w.proc is not None
            self._stop_worker(w, StopReason.RECYCLED_AGE, AfterStop.RESTART, now,
                              detail=f"age {now - w.proc.started:.1f}s > max_age "
                                     f"{self.spec.max_age:g}s")

    def _abandon_start(self, w: WorkerSlot) -> None:
        """``w``'s start is still with the spawner thread :data:`START_OVERTIME` past the
        stop's deadline (a forkserver that is stopped or stuck never answers): the stop does not
        wait for it. A process that comes later is killed on arrival (a new generation, or the
        loop closed)."""
        w.generation += 1
        self._abandoned = True
        self._move(w, Trigger.STOP, S.STOPPED)
        self.log.warning("worker %r (index %d): its start had not returned %.0f s after the "
                         "stop's deadline (%s); not waiting for it, a process that still comes "
                         "is killed", w.name, w.index, START_OVERTIME,
                         stuck_start_hint(self.spec.start_method))

    # -------------------------------------------------------------------------------- outputs

    def _emit(self, kind: EventKind, w: WorkerSlot | None, *, exit: ExitRecord | None = None,
              delay: float | None = None, message: str = "") -> Event:
        pid = w.proc.pid if w is not None and w.proc is not None else (
            exit.pid if exit else None)
        event = Event(kind, self.spec.name, w.index if w else None, w.name if w else None,
                      pid, time.time(), exit, delay, message)
        self._emit_cb(event)
        return event
