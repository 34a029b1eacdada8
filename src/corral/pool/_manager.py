"""The pool manager: one thread, on a :class:`~corral._reactor.Reactor`, owns every worker and
task record of a :class:`corral.ProcessPool`.

Data flow::

    submit() --pickle (caller's thread)--> pending deque ---------------> reactor.wake() ---+
    future.cancel() of a running task, shutdown(), terminate() -> call_soon_threadsafe ----+
    the spawner thread (corral._spawner): started processes -> call_soon_threadsafe -------+
    worker replies (hello, result, error) --> its own socket, read without blocking -------+
    worker exits --> pidfd / forkserver sentinel readable (after the replies of a batch) --+
    the next deadline (table below) --> the timeout of the reactor's wait ----------------+
                                                                                          v
                                                  PoolManager, on the manager thread

Each round blocks in the reactor until a worker replies or exits, a command arrives, or the
earliest deadline falls; there is no polling tick. Each worker has its own socket and runs one
task at a time, so a worker that dies takes exactly one task with it. A worker's socket is
registered with a lower priority than its exit, so a reply written just before it died is read
first, in the same batch. Processes are started on the spawner thread (tens of ms under
forkserver or spawn), so a restart never delays other workers' results.

A spare worker (``spare_workers``) is started ahead and kept idle; when a worker dies or leaves,
the spare takes its place in the same round, so the next task waits for no process start, and a
new spare is started once that task is done (or :data:`SPARE_HOLD` later).

Deadlines (keys of the reactor's heap; a key set again replaces its time):

=================================  ===========================================================
key                                when it falls
=================================  ===========================================================
``PoolDeadline.BACKOFF``           the backoff after failed starts is over: start workers
``PoolDeadline.SPARE_HOLD``        a promoted spare's first task had its moment: start spares
``PoolDeadline.STOP``              a closing pool's stop_timeout: SIGKILL every straggler
``PoolDeadline.KEPT``              stop_timeout + 1 s after shutdown(cancel_futures=True): the
                                   tasks kept for workers still starting are cancelled if no
                                   worker exists to run them (every start stuck)
``(id, WorkerDeadline.TIMER)``     the task's timeout or the next memory check (lazy: a timer
                                   that fires early re-arms itself, one entry per worker)
``(id, WorkerDeadline.DUMP)``      look at the stack dump being written again (``STEP``)
``(id, WorkerDeadline.QUIT)``      a worker asked to quit did not exit: SIGKILL it
``(id, WorkerDeadline.BOOT)``      no hello within startup_timeout: dump its stack, kill it
=================================  ===========================================================
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from corral._bootstrap import BootConfig, signals_to_reset
from corral._reactor import Reactor
from corral._spawner import START_OVERTIME, SpawnSkipped, stuck_start_hint
from corral.events import ExitRecord
from corral.heartbeat import HeartbeatTable
from corral.pool._conn import Sent, read_frames, send_frame
from corral.pool._failures import BootFailure, Brakes, Break
from corral.pool._limits import Limits
from corral.pool._limits import rss as memory_of
from corral.pool._records import (
    DeadlineKey,
    Endpoint,
    LeaveReason,
    PoolDeadline,
    PoolProcess,
    PoolWorker,
    Task,
    WorkerDeadline,
    WorkerState,
)
from corral.pool._replies import InitFailed, interpret, unreadable
from corral.pool._roster import Roster
from corral.pool._shared import PoolShared
from corral.pool._wire import QUIT, Frame, WireKind
from corral.pool.errors import (
    PoolBroken,
    WorkerLost,
)
from corral.process import DUMP_SIGNAL, disown_fd
from corral.states import StopReason

__all__ = ["SPARE_HOLD", "PoolManager", "SpawnRequest", "Started", "discard_started"]

log = logging.getLogger("corral.procpool")  # not corral.pool.*: the supervisors' pools log there

# A promoted spare's own replacement is started once the task it took is done, or after this
# many seconds: a process start (fork copies page tables holding the GIL; the child's boot takes
# a CPU) would otherwise delay that task's result, the one the spare is there to speed up.
SPARE_HOLD = 0.05
SPARE_GRACE = 0.002
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# The states and deadline kinds, bound once: the hot path compares them by identity.
_SPAWNING, _BOOTING, _IDLE, _BUSY, _LEAVING = (
    WorkerState.SPAWNING, WorkerState.BOOTING, WorkerState.IDLE, WorkerState.BUSY,
    WorkerState.LEAVING)
_WHOLE, _SENDING = Sent.WHOLE, Sent.SENDING
_TIMER, _DUMP, _QUIT, _BOOT = (WorkerDeadline.TIMER, WorkerDeadline.DUMP, WorkerDeadline.QUIT,
                               WorkerDeadline.BOOT)


@dataclass(frozen=True, slots=True)
class SpawnRequest:
    """One start for the spawner thread: the record it is for and the worker's boot settings."""

    worker_id: int
    boot: BootConfig


Started = tuple[PoolProcess, Endpoint]  # what a start makes: the process and our socket end


def discard_started(started: Started) -> None:
    """A started worker nobody can take any more: kill and reap it, close its socket."""
    proc, conn = started
    try:
        proc.kill_and_reap()
    finally:
        disown_fd(conn.fileno())
        conn.close()


@dataclass(slots=True)
class _SpareHold:
    """A promoted spare's first task, and until when it holds back new spares."""

    worker: PoolWorker
    task: Task | None  # None once the task is done (a short grace remains)
    until: float


class PoolManager:
    """Every worker and task record of one pool, and what happens to them: the manager
    thread's state machine. Only that thread calls it (:mod:`corral.pool._runner` runs it).

    Args:
        shared: what the submitting threads share with it (the task queue, ``broken``...).
        loop: the reactor it registers sockets, exits and deadlines with.
        table: the heartbeat table (each worker's slot holds its stack-dump fd).
        request_start: hands a :class:`SpawnRequest` to the spawner thread; the result comes
            back through :meth:`on_spawned`.
        method: the start method ("fork": the boot settings carry the table itself).
        clock: the monotonic clock (the loop's).
        rng: the backoff's jitter.
    """

    def __init__(self, shared: PoolShared, loop: Reactor[DeadlineKey], table: HeartbeatTable,
                 request_start: Callable[[SpawnRequest], None], *, method: str,
                 clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self.cfg = cfg = shared.cfg
        self.shared = shared
        self._counters = shared.counters
        self._task_stats = shared.task_stats
        self._loop = loop
        self._table = table
        self._request_start = request_start
        self._method = method
        self._clock = clock
        self._brakes = Brakes(cfg, rng)
        self._limits = Limits(cfg, loop, table, self._counters)
        self._roster = Roster(shared, table)  # the records and their counts
        self._idle = self._roster.idle  # the same deque: idle non-spare workers
        self._pending = shared.pending  # the same deque: tasks waiting to be sent
        self._spawn_after = 0.0  # no worker start before this (backoff), on the clock
        self._hold: _SpareHold | None = None  # a promoted spare's first task (SPARE_HOLD)
        self._closing = False  # shutting down: no new start; idle workers were told to quit
        self.stop_spawning = False  # read by the spawner thread: skip what is queued
        self.done = False  # closed and every worker is gone: the loop ends
        self.abandoned = 0  # starts given up on at the close (their processes never came)
        self._stop_overtime = False  # the close waited START_OVERTIME more for starts

    def after_round(self, now: float) -> None:
        """After a round's events: hand out tasks, fill places, close when it is time."""
        if self._idle and self._pending:
            self._dispatch()
        cfg = self.cfg
        if self._roster.active < cfg.max_workers or (
                self._roster.spares < cfg.spare_workers and not self._held(now)):
            self.fill(now)
        shared = self.shared
        if shared.shutdown_requested or shared.broken is not None:
            self._maybe_close(now)

    # ---------------------------------------------------------------------------- bookkeeping

    def _watch_conn(self, w: PoolWorker) -> None:
        w.watching = True
        self._loop.add_reader(w.fd, partial(self._on_readable, w), priority=0)

    def _unwatch_conn(self, w: PoolWorker) -> None:
        if w.watching:
            w.watching = False
            self._loop.remove_reader(w.fd)

    def _forget(self, w: PoolWorker) -> None:
        """Drop a worker whose process is gone (or never was)."""
        self._roster.forget(w)
        if w.conn is not None:
            self._unwatch_conn(w)
            disown_fd(w.fd)
            w.conn.close()
            w.conn = None
            w.fd = -1

    # ------------------------------------------------------------------------------- spawning

    def fill(self, now: float) -> None:
        if self._closing or self.shared.broken is not None:
            return
        cfg = self.cfg
        if self._roster.active < cfg.max_workers and self._roster.spares:
            self._promote_spares(now)  # no process start: not held back by the backoff
        if now < self._spawn_after:
            return
        while self._roster.active < cfg.max_workers:
            self._spawn_worker(spare=False)
        if not self._held(now):
            while self._roster.spares < cfg.spare_workers:
                self._spawn_worker(spare=True)

    def _held(self, now: float) -> bool:
        """Whether new spares wait for a promoted spare's first task (see SPARE_HOLD)."""
        hold = self._hold
        if hold is None:
            return False
        if now >= hold.until:
            self._hold = None
            return False
        w, t = hold.worker, hold.task
        if t is not None and not (w.task is t and w.state is _BUSY):
            # Done: its result's consumer gets a moment to run before a fork takes the GIL.
            hold.task = None
            hold.until = min(hold.until, now + SPARE_GRACE)
            self._loop.set_deadline(PoolDeadline.SPARE_HOLD, hold.until)
        return True

    def _promote_spares(self, now: float) -> None:
        """Fill the places of workers that left with spares, the readiest first."""
        spares = self._roster.promotable()
        for w in spares:
            if self._roster.active >= self.cfg.max_workers:
                break
            self._roster.promote(w)
            self._counters["spares_promoted"] += 1
            if w.state is _IDLE:
                self._became_idle(w)  # takes the next task now, if there is one
                if w.state is _BUSY and self._hold is None:
                    self._hold = _SpareHold(w, w.task, now + SPARE_HOLD)
                    self._loop.set_deadline(PoolDeadline.SPARE_HOLD, now + SPARE_HOLD)
        if spares:
            self._roster.publish()

    def _spawn_worker(self, spare: bool) -> None:
        cfg = self.cfg
        w = self._roster.add(spare)
        slot = w.slot
        fork = self._method == "fork"
        boot = BootConfig(
            pool=cfg.name, index=slot, name=f"{cfg.name}-{slot}", supervisor_pid=os.getpid(),
            heartbeat_path=self._table.path, wake_path=None, ready_on_beat=False,
            dump_signal=DUMP_SIGNAL, forkserver=self._method == "forkserver",
            forked=fork, table=self._table if fork else None,
            reset_signals=signals_to_reset() if fork else None)
        self._request_start(SpawnRequest(w.id, boot))

    def on_spawned(self, batch: list[tuple[SpawnRequest, Started | BaseException]]) -> None:
        for req, result in batch:
            w = self._roster.workers.get(req.worker_id)
            if w is None:  # a start given up on at the close (_abandon_starts): too late
                if not isinstance(result, BaseException):
                    discard_started(result)
                continue
            self._spawned(w, result)

    def _spawned(self, w: PoolWorker, result: Started | BaseException) -> None:
        self._roster.spawning -= 1
        now = self._clock()
        if isinstance(result, BaseException):
            self._roster.set_state(w, _LEAVING)
            self._forget(w)
            if not isinstance(result, SpawnSkipped):
                self._start_error(w, result, now)
            return
        proc, conn = result
        w.proc, w.conn, w.fd = proc, conn, conn.fileno()
        os.set_blocking(w.fd, False)
        w.waitable = proc.waitable()
        self._loop.add_reader(w.waitable, partial(self._on_exit, w), priority=1)
        self._counters["started"] += 1
        self._roster.publish()
        if self._closing or w.state is _LEAVING:
            self._roster.set_state(w, _LEAVING)
            w.leave_reason = LeaveReason.SHUTDOWN
            proc.send_group(signal.SIGKILL)
            return
        self._roster.set_state(w, _BOOTING)
        self._watch_conn(w)
        if self.cfg.startup_timeout is not None:
            self._loop.set_deadline((w.id, _BOOT), now + self.cfg.startup_timeout)
        log.debug("pool %r: worker pid %d started", self.cfg.name, proc.pid)

    def _start_error(self, w: PoolWorker, error: BaseException, now: float) -> None:
        self._counters["boot_failures"] += 1
        record = ExitRecord(w.slot, f"{self.cfg.name}-{w.slot}", None, None,
                            StopReason.SPAWN_FAILED, time.time(), 0.0,
                            f"{type(error).__name__}: {error}")
        verdict = self._brakes.start_error(error, record)
        if verdict is not None:
            self._break(verdict)
        else:
            self._crashed(record, now, boot=True)

    # ------------------------------------------------------------------------ worker replies

    def _on_readable(self, w: PoolWorker) -> None:
        frames, eof = read_frames(w.fd, w.decoder)
        for frame in frames:
            self._on_frame(w, frame)
            if not (w.watching or w.dead):
                return  # it left: the rest is not for us
        if eof:
            # The worker is dying; its exit (pidfd) says how. Never give it another task.
            self._on_eof(w)

    def _on_eof(self, w: PoolWorker) -> None:
        w.eof = True
        self._unwatch_conn(w)
        self._roster.remove_idle(w)

    def _on_frame(self, w: PoolWorker, data: Frame) -> None:
        t = w.task if w.state is _BUSY else None
        reply: InitFailed | BaseException | None
        try:
            msg = pickle.loads(data)
        except BaseException as exc:  # a __reduce__ may raise anything, SystemExit included
            reply = unreadable(exc, t.label if t else None, self._who(w))
        else:
            match msg:  # the everyday ones first
                case (WireKind.RESULT, value):
                    if t is not None:
                        self._task_finished(w, t, value, ok=True)
                    return
                case (WireKind.HELLO,):
                    self._on_hello(w)
                    return
            reply = interpret(msg, t.label if t else None, self.cfg.drop_in, self._who(w))
        if isinstance(reply, InitFailed):
            w.init_error, w.init_summary, w.init_exc = reply.error, reply.summary, reply.exc
        elif reply is not None and t is not None:
            self._task_finished(w, t, reply, ok=False)

    def _who(self, w: PoolWorker) -> str:
        return f"pool {self.cfg.name!r}: worker pid {w.pid}"

    def _on_hello(self, w: PoolWorker) -> None:
        if w.state is not _BOOTING:
            return
        w.booted = True
        self._loop.cancel_deadline((w.id, _BOOT))
        self._brakes.booted()  # a worker that boots ends a crash loop
        log.debug("pool %r: worker pid %s is ready", self.cfg.name, w.pid)
        self._roster.set_state(w, _IDLE)
        self._became_idle(w)

    def _task_finished(self, w: PoolWorker, t: Task, value: Any, ok: bool) -> None:
        w.task = None
        t.worker = None
        w.tasks_done += 1
        self._counters["tasks_done"] += 1
        self._roster.set_state(w, _IDLE)
        cfg = self.cfg
        if w.dead:
            pass  # its last reply, read after it died: its exit is handled next
        elif cfg.max_tasks_per_worker is not None and w.tasks_done >= cfg.max_tasks_per_worker:
            self._counters["recycled_tasks"] += 1
            self._leave(w, LeaveReason.RECYCLED_TASKS, kill=False)
        elif cfg.max_memory_per_worker is not None:
            rss = memory_of(w)
            if rss is not None and rss > cfg.max_memory_per_worker:
                log.info("pool %r: worker pid %s uses %d bytes, over max_memory_per_worker=%d; "
                         "recycling it", cfg.name, w.pid, rss, cfg.max_memory_per_worker)
                self._counters["recycled_memory"] += 1
                self._leave(w, LeaveReason.RECYCLED_MEMORY, kill=False)
        if w.state is _IDLE:
            self._became_idle(w)  # the next task goes out before this result is delivered
        if ok:
            t.resolve(value)
        else:
            t.resolve(exc=value)

    def _became_idle(self, w: PoolWorker) -> None:
        if w.eof or w.dead or w.spare:
            return  # dying (its exit will be handled), or a spare: no task until promoted
        t = self.shared.next_task()
        if t is not None:
            self._send(w, t)
        else:
            self._idle.append(w)

    # ------------------------------------------------------------------------------ tasks out

    def _dispatch(self) -> None:
        idle = self._idle
        while idle:
            t = self.shared.next_task()
            if t is None:
                return
            self._send(idle.popleft(), t)

    def _send(self, w: PoolWorker, t: Task) -> None:
        t.attempts += 1
        t.worker = w
        w.task = t
        self._roster.set_state(w, _BUSY)
        if t.timeout is not None or self.cfg.max_memory_per_worker is not None:
            self._limits.started(w, t, self._clock())
        sent = send_frame(w.fd, t.header, t.payload)
        if sent is _WHOLE or sent is _SENDING:
            self._task_stats.task_started(t.future._mark, self._clock())
            return
        w.task = None
        t.worker = None
        if not isinstance(sent, BaseException):  # GONE
            # The worker is already gone: the task never reached it. Give it to another one.
            t.attempts -= 1
            self.shared.pending.appendleft(t)
            self._roster.set_state(w, _IDLE)
            self._on_eof(w)
            return
        self._leave(w, LeaveReason.SEND_FAILED, kill=True)  # half sent, no thread for the rest
        t.resolve(exc=sent)

    def _cancel_kept(self) -> None:
        """shutdown(cancel_futures=True) kept tasks for workers still starting; if no worker
        can run them yet (every start still with the spawner thread), they are cancelled, so
        that the close can begin and keep its deadline."""
        if self._closing or not self._roster.spawning or not self.shared.has_pending():
            return
        if any(w.proc is not None and w.state is not _LEAVING
               for w in self._roster.workers.values()):
            return  # a worker exists: they run on it, as promised
        log.warning("pool %r: no worker start returned within stop_timeout + %g s (%s); "
                    "cancelling the tasks kept for them", self.cfg.name, START_OVERTIME,
                    stuck_start_hint(self._method))
        self.shared.cancel_pending(0, kept_too=True)

    def _abandon_starts(self) -> None:
        """Starts still with the spawner thread :data:`START_OVERTIME` past the close's
        stop_timeout: the close does not wait for them. A process that still comes is killed
        on arrival (:meth:`on_spawned`, or the spawner's discard once the loop has closed)."""
        late = [w for w in self._roster.workers.values() if w.proc is None]
        for w in late:
            self._roster.set_state(w, _LEAVING)
            self._forget(w)
        self._roster.spawning -= len(late)
        self.abandoned += len(late)
        if late:
            log.warning("pool %r: %d worker start(s) had not returned %g s after stop_timeout "
                        "(%s); not waiting for them, a process that still comes is killed",
                        self.cfg.name, len(late), START_OVERTIME, stuck_start_hint(self._method))

    # ------------------------------------------------------------------------------ outcomes

    def _task_lost(self, t: Task, exc: WorkerLost) -> None:
        self.shared.task_lost(t, exc, self._closing)

    def _leave(self, w: PoolWorker, reason: LeaveReason, kill: bool | None) -> None:
        """Take ``w`` out of service: ask it to quit (``kill=False``, SIGKILL after
        stop_timeout), SIGKILL it (True), or leave that to the caller (None: a dump first)."""
        self._roster.remove_idle(w)
        self._roster.set_state(w, _LEAVING)
        w.leave_reason = reason
        self._unwatch_conn(w)
        proc = w.proc
        if proc is None:
            return  # still spawning: killed as soon as it exists
        if kill:
            proc.send_group(signal.SIGKILL)
        elif kill is not None:
            try:
                os.write(w.fd, QUIT)
            except OSError:
                pass  # gone already, or a task frame is still being written: the kill follows
            self._loop.set_deadline((w.id, _QUIT), self._clock() + self.cfg.stop_timeout)

    # ---------------------------------------------------------------------------- exits

    def _on_exit(self, w: PoolWorker) -> None:
        proc = w.proc
        if w.dead or proc is None:
            return
        w.dead = True
        if w.watching:
            self._on_readable(w)  # a reply written just before it died still counts
        # Take the rest of its group down while the dead worker still holds the group id.
        proc.kill_group_leftovers()
        status = proc.reap()
        if status is None:
            w.dead = False
            return  # not really gone yet (cannot happen with pidfds): wait again
        self._loop.remove_reader(w.waitable)
        for kind in WorkerDeadline:
            self._loop.cancel_deadline((w.id, kind))
        self._forget(w)
        proc.close()
        now = self._clock()
        uptime = now - proc.started
        prior = w.state
        self._roster.remove_idle(w)
        self._roster.set_state(w, _LEAVING)
        self._roster.publish()
        if w.dumping:
            self._limits.dump_done(w, "(no stack dump: the worker ended before it was written)")
        if prior is _LEAVING:
            # corral asked it to leave (shutdown, recycling, timeout, cancellation), or killed
            # it: no news, whatever the status (a SIGKILL is most likely ours). Anything worth
            # a warning (a worker that ignored the quit) was logged when it happened.
            level = (logging.DEBUG if status.clean or status.signal == signal.SIGKILL
                     else logging.INFO)
            reason = w.leave_reason.value if w.leave_reason is not None else "left"
            log.log(level, "pool %r: worker pid %d (%s) ended: %s", self.cfg.name, proc.pid,
                    reason, status.describe() + (f" ({status.hint})" if status.unknown else ""))
            self.fill(now)
            return
        # It died by itself (or before it could take the task it was sent).
        self._counters["workers_lost"] += 1
        how = status.describe() + (f" ({status.hint})" if status.hint else "")
        record = ExitRecord(w.slot, f"{self.cfg.name}-{w.slot}", proc.pid, status,
                            StopReason.KILLED if status.signal is not None else StopReason.EXITED,
                            time.time(), uptime, w.init_error)
        t = w.task
        if t is not None:
            w.task = None
            attempts = f" (attempt {t.attempts} of {t.retries + 1})" if t.retries else ""
            msg = f"worker pid {proc.pid} died while running {t.label}: {how}{attempts}"
            self._task_lost(t, WorkerLost(msg, proc.pid, status, t.attempts))
        elif not w.booted:
            self._counters["boot_failures"] += 1
            verdict = self._brakes.boot_failure(BootFailure(
                proc.pid, status, how, record, w.init_error, w.init_summary, w.init_exc),
                broken=self.shared.broken is not None)
            if verdict is not None:
                self._break(verdict)
                return
        else:
            log.warning("pool %r: %s worker pid %d died: %s", self.cfg.name,
                        "spare" if w.spare else "idle", proc.pid, how)
        self._crashed(record, now, boot=not w.booted)

    def _crashed(self, record: ExitRecord, now: float, boot: bool) -> None:
        """An unplanned exit: spend from the restart budget; back off if it never booted."""
        if self.shared.broken is not None:
            self._brakes.history.append(record)
            return
        delay = self._brakes.charge(record, now, boot)
        if isinstance(delay, Break):
            self._break(delay)
            return
        if delay > 0:
            self._spawn_after = max(self._spawn_after, now + delay)
            self._loop.set_deadline(PoolDeadline.BACKOFF, self._spawn_after)
            log.info("pool %r: next worker start in %.3fs (failure %d in a row)",
                     self.cfg.name, delay, self._brakes.streak)
        self.fill(now)

    def _break(self, verdict: Break) -> None:
        log.error("%s", verdict.message)
        broken = PoolBroken(verdict.message, list(self._brakes.history))
        broken.__cause__ = verdict.cause  # the details (an initializer's exception)
        with self.shared.lock:
            self.shared.broken = broken
        self._loop.cancel_deadline(PoolDeadline.BACKOFF)
        self.shared.fail_pending(self.shared.broken_error)

    # ------------------------------------------------------------------------- deadlines

    def on_deadline(self, key: DeadlineKey, now: float) -> None:
        if isinstance(key, PoolDeadline):
            if key is PoolDeadline.KEPT:
                self._cancel_kept()
            elif key is PoolDeadline.STOP:
                for straggler in self._roster.workers.values():
                    if straggler.state is _LEAVING and straggler.proc is not None:
                        log.warning("pool %r: worker pid %d did not exit within stop_timeout="
                                    "%gs; killing it", self.cfg.name, straggler.proc.pid,
                                    self.cfg.stop_timeout)
                        straggler.proc.send_group(signal.SIGKILL)
                if self._roster.spawning:
                    if not self._stop_overtime:
                        self._stop_overtime = True
                        self._loop.set_deadline(PoolDeadline.STOP, now + START_OVERTIME)
                    else:
                        self._abandon_starts()
            else:  # BACKOFF, SPARE_HOLD
                self.fill(now)
            return
        wid, kind = key
        w = self._roster.workers.get(wid)
        if w is None or w.dead:
            return
        if kind is _TIMER:
            self._limits.on_timer(w, now, self._leave, self._task_lost)
        elif kind is _DUMP:
            self._limits.on_dump_step(w, now)
        elif kind is _BOOT and w.state is _BOOTING and not w.dumping:
            # Hung in its initializer (or import): evidence, then a boot failure like a crash.
            log.warning("pool %r: worker pid %s did not finish starting within startup_timeout="
                        "%gs; collecting a stack dump, then killing it", self.cfg.name, w.pid,
                        self.cfg.startup_timeout)
            self._unwatch_conn(w)  # a late hello does not count
            self._limits.dump_then_kill(w, now)
        elif kind is _QUIT and w.state is _LEAVING and w.proc is not None:
            reason = w.leave_reason.value if w.leave_reason is not None else "leaving"
            log.warning("pool %r: worker pid %d (%s) did not exit within stop_timeout=%gs; "
                        "killing it", self.cfg.name, w.proc.pid, reason, self.cfg.stop_timeout)
            w.proc.send_group(signal.SIGKILL)

    # ------------------------------------------------------------------------------ commands

    def cancel_running(self, t: Task) -> None:
        # The owner cancelled the future of a running task: its outcome is the cancellation.
        if t.done:
            return
        w = t.worker
        t.drop()
        if w is not None and w.task is t and w.state is _BUSY:
            w.task = None
            self._counters["cancelled_running"] += 1
            log.info("pool %r: %s was cancelled while running; killing worker pid %s",
                     self.cfg.name, t.label, w.pid)
            self._leave(w, LeaveReason.CANCELLED, kill=True)

    def shutdown(self, cancel_futures: bool) -> None:
        """shutdown(): the round closes the pool once every task is done; ``cancel_futures``
        cancels the waiting tasks first."""
        if cancel_futures:
            # The next tasks for workers that are still starting are as good as started (as in
            # concurrent.futures, whose call queue holds them): they run. If none of those
            # starts returns (a stopped forkserver), they are cancelled after all (KEPT).
            keep = 0 if self._closing else max(0, self._roster.active - self._roster.busy)
            self.shared.cancel_pending(keep)
            if keep and self._roster.spawning:
                self._loop.set_deadline(PoolDeadline.KEPT, self._clock() + self.cfg.stop_timeout
                                        + START_OVERTIME)

    def terminate(self) -> None:
        """Cancel every task, running ones too (their workers are killed), and close."""
        self.shared.cancel_pending(0)
        for w in list(self._roster.workers.values()):
            t = w.task
            if w.state is _BUSY and t is not None:
                w.task = None
                t.drop()
                t.future._cancel(allow_running=True)
                self._leave(w, LeaveReason.TERMINATED, kill=True)
            if w.dumping:
                self._limits.dump_done(w, "(no stack dump: the pool was terminated)")

    def _maybe_close(self, now: float) -> None:
        if not self._closing:
            if self._roster.busy or self.shared.has_pending():
                return
            self._closing = True
            self.stop_spawning = True
            for w in list(self._roster.workers.values()):
                if w.state is _IDLE or w.state is _BOOTING:
                    self._leave(w, LeaveReason.SHUTDOWN, kill=False)
                elif w.state is _SPAWNING:
                    self._roster.set_state(w, _LEAVING)
                    w.leave_reason = LeaveReason.SHUTDOWN
            self._loop.cancel_deadline(PoolDeadline.BACKOFF)
            self._loop.set_deadline(PoolDeadline.STOP, now + self.cfg.stop_timeout)
        if not self._roster.workers and not self._roster.spawning:
            self.done = True

    def emergency(self) -> None:
        """The manager failed: kill every worker and fail every task, so that nothing hangs."""
        message = "the pool's manager thread failed (a bug in corral; see the log)"
        with self.shared.lock:
            self.shared.broken = PoolBroken(f"pool {self.cfg.name!r} is broken: {message}",
                                            list(self._brakes.history))
        self.stop_spawning = True
        for w in list(self._roster.workers.values()):
            for t in (w.task, w.dump_task):
                if t is not None:
                    t.resolve(exc=PoolBroken(message))
            if w.proc is not None and not w.dead:
                w.proc.kill_and_reap()
            if w.conn is not None:
                disown_fd(w.fd)
                w.conn.close()
        self.shared.fail_pending(lambda: PoolBroken(message))
