"""The monitor's watch and control parts (mixins of :class:`corral._monitor.Monitor`).

- :class:`WatchPart`: liveness (heartbeats, startup grace), stack dumps of hung workers, custom
  health checks and memory recycling: what decides that a worker must be stopped.
- :class:`ControlPart`: the commands of :class:`corral.Supervisor` (stop, scale, restart,
  rolling restart, wait_ready, status), the answers to them, and the supervision strategies
  one_for_all / rest_for_one (group restarts).

Both run on the monitor thread only and use the monitor's state (see ``_monitor.py``).
"""

from __future__ import annotations

import logging
import math
import signal
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from corral._daemonpool import NoThread
from corral._eventlog import event_extra
from corral._evidence import STEP, StackDump
from corral._health import HealthRunner, over_max_memory
from corral._liveness import due, next_look
from corral._observe import PoolFacts, PoolSummary
from corral._reactor import DeadlineSpace, Reactor
from corral._reply import Reply
from corral._slots import POOL, AfterStop, Deadline, DeadlineKey, WorkerSlot
from corral._stats import PoolStats
from corral.errors import GaveUp, RestartFailed, SupervisorStateError
from corral.events import Event, EventKind, ExitRecord, StopReason
from corral.heartbeat import HeartbeatTable
from corral.policy import BackoffState, BudgetWindow, Strategy
from corral.process import WorkerHandle
from corral.spec import PoolSpec
from corral.states import Trigger, WorkerState
from corral.status import WorkerStatus

if TYPE_CHECKING:
    import random
    import threading

    from corral._command import Launch
    from corral._monitor_standby import Standby
    from corral._workerio import WorkerIO
    from corral.process import ProcessLike


    class _Core:
        """What the parts use of the monitor's core (for the type checker only)."""

        spec: PoolSpec
        log: logging.Logger
        finished: threading.Event
        gave_up: GaveUp | None
        _clock: Callable[[], float]
        _reactor: Reactor[DeadlineKey]
        _hb: HeartbeatTable
        _health: HealthRunner
        _slots: dict[int, WorkerSlot]
        _standbys: dict[int, Standby]
        _counts: dict[WorkerState, int]
        _changes: int
        _published: int
        _facts: PoolFacts | None
        _live_at: float
        _steady: int
        _hbt: float
        _needs_ready_scan: bool
        _memory_pending: bool
        _no_thread_logged: bool
        _budget: BudgetWindow
        stats: PoolStats
        _stopping: bool
        _remote: bool
        _hosted: bool
        _dl: DeadlineSpace[DeadlineKey]
        _history: deque[ExitRecord]
        _stop_deadline: float
        _stop_waiters: list[Reply]
        _group: GroupRestart | None
        _rolling: deque[int]
        _rolling_current: int | None
        _rolling_old: int | None
        _rolling_waiters: list[Reply]
        _ready_waiters: list[tuple[int | None, Reply]]
        _scaling_down: bool
        _snapshot: tuple[WorkerStatus, ...]
        _live_lock: threading.Lock
        _hand_lock: threading.RLock
        _live: dict[int, ProcessLike]
        _io: WorkerIO | None
        _rng: random.Random

        def _log_exit(self, record: ExitRecord, event: Event) -> None: ...
        def _give_up(self, now: float) -> None: ...
        def _restart_group(self, w: WorkerSlot, trigger: Trigger, now: float,
                           delay: float) -> bool: ...
        def _move(self, w: WorkerSlot, trigger: Trigger, new: WorkerState) -> None: ...
        def _add(self, w: WorkerSlot) -> None: ...
        def _remove(self, w: WorkerSlot) -> None: ...
        def _note_scaling(self) -> None: ...
        def _spawn(self, w: WorkerSlot, now: float) -> None: ...
        def _scan_ready(self, now: float) -> None: ...
        def _stop_worker(self, w: WorkerSlot, reason: StopReason, after: AfterStop,
                         now: float, detail: str | None = None, dump: bool = False) -> None: ...
        def _signal_stop(self, w: WorkerSlot, now: float,
                         grace: float | None = None) -> None: ...
        def _begin_stop(self, timeout: float, reason: StopReason, now: float) -> None: ...
        def _emit(self, kind: EventKind, w: WorkerSlot | None, *,
                  exit: ExitRecord | None = None, delay: float | None = None,
                  message: str = "") -> Event: ...
        def _run_command(self, reply: Reply, fn: Callable[..., None],
                         args: tuple[Any, ...]) -> None: ...
        def _spawned_batch(self, batch: Any) -> None: ...
        def not_ready_error(self, n: int | None) -> BaseException: ...
        def _check_ready_waiters(self) -> None: ...
        def _begin_dump(self, w: WorkerSlot, now: float) -> bool: ...
        def _rolling_advance(self) -> None: ...
        def _rolling_failed(self, w: WorkerSlot, record: ExitRecord) -> None: ...
        def _group_maybe_restart(self, now: float) -> None: ...
        def _live_changed(self) -> None: ...
        def _stop_standbys(self) -> None: ...
        def _launch_io(self, w: WorkerSlot,
                       ) -> tuple[Launch | None, tuple[str | None, str | None] | None]: ...
        def _send_handover(self, w: WorkerSlot, stdio: tuple[str | None, str | None] | None,
                           ) -> Standby | None: ...
        def _withdraw_handover(self, sb: Standby) -> None: ...
        def _take_standby(self) -> Standby | None: ...
        def _standby_statuses(self, now: float) -> list[WorkerStatus]: ...
else:
    _Core = object

S = WorkerState
_ALIVE = frozenset(state for state in WorkerState if state.alive)


@dataclass
class GroupRestart:
    """A one_for_all / rest_for_one restart: members going down, then started together."""

    trigger: int  # the index whose failure started it
    members: set[int] = field(default_factory=set)
    down: set[int] = field(default_factory=set)  # members whose process is still going
    not_before: float = 0.0  # the failed worker's backoff


# A worker recycled for memory is SIGKILLed during its grace once its RSS passes this multiple of
# max_memory, checked every _RECYCLE_CHECK seconds while it stops.
_HARD_MEMORY = 1.25
_RECYCLE_CHECK = 0.1


class WatchPart(_Core):
    """Liveness, evidence, health checks and memory recycling."""

    # ------------------------------------------------------------------ liveness and evidence

    def _arm_liveness(self, w: WorkerSlot, now: float) -> None:
        """Make sure the liveness look covers a newly started (or ready) worker."""
        if self._remote:
            return  # probes (see _monitor_remote)
        last = self._hb.last_beat(w.index)
        d = due(self.spec, w.state, w.proc.started if w.proc else None, last)
        if d is None:
            return
        when = next_look(self.spec, d[0], last, now)
        if when < self._live_at:
            self._live_at = when

    def _check_liveness(self, now: float) -> None:
        """Find hung and never-started workers; re-arm for the earliest next due time.

        Runs once per earliest deadline, not per worker: with N workers beating, the pool wakes
        about once per (heartbeat_timeout - beat interval), and each wake is one pass.
        """
        n = self._steady
        if n:
            oldest = self._hb.oldest_beat(n)
            if oldest > 0 and oldest + self._hbt > now:
                self._live_at = oldest + self._hbt
                return
        if self._remote:
            return
        if self._needs_ready_scan:
            self._scan_ready(now)
        beats = self._hb.all_beats()
        earliest = math.inf
        late: list[tuple[WorkerSlot, StopReason, float]] = []
        for w in self._slots.values():
            d = due(self.spec, w.state, w.proc.started if w.proc else None, beats[w.index])
            if d is None:
                continue
            if d[0] > now:
                earliest = min(earliest, next_look(self.spec, d[0], beats[w.index], now))
            else:
                late.append((w, d[1], beats[w.index]))
        for w, reason, last in late:
            assert w.proc is not None
            what = (f"no heartbeat for {now - last:.3f}s" if reason is StopReason.HUNG
                    else f"not ready {now - w.proc.started:.3f}s after start")
            event = self._emit(EventKind.UNHEALTHY, w, message=f"{reason.value}: {what}")
            state = "hung" if reason is StopReason.HUNG else "past its startup timeout"
            self.log.warning("%s is %s (%s); collecting a stack dump, then stopping it", w.who,
                             state, what,
                             extra=event_extra(self.log, logging.WARNING, event))
            self._stop_worker(w, reason, AfterStop.POLICY, now, detail=what, dump=True)
        self._live_at = min(self._live_at, earliest)

    def _begin_dump(self, w: WorkerSlot, now: float) -> bool:
        assert w.proc is not None
        started = StackDump.begin(w.proc, self._hb.read(w.index).dump_fd, now)
        if isinstance(started, str):
            w.stop_detail = f"{w.stop_detail}\n{started}" if w.stop_detail else started
            return False
        w.dump = started
        self._dl.set((w.index, Deadline.DUMP), now + STEP)
        return True

    def _collect_dump(self, w: WorkerSlot, now: float) -> None:
        dump = w.dump
        if not isinstance(dump, StackDump):
            return
        text = dump.poll(now)
        if text is None:
            self._dl.set((w.index, Deadline.DUMP), now + STEP)
            return
        w.dump = None
        w.stop_detail = f"{w.stop_detail}\n{text}" if w.stop_detail else text
        self._signal_stop(w, now, grace=self.spec.kill_grace)

    # ------------------------------------------------------------- health checks and recycling

    def _run_health_check(self, w: WorkerSlot, now: float) -> None:
        check = self.spec.health_check
        assert check is not None and w.proc is not None
        interval = self.spec.health_check_interval
        if w.health_pending is not None and not w.health_pending.done():
            # The previous call still hangs: that is one more failure, and no second thread.
            self._health_failed(w, "health check still running (hung)", now)
            if w.state is S.RUNNING:
                self._dl.set((w.index, Deadline.HEALTH), now + interval)
            return
        handle = WorkerHandle(w.proc, w.index, w.name, self.spec.daemon)
        future = self._health.check(check, handle, w.index)
        w.health_pending = future
        generation = w.generation
        future.add_done_callback(lambda f: self._hand_over(self._health_result, w.index,
                                                           generation, f))
        self._dl.set((w.index, Deadline.HEALTH_TIMEOUT),
                                   now + self.spec.health_check_timeout)

    def _hand_over(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self._reactor.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # the pool has finished: the result has nobody to go to

    def _health_result(self, index: int, generation: int, future: Future[bool]) -> None:
        w = self._slots.get(index)
        if w is None or w.generation != generation or w.state is not S.RUNNING:
            return
        if (index, Deadline.HEALTH_TIMEOUT) not in self._dl:
            return  # already counted as a timeout
        self._dl.cancel((index, Deadline.HEALTH_TIMEOUT))
        now = self._clock()
        error = future.exception()
        if isinstance(error, NoThread):
            # The check did not run: no failure of the worker's, and not a reason to stop.
            self._no_thread(f"health check of {w.who} skipped", error)
        elif error is None and future.result() is True:
            self._thread_ok()
            w.health_failures, w.health_last = 0, "ok"
        elif error is not None:
            self._health_failed(w, f"health check raised {type(error).__name__}: {error}", now)
        else:
            self._health_failed(w, f"health check returned {future.result()!r}", now)
        if w.state is S.RUNNING:
            self._dl.set((index, Deadline.HEALTH),
                                       now + self.spec.health_check_interval)

    def _no_thread(self, what: str, error: BaseException) -> None:
        """Once until a call runs again: say that a check could not run."""
        if not self._no_thread_logged:
            self._no_thread_logged = True
            self.log.warning("pool %r: %s: %s; checks are retried at their interval",
                             self.spec.name, what, error)

    def _thread_ok(self) -> None:
        if self._no_thread_logged:
            self._no_thread_logged = False
            self.log.info("pool %r: threads for checks can be started again",
                             self.spec.name)

    def _health_failed(self, w: WorkerSlot, why: str, now: float) -> None:
        self._dl.cancel((w.index, Deadline.HEALTH_TIMEOUT))
        w.health_failures += 1
        w.health_last = why
        threshold = self.spec.failure_threshold
        self.log.warning("%s: %s (failure %d of %d)", w.who, why, w.health_failures, threshold)
        if w.health_failures >= threshold:
            self._emit(EventKind.UNHEALTHY, w, message=why)
            self._stop_worker(w, StopReason.UNHEALTHY, AfterStop.POLICY, now,
                              detail=f"{threshold} failed health checks in a row; last: {why}")
        elif (w.index, Deadline.HEALTH) not in self._dl:
            self._dl.set((w.index, Deadline.HEALTH),
                                       now + self.spec.health_check_interval)

    def _readable_pid(self, proc: ProcessLike) -> int | None:
        """The pid whose memory can be read here: a Ray actor on another node has none (its
        probe replies carry its RSS, see _monitor_remote); on this node both tell."""
        if not self._remote:
            return proc.pid
        local_pid = getattr(proc, "local_pid", None)
        return local_pid() if local_pid is not None else None

    def _recycling_for_memory(self, w: WorkerSlot) -> bool:
        return w.state is S.STOPPING and w.stop_reason is StopReason.RECYCLED_MEMORY

    def _measure_memory(self, now: float) -> None:
        # A worker in its graceful recycle is watched closely: it may still be growing.
        interval = self.spec.memory_check_interval
        if any(self._recycling_for_memory(w) for w in self._slots.values()):
            interval = min(interval, _RECYCLE_CHECK)
        self._dl.set((POOL, Deadline.MEMORY), now + interval)
        if self._memory_pending:
            return
        targets = [(w.index, w.generation, pid) for w in self._slots.values()
                   if w.proc is not None and (w.state in (S.STARTING, S.RUNNING)
                                              or self._recycling_for_memory(w))
                   and (pid := self._readable_pid(w.proc)) is not None]
        if not targets:
            self._dl.cancel((POOL, Deadline.MEMORY))
            return
        self._memory_pending = True
        future = self._health.measure(targets)
        future.add_done_callback(lambda f: self._hand_over(self._memory_result, f))

    def _memory_result(self, future: Future[list[tuple[int, int, int]]]) -> None:
        self._memory_pending = False
        limit = self.spec.max_memory
        error = future.exception()
        if isinstance(error, NoThread):
            self._no_thread("memory reading skipped", error)
        if error is not None or limit is None:
            return
        self._thread_ok()
        now = self._clock()
        for index, generation, rss in future.result():
            w = self._slots.get(index)
            if w is None or w.generation != generation or rss <= limit:
                continue
            if w.state in (S.STARTING, S.RUNNING):
                self._stop_worker(w, StopReason.RECYCLED_MEMORY, AfterStop.RESTART, now,
                                  detail=over_max_memory(rss, limit))
                when = self._dl.get((POOL, Deadline.MEMORY))
                if when is not None and when > now + _RECYCLE_CHECK:
                    self._dl.set((POOL, Deadline.MEMORY), now + _RECYCLE_CHECK)
                if rss > limit * _HARD_MEMORY:
                    # Grown past the hard limit between two checks: no grace at all.
                    self._kill_past_hard_memory(w, rss, "is already past")
            elif self._recycling_for_memory(w) and rss > limit * _HARD_MEMORY:
                # Its graceful stop must not let memory run away: past the hard limit, SIGKILL.
                self._kill_past_hard_memory(w, rss, "still grows during its graceful recycle, "
                                            "past")

    def _kill_past_hard_memory(self, w: WorkerSlot, rss: int, how: str) -> None:
        if w.proc is None:
            return
        self.log.warning("%s %s %.0f%% of max_memory (RSS %.1f MiB); sending SIGKILL", w.who,
                         how, _HARD_MEMORY * 100, rss / 2**20)
        w.stop_detail = f"{w.stop_detail}; killed at RSS {rss / 2**20:.1f} MiB"
        w.proc.stop_sent = signal.SIGKILL
        w.proc.send_group(signal.SIGKILL)


class ControlPart(_Core):
    """Stopping workers, giving up, commands and their answers, and group restarts."""

    def _log_exit(self, record: ExitRecord, event: Event) -> None:
        level = logging.INFO if record.reason.by_corral else logging.WARNING
        if self.log.isEnabledFor(level):  # describe() is not free: only when it is shown
            self.log.log(level, "%s", record.describe(),
                         extra=event_extra(self.log, level, event))
        if record.detail and record.reason in (StopReason.HUNG, StopReason.STARTUP_TIMEOUT):
            self.log.warning("stack of hung worker %r (pid %s):\n%s", record.name, record.pid,
                             record.detail,
                             extra=event_extra(self.log, logging.WARNING, event))

    def _give_up(self, now: float) -> None:
        budget = self.spec.budget
        last = list(self._history)[-10:]
        lines = "\n".join("  " + r.describe() for r in last)
        message = (f"pool {self.spec.name!r} gave up: more than {budget.max_restarts} restarts "
                   f"within {budget.window:g}s. Last exits:\n{lines}")
        self.gave_up = GaveUp(message, last)
        self.stats.gave_up = True
        event = self._emit(EventKind.GAVE_UP, None, message=message)
        self.log.error("%s", message, extra=event_extra(self.log, logging.ERROR, event))
        self._begin_stop(self.spec.stop_timeout, StopReason.GAVE_UP, now)

    # ------------------------------------------------------------------------------- stopping

    def _stop_worker(self, w: WorkerSlot, reason: StopReason, after: AfterStop, now: float,
                     detail: str | None = None, dump: bool = False) -> None:
        """Stop one worker's process gracefully; ``after`` says what follows its exit."""
        if w.state is S.STOPPING:
            # Already going: keep the stronger follow-up (a shutdown beats a restart).
            if after in (AfterStop.STAY, AfterStop.REMOVE):
                w.after_stop = after
            return
        w.stop_reason, w.after_stop, w.stop_detail = reason, after, detail
        if w.state is S.PENDING:
            self._move(w, Trigger.STOP, S.PENDING)  # stopped as soon as its process appears
            return
        self._move(w, Trigger.STOP, S.STOPPING)
        if dump and self._begin_dump(w, now):
            return
        self._signal_stop(w, now)

    def _signal_stop(self, w: WorkerSlot, now: float, grace: float | None = None) -> None:
        if w.state is not S.STOPPING:
            self._move(w, Trigger.STOP, S.STOPPING)
        assert w.proc is not None
        grace = self.spec.stop_timeout if grace is None else grace
        if grace <= 0:
            self._kill(w, at_once=True)
            return
        w.proc.send_stop(self.spec.stop_signal)
        if (w.index, Deadline.KILL) not in self._dl:
            self._dl.set((w.index, Deadline.KILL), now + grace)

    def _kill(self, w: WorkerSlot, at_once: bool = False) -> None:
        if w.proc is None or w.proc.stop_sent == signal.SIGKILL:
            return
        if at_once:
            self.log.info("%s: stopping with SIGKILL at once (no grace)", w.who)
        else:
            self.log.warning("%s did not stop within its grace; sending SIGKILL", w.who)
        w.proc.stop_sent = signal.SIGKILL
        w.proc.send_group(signal.SIGKILL)

    def _begin_stop(self, timeout: float, reason: StopReason, now: float) -> None:
        if self._stopping:
            if now + timeout < self._stop_deadline:
                # A second stop with a shorter deadline (stop(inf), then stop(5)) shortens it.
                self._stop_deadline = now + timeout
                self._dl.set((POOL, Deadline.STOP), self._stop_deadline)
            return
        self._stopping = True
        self._changes += 1
        self._stop_deadline = now + timeout
        self._stop_standbys()
        self._rolling.clear()
        self._group = None
        self._dl.cancel((POOL, Deadline.GROUP))
        for w in list(self._slots.values()):
            self._dl.cancel((w.index, Deadline.BACKOFF))
            if w.state in (S.BACKOFF, S.EXITED):
                self._move(w, Trigger.STOP, S.STOPPED)
            elif w.state is S.STOPPING:
                w.after_stop = AfterStop.STAY
                w.stop_reason = w.stop_reason or reason
            elif w.state in (S.PENDING, S.STARTING, S.RUNNING):
                w.stop_reason, w.after_stop = reason, AfterStop.STAY
                if w.state is S.PENDING:
                    self._move(w, Trigger.STOP, S.PENDING)
                else:
                    self._move(w, Trigger.STOP, S.STOPPING)
                    self._signal_stop(w, now, grace=timeout)
        self._live_at = math.inf
        # One deadline for the whole pool: stragglers are killed together.
        for w in self._slots.values():
            self._dl.cancel((w.index, Deadline.KILL))
        # Always set, even for 0: workers already STOPPING (a restart in progress) lost their
        # own kill deadline just above.
        self._dl.set((POOL, Deadline.STOP), now + timeout)

    # ------------------------------------------------------ commands (on the monitor thread)

    def do_stop(self, reply: Reply, grace: float) -> None:
        if self.finished.is_set():
            reply.finish()
            return
        self._stop_waiters.append(reply)
        self._begin_stop(grace, StopReason.SHUTDOWN, self._clock())

    def _check_not_stopping(self) -> None:
        if self._stopping:
            raise RuntimeError(f"pool {self.spec.name!r} is stopping")

    def do_scale(self, reply: Reply, n: int,
                 prepared: dict[int, tuple[str, tuple[Any, ...]]]) -> None:
        """Run ``n`` workers (prepared: {index: (name, args)} for every index < n)."""
        self._check_not_stopping()
        self._hb.ensure(n)  # the one step that can fail (no shared memory): before any change
        now = self._clock()
        for index in range(n):
            w = self._slots.get(index)
            if w is None:
                name, args = prepared[index]
                w = WorkerSlot(index, name, args, BackoffState(self.spec.backoff))
                self._add(w)
                self._spawn(w, now)
            elif w.after_stop is AfterStop.REMOVE:
                if w.state is S.PENDING:
                    # Scaled back up before its start arrived: nothing was signalled yet, so
                    # the start is simply kept (not stopped on arrival, then started again).
                    w.stop_reason, w.after_stop, w.stop_detail = None, AfterStop.POLICY, None
                else:
                    w.after_stop = AfterStop.RESTART  # scaled back up while it was going
        for index in sorted(self._slots)[n:] if len(self._slots) > n else ():
            w = self._slots[index]
            if w.state.alive or w.state is S.PENDING:
                self._stop_worker(w, StopReason.SCALED_DOWN, AfterStop.REMOVE, now)
            else:
                self._dl.cancel((index, Deadline.BACKOFF))
                if w.state is S.BACKOFF:
                    self._move(w, Trigger.STOP, S.STOPPED)
                self._remove(w)
        reply.finish()
        self._note_scaling()
        self._check_ready_waiters()
        if self._group is not None:
            self._group_maybe_restart(now)

    def do_restart(self, reply: Reply, index: int) -> None:
        self._check_not_stopping()
        self._restart_one(index, self._clock())
        reply.finish()

    def _restart_one(self, index: int, now: float) -> None:
        w = self._slots.get(index)
        if w is None:
            raise IndexError(f"no worker with index {index} (pool has {len(self._slots)})")
        if w.state in (S.BACKOFF, S.EXITED):
            self._dl.cancel((index, Deadline.BACKOFF))
            self._move(w, Trigger.RESTART, S.PENDING)
            self._spawn(w, now)
        elif w.state in (S.STARTING, S.RUNNING):
            self._stop_worker(w, StopReason.RESTARTED, AfterStop.RESTART, now)
        # PENDING or STOPPING: a new process is on its way already.

    def do_restart_all(self, reply: Reply) -> None:
        self._check_not_stopping()
        self._rolling_waiters.append(reply)
        if self._rolling or self._rolling_current is not None:
            return  # one rolling restart at a time; this caller waits for it
        self._rolling.extend(sorted(self._slots))
        self._rolling_advance()

    def _rolling_advance(self) -> None:
        now = self._clock()
        self._rolling_current = None
        while self._rolling:
            index = self._rolling.popleft()
            w = self._slots.get(index)
            if w is None or w.state.final:
                continue
            self._rolling_current = index
            self._rolling_old = w.proc.pid if w.proc is not None else None
            self._restart_one(index, now)
            return
        for reply in self._rolling_waiters:
            reply.finish()
        self._rolling_waiters.clear()

    def _rolling_failed(self, w: WorkerSlot, record: ExitRecord) -> None:
        """The rolling restart's replacement of ``w`` ended before it was ready: stop there
        (the workers not yet restarted keep their old process) and say so to its callers."""
        left = len(self._rolling)
        self._rolling.clear()
        self._rolling_current = None
        message = (f"pool {self.spec.name!r}: rolling restart stopped: the replacement of "
                   f"worker {w.name!r} (index {w.index}) ended before it was ready "
                   f"({record.describe()}); {left} worker(s) not yet restarted keep running")
        self.log.error("%s", message)
        for reply in self._rolling_waiters:
            reply.finish(error=RestartFailed(message))
        self._rolling_waiters.clear()

    def do_hold(self, reply: Reply, indexes: list[int] | None) -> None:
        """Stop workers and keep them stopped (``corral stop web:2``); None: every worker."""
        self._check_not_stopping()
        now = self._clock()
        for index in sorted(self._slots) if indexes is None else indexes:
            w = self._slots.get(index)
            if w is None:
                raise IndexError(f"no worker with index {index} (pool has {len(self._slots)})")
            if w.state in (S.BACKOFF, S.EXITED):
                self._dl.cancel((index, Deadline.BACKOFF))
                self._move(w, Trigger.STOP, S.STOPPED)
            elif w.state is S.STOPPING:
                w.after_stop = AfterStop.STAY
            elif w.state is not S.STOPPED:
                self._stop_worker(w, StopReason.STOPPED, AfterStop.STAY, now,
                                  detail="stopped on request")
        reply.finish()
        self._check_ready_waiters()

    def do_release(self, reply: Reply, indexes: list[int] | None) -> None:
        """Start workers that were stopped or have exited (``corral start web``)."""
        self._check_not_stopping()
        now = self._clock()
        for index in sorted(self._slots) if indexes is None else indexes:
            w = self._slots.get(index)
            if w is None:
                raise IndexError(f"no worker with index {index} (pool has {len(self._slots)})")
            if w.state.final:
                self._move(w, Trigger.RESTART, S.PENDING)
                self._spawn(w, now)
            elif w.state is S.STOPPING and w.after_stop is AfterStop.STAY:
                w.after_stop = AfterStop.RESTART
        reply.finish()

    def do_signal(self, reply: Reply, indexes: list[int] | None, sig: int) -> None:
        """Send ``sig`` to the process group of workers (every one: None); answers how many."""
        sent = 0
        for index in sorted(self._slots) if indexes is None else indexes:
            w = self._slots.get(index)
            if w is None:
                raise IndexError(f"no worker with index {index} (pool has {len(self._slots)})")
            if w.proc is not None and w.proc.send_group(sig):
                sent += 1
        reply.finish(sent)

    def do_wait_ready(self, reply: Reply, n: int | None) -> None:
        self._ready_waiters.append((n, reply))
        self._check_ready_waiters()

    def _check_ready_waiters(self) -> None:
        """Answer the wait_ready() callers whose count is reached.

        Workers on their way out (scaled down) and workers that finished for good (restart
        policy) are not waited for: "all" means every worker that is meant to run.
        """
        if not self._ready_waiters:
            return
        counts = self._counts
        wanted = len(self._slots) - counts[S.EXITED] - counts[S.STOPPED]
        if self._scaling_down:
            wanted -= sum(1 for w in self._slots.values()
                          if w.after_stop is AfterStop.REMOVE and not w.state.final)
        ready = counts[S.RUNNING]  # a worker being removed is STOPPING or PENDING, never RUNNING
        keep = []
        for n, reply in self._ready_waiters:
            if ready >= (wanted if n is None else n):
                reply.finish(ready)
            elif n is not None and n > wanted:
                # More than the pool means to run could only be waited for forever.
                reply.finish(error=ValueError(
                    f"wait_ready: n must be at most the {wanted} worker(s) pool {self.spec.name!r} "
                    f"means to run (scale() first), got n={n}"))
            else:
                keep.append((n, reply))
        self._ready_waiters = keep

    def do_cancel(self, reply: Reply, target: Reply) -> None:
        self._ready_waiters = [(n, r) for n, r in self._ready_waiters if r is not target]
        reply.finish()

    def do_status(self, reply: Reply) -> None:
        reply.finish(self._build_status())

    def do_observe(self, reply: Reply, detail: bool) -> None:
        """For metrics and probes (``corral._observe``): ``(summary, statuses or None)``.

        ``detail``: also every worker's :class:`WorkerStatus` (per-worker metrics, /status);
        without it only the pool-wide figures are computed (a scrape every second of a large
        pool stays cheap).
        """
        now = self._clock()
        counts = self._counts
        ready, pids = 0, []
        newest_start, oldest_beat = -math.inf, math.inf
        beats = self._hb.all_beats()
        running = S.RUNNING
        for w in self._slots.values():
            proc = w.proc
            state = w.state
            if state is running and w.ready:
                ready += 1
            if proc is not None and state in _ALIVE:
                pids.append((w.index, proc.pid))
                if proc.started > newest_start:
                    newest_start = proc.started
                beat = beats[w.index]
                if 0 < beat < oldest_beat:
                    oldest_beat = beat
        summary = PoolSummary(
            counts={state.value: n for state, n in counts.items()}, ready=ready,
            wanted=len(self._slots) - counts[S.EXITED] - counts[S.STOPPED],
            pids=tuple(pids), youngest=None if newest_start < 0 else now - newest_start,
            oldest_beat_age=None if oldest_beat == math.inf else now - oldest_beat,
            budget_remaining=self._budget.remaining(now), stopping=self._stopping)
        reply.finish((summary, self._build_status() if detail else None))

    def _publish_facts(self) -> None:
        """Publish what :meth:`observed` reads (the end of a round that changed the pool)."""
        ready, live = 0, []
        running = S.RUNNING
        for w in self._slots.values():
            state = w.state
            if state is running and w.ready:
                ready += 1
            proc = w.proc
            if proc is not None and state in _ALIVE:
                live.append((w.index, proc.pid, proc.started))
        counts = self._counts
        self._facts = PoolFacts(
            version=self._changes, counts={state.value: n for state, n in counts.items()},
            ready=ready, wanted=len(self._slots) - counts[S.EXITED] - counts[S.STOPPED],
            live=tuple(live), pids=tuple((index, pid) for index, pid, _ in live),
            stopping=self._stopping, budget_times=tuple(self._budget.times),
            indexes=tuple(sorted(index for index, _, _ in live)),
            newest_start=max((started for _, _, started in live), default=-math.inf))
        self._published = self._changes

    def observed(self, timeout: float) -> PoolSummary | None:
        """The figures of :meth:`do_observe` (without statuses), from any thread and without
        a round trip: from the facts the loop published, the ages computed now.

        Returns None when the facts are not current (a round is changing the pool, or none
        was published yet) or the pool has finished: ask the loop then.

        Raises:
            TimeoutError: the loop has been in one round for more than ``timeout`` seconds
                (wedged: a round trip would not have been answered in time either).
        """
        got = self.glance(timeout)
        if got is None:
            return None
        facts, youngest, oldest_beat_age, budget_remaining = got
        return PoolSummary(facts.counts, facts.ready, facts.wanted, facts.pids, youngest,
                           oldest_beat_age, budget_remaining, facts.stopping)

    def glance(self, timeout: float) -> tuple[PoolFacts, float | None, float | None,
                                               int | None] | None:
        """``(facts, youngest, oldest_beat_age, budget_remaining)``: :meth:`observed` without
        the summary (a scrape of a pool at rest compares the facts by identity and reads the
        ages alone). None and TimeoutError as there."""
        facts = self._facts
        if facts is None or facts.version != self._changes or self.finished.is_set():
            return None
        busy = self._reactor.busy_for()
        if busy > timeout:
            raise TimeoutError(f"pool {self.spec.name!r}: its loop has been busy {busy:.1f}s")
        beats = self._hb.beats_from_any_thread()
        if beats is None:
            return None
        now = self._clock()
        newest_start = facts.newest_start
        indexes = facts.indexes
        if indexes and indexes[-1] >= len(beats):  # a slot the table has not got yet
            beats = beats + [0.0] * (indexes[-1] + 1 - len(beats))
        # The oldest beat of a live worker that has beaten (0.0: not yet), in C calls: a
        # scrape every second of a large pool stays cheap.
        oldest_beat = min(filter(None, map(beats.__getitem__, indexes)), default=math.inf)
        budget = self._budget.budget
        limit = budget.max_restarts
        return (facts, None if newest_start < 0 else now - newest_start,
                None if oldest_beat == math.inf else now - oldest_beat,
                None if limit is None else limit - sum(
                    1 for t in facts.budget_times if t > now - budget.window))

    def _answer_waiters(self) -> None:
        """Answer everyone still waiting on the monitor once it has finished."""
        for reply in self._stop_waiters + self._rolling_waiters:
            reply.finish()
        for n, reply in self._ready_waiters:
            reply.finish(error=self.not_ready_error(n))
        if self._hosted:
            return  # the host's loop runs on: late hand-overs see `finished` when they run
        for callback, args in self._reactor.drain_inbox():  # came in during the last round
            if callback == self._run_command:
                reply, fn, _ = args
                self._answer_late(reply, fn)
            elif callback == self._spawned_batch:
                for _, result in args[0]:
                    if not isinstance(result, BaseException):
                        result.kill_and_reap()

    def _answer_late(self, reply: Reply, fn: Callable[..., None]) -> None:
        """A command that came after the monitor finished."""
        if fn == self.do_status:
            reply.finish(self._snapshot)
        elif fn in (self.do_stop, self.do_cancel):
            reply.finish()
        elif fn == self.do_wait_ready:
            reply.finish(error=self.not_ready_error(None))
        else:
            reply.finish(error=SupervisorStateError(f"pool {self.spec.name!r} has stopped"))

    # ------------------------------------------------------------------ strategies (groups)

    def _restart_group(self, w: WorkerSlot, trigger: Trigger, now: float,
                       delay: float) -> bool:
        """Under one_for_all / rest_for_one: take ``w``'s group down, to start it together.

        Returns False when ``w`` restarts alone (one_for_one, or no other member to take).
        """
        strategy = self.spec.supervision_strategy
        if strategy is Strategy.ONE_FOR_ONE:
            return False
        others = [m for m in self._slots.values() if m is not w and not m.state.final
                  and m.after_stop is not AfterStop.REMOVE
                  and (strategy is Strategy.ONE_FOR_ALL or m.index > w.index)]
        group = self._group
        if not others and group is None:
            return False
        if group is None:
            group = self._group = GroupRestart(trigger=w.index)
        group.members.add(w.index)
        group.not_before = max(group.not_before, now + delay)
        self._move(w, trigger, S.BACKOFF)
        self._emit(EventKind.RESTARTING, w, delay=delay,
                   message=f"restarting with its group ({strategy.value})")
        detail = f"restarted with worker {w.index}"
        for m in others:
            group.members.add(m.index)
            if m.state is S.BACKOFF:
                self._dl.cancel((m.index, Deadline.BACKOFF))
                continue  # already down: it waits for the group
            if m.state is S.STOPPING:
                if m.after_stop in (AfterStop.POLICY, AfterStop.RESTART):
                    m.after_stop = AfterStop.GROUP
                group.down.add(m.index)
                continue
            group.down.add(m.index)
            self._stop_worker(m, StopReason.GROUP_RESTART, AfterStop.GROUP, now, detail=detail)
        self.log.warning("%s failed: restarting %d worker(s) with it (%s)", w.who,
                         len(group.members), strategy.value)
        self._group_maybe_restart(now)
        return True

    def _group_maybe_restart(self, now: float) -> None:
        group = self._group
        if group is None or group.down:
            return
        if now < group.not_before:
            self._dl.set((POOL, Deadline.GROUP), group.not_before)
            return
        self._group = None
        for index in sorted(group.members):
            m = self._slots.get(index)
            if m is not None and m.state is S.BACKOFF:
                self._move(m, Trigger.BACKOFF_OVER, S.PENDING)
                if index != group.trigger:
                    self._emit(EventKind.RESTARTING, m, delay=0.0,
                               message=f"restarted with worker {group.trigger}")
                self._spawn(m, now)

    def _build_status(self) -> tuple[WorkerStatus, ...]:
        now = self._clock()
        live = not self.finished.is_set()
        out = []
        for index in sorted(self._slots):
            w = self._slots[index]
            proc = w.proc
            reading = (self._hb.read(index) if proc is not None and live and not self._remote
                       else None)
            backoff_at = self._dl.get((index, Deadline.BACKOFF)) if live else None
            out.append(WorkerStatus(
                index=index, name=w.name, pid=proc.pid if proc else None, state=w.state,
                ready=w.ready, restarts=w.restarts,
                started_at=proc.started_wall if proc else None,
                uptime=0.0 if proc is None else now - proc.started,
                heartbeat_age=(now - reading.last_beat if reading and reading.last_beat > 0
                               else w.remote.beat_age if w.remote is not None and proc
                               else None),
                status_text=(reading.status if reading
                             else w.remote.status if w.remote is not None and proc else ""),
                last_exit=w.last_exit,
                next_restart_in=None if backoff_at is None else max(0.0, backoff_at - now)))
        if live:
            out.extend(self._standby_statuses(now))
        return tuple(out)

    def _publish(self) -> None:
        """Keep the final view for ``status()`` calls after the monitor has ended."""
        self._snapshot = self._build_status()
