"""The monitor: the one thread that owns every worker record of a pool.

Data flow::

    public methods --command--> queue --1 byte--> wakeup pipe --+
    spawner thread --result---> queue --1 byte--> wakeup pipe --+
    worker ready() ---------------------1 byte--> wakeup pipe --+--> epoll.poll(timeout)
    worker exits --> pidfd / forkserver sentinel readable ------+        |
    next deadline (backoff over, stop timeout, liveness, dump) --timeout-+
                                                                         v
                                              triggers -> states.check -> actions

It never sleeps a fixed tick: each round blocks until something happens or the next deadline
falls. The fds live in one epoll set, registered as workers come and go, so a round costs the
same with 8 workers as with 512. Starting processes (up to tens of ms under spawn/forkserver) is
done by a separate, long-lived spawner thread, so a restart never delays the supervision of
other workers, and the parent-death signal of the workers is tied to a thread that lives as
long as the pool.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import queue
import random
import select
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from corral import states
from corral._bootstrap import BootConfig, run_worker, signals_to_reset
from corral._deadlines import Deadlines
from corral._fdlimit import explain_fd_error
from corral.errors import GaveUp, SupervisorStateError
from corral.events import Event, EventKind, ExitRecord
from corral.heartbeat import HeartbeatTable
from corral.policy import BackoffState, BudgetWindow
from corral.process import (
    DUMP_SIGNAL,
    WorkerHandle,
    WorkerProcess,
    disown_fd,
    dump_fd_is_ours,
    own_fd,
    read_stack_dump,
    stack_dump_size,
)
from corral.spec import PoolSpec
from corral.states import StopReason, Trigger, WorkerState
from corral.status import WorkerStatus

S = WorkerState
_DUMP_SIGNAL = DUMP_SIGNAL
_DUMP_STEP = 0.005  # how often a stack dump is checked for completion (only while one is due)
_DUMP_MAX = 0.1  # the longest a hung worker may take to write its dump
_HISTORY = 32  # exit records kept for GaveUp and status
_MAX_WAIT = 86400.0  # the longest single wait: a day
# The spawner reports starts queued together in batches of at most this many, or this long.
_SPAWN_BATCH = 32
_SPAWN_BATCH_TIME = 0.005
# A worker recycled for memory is SIGKILLed during its grace once its RSS passes this multiple of
# max_memory, checked every _RECYCLE_CHECK seconds while it stops.
_HARD_MEMORY = 1.25
_RECYCLE_CHECK = 0.1


@dataclass
class _Worker:
    index: int
    name: str
    args: tuple[Any, ...]
    backoff: BackoffState
    state: WorkerState = S.PENDING
    proc: WorkerProcess | None = None
    generation: int = 0
    restarts: int = 0
    ready: bool = False
    last_exit: ExitRecord | None = None
    # Set when corral decided to stop the current process: why, and what follows its exit.
    stop_reason: StopReason | None = None
    after_stop: str = "policy"  # "policy" | "restart" | "remove" | "stay"
    stop_detail: str | None = None
    dump_started: float = 0.0
    dump_size: int = -1
    started_once: bool = False
    health_failures: int = 0
    health_pending: Future[bool] | None = None
    health_last: str = ""
    last_restart: float = 0.0  # monotonic time its latest restart was queued (0: none yet)

    @property
    def who(self) -> str:
        pid = self.proc.pid if self.proc else None
        return f"worker {self.name!r} (index {self.index}, pid {pid})"


@dataclass
class _Command:
    name: str
    args: tuple[Any, ...] = ()
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()


class Monitor:
    """Runs a pool. Created and driven by :class:`corral.Supervisor`; not public."""

    def __init__(self, spec: PoolSpec, emit: Callable[[Event], None]) -> None:
        self.spec = spec
        self._emit_cb = emit
        # One logger per pool ("corral.pool.<name>"), so a pool's logs can be tuned alone.
        self.log = logging.getLogger(f"corral.pool.{spec.name}")
        self._ctx = multiprocessing.get_context(spec.start_method)
        if spec.start_method == "forkserver":
            _preload_for_forkserver(self._ctx, spec.target)
        # The heartbeat table first: it is the one resource that can fail for lack of space,
        # and nothing else exists yet to clean up if it does.
        self._hb = HeartbeatTable(spec.workers)
        own_fd(self._hb.fd)
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        try:
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except BaseException:
            self._hb.close()
            raise
        own_fd(self._wake_r)
        own_fd(self._wake_w)
        self._wake_lock = threading.Lock()  # _wake() must never write to a closed, reused fd
        self._spawn_q: queue.SimpleQueue[tuple[int, int, BootConfig, tuple[Any, ...]] | None] = (
            queue.SimpleQueue())
        self._workers: dict[int, _Worker] = {}  # index -> its record; only via _add/_remove
        self._counts: dict[WorkerState, int] = dict.fromkeys(WorkerState, 0)  # per state
        self._dense = True  # the indexes are 0..len(_workers)-1 (the liveness fast path)
        self._hbt = spec.heartbeat_timeout or 0.0
        self._steady = 0  # see _note_steady
        self._scaling_down = False  # some worker is on its way out (after_stop == "remove")
        self._by_fd: dict[int, _Worker] = {}
        try:
            self._poller = select.epoll()
        except BaseException:
            self._close_fds()
            raise
        self._poller.register(self._wake_r, select.EPOLLIN)
        # Processes that exist and are not reaped yet, for signals sent from other threads
        # (stop(wait=False)); the monitor adds and removes under the lock, before reaping.
        self._live_lock = threading.Lock()
        self._live: dict[int, WorkerProcess] = {}
        self._deadlines: Deadlines[Any] = Deadlines()
        # When to look at the workers' heartbeats next (the pool's one liveness deadline, kept
        # apart from the heap because it moves at every look); inf: not needed.
        self._live_at = math.inf
        self._budget = BudgetWindow(spec.budget)
        self._history: deque[ExitRecord] = deque(maxlen=_HISTORY)
        self._rng = random.Random()
        self._stopping = False
        self._stop_request: float | None = None  # set by request_stop() before any signal
        self._stop_deadline = 0.0  # monotonic; set once stopping begins
        self._stop_waiters: list[_Command] = []
        self._rolling: deque[int] = deque()
        self._rolling_current: int | None = None
        self._rolling_waiters: list[_Command] = []
        self._ready_waiters: list[tuple[int | None, _Command]] = []
        self.gave_up: GaveUp | None = None
        self.finished = threading.Event()
        self._snapshot: tuple[WorkerStatus, ...] = ()
        self._thread = threading.Thread(target=self._run, name=f"corral-monitor[{spec.name}]",
                                        daemon=True)
        self._spawner = threading.Thread(target=self._spawn_loop,
                                         name=f"corral-spawner[{spec.name}]", daemon=True)
        self._needs_ready_scan = spec.ready_when != "started"
        # Under fork the child shares our mapping of the table and keeps the wakeup pipe's
        # write end: nothing to open or map at each start.
        self._fork_extras: dict[str, Any] = {}
        if spec.start_method == "fork":
            self._fork_extras = dict(forked=True, table=self._hb, wake_fd=self._wake_w)
        # Health checks and memory readings run here, never on the monitor thread.
        self._checks: ThreadPoolExecutor | None = None
        # Memory readings get their own thread: hung health checks cannot starve recycling.
        self._memory_reader: ThreadPoolExecutor | None = None
        self._memory_pending = False

    # ----------------------------------------------------------------- called from other threads

    def start(self, initial: list[tuple[str, tuple[Any, ...]]]) -> None:
        for index, (name, args) in enumerate(initial):
            self._add(_Worker(index, name, args, BackoffState(self.spec.backoff)))
        self._spawner.start()
        self._thread.start()

    def discard(self) -> None:
        """Undo a monitor whose start() did not complete (no process was started)."""
        self._spawn_q.put(None)
        self._close_fds()

    def call(self, name: str, *args: Any, wait: bool = True, timeout: float | None = None) -> Any:
        """Run a command on the monitor thread; wait for its result unless ``wait`` is False."""
        cmd = self.submit(name, *args)
        if not wait:
            return None
        if not cmd.done.wait(timeout):
            raise TimeoutError(f"{name} did not finish within {timeout} s")
        if cmd.error is not None:
            raise cmd.error
        return cmd.result

    def submit(self, name: str, *args: Any) -> _Command:
        """Queue a command for the monitor thread.

        Raises:
            RuntimeError: the pool has stopped (except for "stop" and "status", answered at once).
        """
        cmd = _Command(name, args)
        # Under the lock, a command is either queued before the monitor's final drain or sees
        # `finished`: it can never be left unanswered.
        with self._wake_lock:
            if not self.finished.is_set():
                self._commands.put(cmd)
                with contextlib.suppress(BlockingIOError, OSError):
                    os.write(self._wake_w, b"\0")
                return cmd
        if name == "status":
            cmd.finish(self._snapshot)
        elif name in ("stop", "cancel"):
            cmd.finish()
        else:
            raise RuntimeError(f"pool {self.spec.name!r} has stopped")
        return cmd

    def _post(self, name: str, *args: Any) -> None:
        """Hand a result to the monitor thread from any other thread."""
        self._commands.put(_Command(name, args))
        self._wake()

    def snapshot(self) -> tuple[WorkerStatus, ...]:
        return self._snapshot

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def request_stop(self, grace: float, sig: int) -> None:
        """Begin stopping the pool from the calling thread (any thread).

        The stop signal reaches every live worker's group before this returns, even if the
        process exits right after (Duck's ``App.stop()`` calls ``os._exit`` next). The monitor
        is told first, so an exit this signal causes is never taken for a crash.
        """
        self._stop_request = grace
        self._signal_now(sig)
        self.submit("stop", grace)

    def _signal_now(self, sig: int) -> None:
        with self._live_lock:
            for proc in self._live.values():
                if sig == signal.SIGKILL:
                    proc.send_group(sig)
                else:
                    proc.send_stop(sig)

    def _wake(self) -> None:
        with self._wake_lock, contextlib.suppress(BlockingIOError, OSError):
            if self._wake_w >= 0:
                os.write(self._wake_w, b"\0")

    # ------------------------------------------------------------------------- spawner thread

    def _spawn_loop(self) -> None:
        target: Callable[..., Any] = run_worker
        queue_ = self._spawn_q
        while True:
            item = queue_.get()
            # Starts queued together (a pool's start, a scale-up) are reported together: one
            # wake-up of the monitor for the batch, not one per process. A lone restart is
            # reported at once.
            batch: list[tuple[int, int, WorkerProcess | BaseException]] = []
            began = time.monotonic()
            while item is not None:
                index, generation, boot, args = item
                result: WorkerProcess | BaseException
                if self._stopping:
                    result = _SpawnSkipped()
                else:
                    try:
                        result = WorkerProcess.start(
                            self._ctx, target, (boot, self.spec.target, args), boot.name,
                            self.spec.daemon)
                    except BaseException as exc:  # reported to the monitor as a failed start
                        result = exc
                batch.append((index, generation, result))
                if len(batch) >= _SPAWN_BATCH or time.monotonic() - began > _SPAWN_BATCH_TIME:
                    break
                try:
                    item = queue_.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._post("spawned", batch)
            if item is None:
                return

    # --------------------------------------------------------------------------- monitor loop

    def _run(self) -> None:
        try:
            now = time.monotonic()
            for w in list(self._workers.values()):
                self._spawn(w, now)
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
            self._spawn_q.put(None)

    def _round(self) -> None:
        live_at = self._live_at
        heap_due = self._deadlines.peek()  # may be a cancelled entry: then we wake early
        due = live_at if heap_due is None or live_at < heap_due else heap_due
        if due == math.inf:
            ready = self._poller.poll(-1)
        else:
            # A far deadline (stop(timeout=math.inf)) is no reason to overflow epoll's int of ms.
            ready = self._poller.poll(min(_MAX_WAIT, max(0.0, due - time.monotonic())))
        if not ready and self._stop_request is None:
            # The idle round of a pool with heartbeats (a liveness look every ~second): kept
            # lean, since on a VM the wake-up itself is most of its cost.
            now = time.monotonic()
            if live_at <= now:
                # Every worker RUNNING and beating (the steady state): the next look is due one
                # timeout after the oldest beat, found in C.
                n = self._steady
                oldest = self._hb.oldest_beat(n) if n else 0.0
                if oldest > 0 and oldest + self._hbt > now:
                    self._live_at = oldest + self._hbt
                else:
                    self._live_at = math.inf
                    self._check_liveness(now)
            if heap_due is not None and heap_due <= now:
                for key in self._deadlines.pop_due(now):
                    self._on_deadline(key, now)
            if self._stopping:
                self._maybe_finish()
            return
        if self._stop_request is not None and not self._stopping:
            # Before any exit of this round: a worker our stop signal ended is no crash.
            self._begin_stop(self._stop_request, StopReason.SHUTDOWN, time.monotonic())
        if ready:
            self._on_ready(ready)
        now = time.monotonic()
        if self._live_at <= now:
            self._live_at = math.inf
            self._check_liveness(now)
        if self._deadlines.peek() is not None:
            for key in self._deadlines.pop_due(now):
                self._on_deadline(key, now)
        # Workers reach a final state only through an exit or a command (a deadline at most
        # starts a stop), so only such rounds look for the end.
        self._maybe_finish()

    def _on_ready(self, ready: list[tuple[int, int]]) -> None:
        woke = False
        for fd, _ in ready:
            if fd == self._wake_r:
                woke = True
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wake_r, 4096):
                        pass
            else:
                w = self._by_fd.get(fd)
                if w is not None:
                    self._on_exit(w)
        if woke:
            while True:
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    break
                self._dispatch(cmd)
            if self._needs_ready_scan:
                self._scan_ready(time.monotonic())

    def _dispatch(self, cmd: _Command) -> None:
        handler = getattr(self, f"_cmd_{cmd.name}")
        try:
            handler(cmd)
        except Exception as exc:
            cmd.finish(error=exc)

    # ------------------------------------------------------------------------------ transitions

    def _move(self, w: _Worker, trigger: Trigger, new: WorkerState) -> None:
        states.check(w.state, trigger, new, w.who)
        self._counts[w.state] -= 1
        self._counts[new] += 1
        w.state = new
        self._note_steady()

    def _add(self, w: _Worker) -> None:
        self._workers[w.index] = w
        self._counts[w.state] += 1
        self._dense = max(self._workers) == len(self._workers) - 1
        self._note_steady()

    def _remove(self, w: _Worker) -> None:
        del self._workers[w.index]
        self._counts[w.state] -= 1
        self._dense = not self._workers or max(self._workers) == len(self._workers) - 1
        self._note_scaling()
        self._note_steady()

    def _note_steady(self) -> None:
        """``_steady``: n when heartbeats are watched and workers 0..n-1 are all RUNNING (then
        one C-level min over their beats decides the next liveness look), else 0."""
        n = len(self._workers)
        self._steady = (n if self._hbt and self._dense and self._counts[S.RUNNING] == n
                        else 0)

    def _note_scaling(self) -> None:
        self._scaling_down = any(w.after_stop == "remove" for w in self._workers.values())

    def _spawn(self, w: _Worker, now: float) -> None:
        """Queue a start of ``w`` for the spawner thread (state PENDING)."""
        w.generation += 1
        w.ready = False
        # A new process starts with a clean health record: a check still hanging on its
        # predecessor is not its fault.
        w.health_pending, w.health_failures, w.health_last = None, 0, ""
        self._hb.reset(w.index)
        if w.started_once:
            w.restarts += 1
            w.last_restart = now
        w.started_once = True
        boot = BootConfig(
            pool=self.spec.name, index=w.index, name=w.name, supervisor_pid=os.getpid(),
            heartbeat_path=self._hb.path, wake_path=f"/proc/{os.getpid()}/fd/{self._wake_w}",
            ready_on_beat=self.spec.ready_when == "beat",
            dump_signal=_DUMP_SIGNAL,
            forkserver=self.spec.start_method == "forkserver",
            reset_signals=signals_to_reset() if self._fork_extras else None,
            **self._fork_extras)
        self._spawn_q.put((w.index, w.generation, boot, w.args))

    def _cmd_spawned(self, cmd: _Command) -> None:
        (batch,) = cmd.args
        cmd.finish()
        for index, generation, result in batch:
            self._spawned(index, generation, result)

    def _spawned(self, index: int, generation: int, result: WorkerProcess | BaseException,
                 ) -> None:
        w = self._workers.get(index)
        if w is None or w.generation != generation or w.state is not S.PENDING:
            if isinstance(result, WorkerProcess):  # a start nobody wants any more
                result.send_group(signal.SIGKILL)
                self._orphans_reap(result)
            return
        now = time.monotonic()
        if isinstance(result, BaseException):
            if isinstance(result, _SpawnSkipped):
                self._move(w, Trigger.SPAWN_FAILED, S.STOPPED)
                return
            text = explain_fd_error(result)
            self.log.error("%s: could not start a process: %s", w.who, text,
                           exc_info=result if not isinstance(result, OSError) else None)
            record = ExitRecord(w.index, w.name, None, None, StopReason.SPAWN_FAILED,
                                time.time(), 0.0, text)
            self._after_death(w, Trigger.SPAWN_FAILED, record, now)
            return
        w.proc = result
        with self._live_lock:
            self._live[result.pid] = result
        fd = result.waitable()
        self._by_fd[fd] = w
        self._poller.register(fd, select.EPOLLIN)
        self._move(w, Trigger.SPAWNED, S.STARTING)
        self.log.info("%s started", w.who)
        self._emit(EventKind.SPAWNED, w)
        if w.stop_reason is not None:
            # Stopped while it was being started: stop it now that it exists, within what is
            # left of the pool's deadline if the whole pool is stopping.
            grace = max(0.0, self._stop_deadline - now) if self._stopping else None
            self._signal_stop(w, now, grace=grace)
            return
        if self.spec.max_age is not None:
            jitter = self._rng.uniform(-self.spec.max_age_jitter, self.spec.max_age_jitter)
            self._deadlines.set((w.index, "age"), result.started + self.spec.max_age * (1 + jitter))
        if self.spec.max_memory is not None and ("pool", "memory") not in self._deadlines:
            self._deadlines.set(("pool", "memory"), now + self.spec.memory_check_interval)
        if self.spec.ready_when == "started":
            self._become_ready(w)
        self._arm_liveness(w, now)

    def _become_ready(self, w: _Worker) -> None:
        self._move(w, Trigger.READY, S.RUNNING if w.state is not S.STOPPING else S.STOPPING)
        if w.state is S.RUNNING:
            w.ready = True
            self.log.debug("%s is ready", w.who)
            self._emit(EventKind.READY, w)
            now = time.monotonic()
            self._arm_liveness(w, now)
            if self.spec.health_check is not None:
                w.health_failures = 0
                self._deadlines.set((w.index, "health"), now + self.spec.health_check_interval)
            self._check_rolling(w)
            self._check_ready_waiters()

    def _scan_ready(self, now: float) -> None:
        for w in self._workers.values():
            if w.state is S.STARTING and w.proc is not None and (
                    self._hb.ready_at(w.index) > 0
                    or (self.spec.ready_when == "beat" and self._hb.last_beat(w.index) > 0)):
                self._become_ready(w)

    # ---------------------------------------------------------------------------- exits

    def _on_exit(self, w: _Worker) -> None:
        proc = w.proc
        assert proc is not None
        # Take the rest of its group down while the dead worker still holds the group id, and
        # stop other threads signalling it before its pid can be reused.
        proc.kill_group_leftovers()
        with self._live_lock:
            self._live.pop(proc.pid, None)
        status = proc.reap()
        if status is None:
            with self._live_lock:
                self._live[proc.pid] = proc
            return  # not really gone yet (cannot happen with pidfds); wait again
        fd = proc.waitable()
        del self._by_fd[fd]
        self._poller.unregister(fd)
        proc.close()
        now = time.monotonic()
        for kind in ("kill", "dump", "health", "health_timeout", "age"):
            self._deadlines.cancel((w.index, kind))
        if w.stop_reason is not None:
            reason = w.stop_reason
        elif status.signal is not None:
            reason = StopReason.KILLED
        else:
            reason = StopReason.EXITED
        record = ExitRecord(w.index, w.name, proc.pid, status, reason, time.time(),
                            now - proc.started, w.stop_detail)
        w.proc = None
        w.ready = False
        self._after_death(w, Trigger.EXITED, record, now)

    def _after_death(self, w: _Worker, trigger: Trigger, record: ExitRecord, now: float) -> None:
        """Record an ended process and decide what comes next for its worker."""
        w.last_exit = record
        self._history.append(record)
        after, w.stop_reason, w.stop_detail = w.after_stop, None, None
        w.after_stop = "policy"
        self._log_exit(record)
        self._emit(EventKind.EXITED, w, exit=record)
        if self._stopping or after == "stay":
            self._move(w, trigger, S.STOPPED)
        elif after == "remove":
            self._move(w, trigger, S.STOPPED)
            self._remove(w)
            self._check_ready_waiters()
        elif after == "restart":
            self._move(w, trigger, S.PENDING)
            self._emit(EventKind.RESTARTING, w, delay=0.0)
            self._spawn(w, now)
        else:
            self._restart_per_policy(w, trigger, record, now)
        if self._rolling_current == w.index and w.state is not S.PENDING:
            self._rolling_advance()  # the rolling restart cannot wait for this one

    def _restart_per_policy(self, w: _Worker, trigger: Trigger, record: ExitRecord,
                            now: float) -> None:
        clean = (record.exit is not None and record.exit.clean
                 and record.reason is StopReason.EXITED)
        if not self.spec.restart_policy.wants_restart(clean_exit=clean):
            self._move(w, trigger, S.EXITED)
            self._check_ready_waiters()
            self.log.info("%s will not be restarted (restart=%r)", w.who,
                     self.spec.restart_policy.value)
            return
        if not self._budget.try_spend(now):
            self._move(w, trigger, S.STOPPED)
            self._give_up(now)
            return
        delay = w.backoff.on_death(record.uptime, self._rng)
        cooldown = self.spec.restart_cooldown
        if cooldown > 0 and w.last_restart > 0:
            # At least `cooldown` between two restarts of this worker: the first is at once,
            # a crash loop is throttled, a worker that ran longer than that restarts at once.
            delay = max(delay, w.last_restart + cooldown - now)
        self._emit(EventKind.RESTARTING, w, delay=delay)
        if delay <= 0:
            self._move(w, trigger, S.PENDING)
            self._spawn(w, now)
        else:
            self._move(w, trigger, S.BACKOFF)
            self.log.info("%s restarts in %.3fs (failure %d in a row)", w.who, delay,
                          w.backoff.streak)
            self._deadlines.set((w.index, "backoff"), now + delay)

    def _log_exit(self, record: ExitRecord) -> None:
        if record.reason.by_corral:
            self.log.info("%s", record.describe())
        else:
            self.log.warning("%s", record.describe())
        if record.detail and record.reason in (StopReason.HUNG, StopReason.STARTUP_TIMEOUT):
            self.log.warning("stack of hung worker %r (pid %s):\n%s", record.name, record.pid,
                        record.detail)

    def _give_up(self, now: float) -> None:
        budget = self.spec.budget
        last = list(self._history)[-10:]
        lines = "\n".join("  " + r.describe() for r in last)
        message = (f"pool {self.spec.name!r} gave up: more than {budget.max_restarts} restarts "
                   f"within {budget.window:g}s. Last exits:\n{lines}")
        self.log.error("%s", message)
        self.gave_up = GaveUp(message, last)
        self._emit(EventKind.GAVE_UP, None, message=message)
        self._begin_stop(self.spec.stop_timeout, StopReason.GAVE_UP, now)

    # ------------------------------------------------------------------------------- stopping

    def _stop_worker(self, w: _Worker, reason: StopReason, after: str, now: float,
                     detail: str | None = None, dump: bool = False) -> None:
        """Stop one worker's process gracefully; ``after`` says what follows its exit."""
        if w.state is S.STOPPING:
            # Already going: keep the stronger follow-up (a shutdown beats a restart).
            if after in ("stay", "remove"):
                w.after_stop = after
            return
        w.stop_reason, w.after_stop, w.stop_detail = reason, after, detail
        if w.state is S.PENDING:
            self._move(w, Trigger.STOP, S.PENDING)  # stopped as soon as its process appears
            return
        self._move(w, Trigger.STOP, S.STOPPING)
        assert w.proc is not None
        if dump and self._request_dump(w, now):
            return
        self._signal_stop(w, now)

    def _signal_stop(self, w: _Worker, now: float, grace: float | None = None) -> None:
        if w.state is not S.STOPPING:
            self._move(w, Trigger.STOP, S.STOPPING)
        assert w.proc is not None
        grace = self.spec.stop_timeout if grace is None else grace
        if grace <= 0:
            self._kill(w, at_once=True)
            return
        w.proc.send_stop(self.spec.stop_signal)
        if (w.index, "kill") not in self._deadlines:
            self._deadlines.set((w.index, "kill"), now + grace)

    def _kill(self, w: _Worker, at_once: bool = False) -> None:
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
                self._deadlines.set(("pool", "kill"), self._stop_deadline)
            return
        self._stopping = True
        self._stop_deadline = now + timeout
        self._rolling.clear()
        for w in list(self._workers.values()):
            self._deadlines.cancel((w.index, "backoff"))
            if w.state in (S.BACKOFF, S.EXITED):
                self._move(w, Trigger.STOP, S.STOPPED)
            elif w.state is S.STOPPING:
                w.after_stop = "stay"
                w.stop_reason = w.stop_reason or reason
            elif w.state in (S.PENDING, S.STARTING, S.RUNNING):
                w.stop_reason, w.after_stop = reason, "stay"
                if w.state is S.PENDING:
                    self._move(w, Trigger.STOP, S.PENDING)
                else:
                    self._move(w, Trigger.STOP, S.STOPPING)
                    self._signal_stop(w, now, grace=timeout)
        self._live_at = math.inf
        # One deadline for the whole pool: stragglers are killed together.
        for w in self._workers.values():
            self._deadlines.cancel((w.index, "kill"))
        # Always set, even for 0: workers already STOPPING (a restart in progress) lost their
        # own kill deadline just above.
        self._deadlines.set(("pool", "kill"), now + timeout)

    def _maybe_finish(self) -> None:
        counts = self._counts
        final = counts[S.EXITED] + counts[S.STOPPED]
        if not self._stopping:
            if self._workers and final == len(self._workers) and not self._rolling_waiters:
                # Every worker finished and none will be restarted: the pool is done.
                self.log.info("pool %r: every worker has finished", self.spec.name)
                self._begin_stop(0.0, StopReason.SHUTDOWN, time.monotonic())
            else:
                return
        if final < len(self._workers):
            return
        self._deadlines = Deadlines()
        self._publish()
        for executor in (self._checks, self._memory_reader):
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)
        self._close_fds()
        with self._wake_lock:
            self.finished.set()
        self._emit(EventKind.STOPPED, None, message="gave up" if self.gave_up else "stopped")
        self._answer_waiters()
        self.log.info("pool %r stopped", self.spec.name)

    def _close_fds(self) -> None:
        """Release the pool's own fds: the wakeup pipe, the epoll set, the heartbeat table."""
        with self._wake_lock:
            for fd in (self._wake_r, self._wake_w):
                if fd >= 0:
                    disown_fd(fd)
                    os.close(fd)
            self._wake_r = self._wake_w = -1
        poller = getattr(self, "_poller", None)
        if poller is not None and not poller.closed:
            poller.close()
        disown_fd(self._hb.fd)
        self._hb.close()

    def _answer_waiters(self) -> None:
        """Answer everyone still waiting on the monitor once it has finished."""
        for cmd in self._stop_waiters + self._rolling_waiters:
            cmd.finish()
        for n, cmd in self._ready_waiters:
            cmd.finish(error=self.not_ready_error(n))
        while True:  # commands that came in during the last round
            try:
                late = self._commands.get_nowait()
            except queue.Empty:
                break
            if late.name == "status":
                late.finish(self._snapshot)
            elif late.name in ("stop", "cancel", "spawned", "health_result", "memory_result"):
                late.finish()
            else:
                late.finish(error=RuntimeError(f"pool {self.spec.name!r} has stopped"))

    def _emergency_kill(self) -> None:
        for w in self._workers.values():
            if w.proc is not None:
                with contextlib.suppress(Exception):
                    w.proc.send_group(signal.SIGKILL)
                    self._orphans_reap(w.proc)
        with contextlib.suppress(Exception):
            self._close_fds()
        with self._wake_lock:
            self.finished.set()
        self._answer_waiters()

    @staticmethod
    def _orphans_reap(proc: WorkerProcess) -> None:
        # Blocking reap of a SIGKILLed process: takes well under a millisecond.
        multiprocessing.connection.wait([proc.waitable()], timeout=5)
        proc.kill_group_leftovers()
        proc.reap()
        proc.close()

    # ------------------------------------------------------------------------------ deadlines

    def _on_deadline(self, key: Hashable, now: float) -> None:
        assert isinstance(key, tuple)
        owner, kind = key
        if owner == "pool":
            if kind == "kill":
                for straggler in self._workers.values():
                    if straggler.state is S.STOPPING:
                        self._kill(straggler)
            elif kind == "memory":
                self._measure_memory(now)
            return
        w = self._workers.get(owner)
        if w is None:
            return
        if kind == "backoff" and w.state is S.BACKOFF:
            self._move(w, Trigger.BACKOFF_OVER, S.PENDING)
            self._spawn(w, now)
        elif kind == "kill" and w.state is S.STOPPING:
            self._move(w, Trigger.KILL, S.STOPPING)
            self._kill(w)
        elif kind == "dump" and w.state is S.STOPPING:
            self._collect_dump(w, now)
        elif kind == "health" and w.state is S.RUNNING:
            self._run_health_check(w, now)
        elif kind == "health_timeout" and w.state is S.RUNNING:
            self._health_failed(w, f"health check still running after "
                                   f"{self.spec.health_check_timeout:g}s", now)
        elif kind == "age" and w.state in (S.STARTING, S.RUNNING):
            assert w.proc is not None
            self._stop_worker(w, StopReason.RECYCLED_AGE, "restart", now,
                              detail=f"age {now - w.proc.started:.1f}s > max_age "
                                     f"{self.spec.max_age:g}s")

    # ------------------------------------------------------------------ liveness and evidence

    def _arm_liveness(self, w: _Worker, now: float) -> None:
        """Make sure the liveness deadline covers a newly started (or ready) worker."""
        last = self._hb.last_beat(w.index)
        due = self._due(w, last)
        if due is None:
            return
        when = self._next_look(due[0], last, now)
        if when < self._live_at:
            self._live_at = when

    def _next_look(self, due: float, last: float, now: float) -> float:
        """When to look at a worker next: its due time, or sooner while it has never beaten.

        A first beat wakes nobody, so a worker inside a long startup grace is looked at again
        after one heartbeat timeout; from then on its deadline is ``last beat + timeout``.
        """
        hbt = self.spec.heartbeat_timeout
        if last == 0.0 and hbt is not None:
            return min(due, now + hbt)
        return due

    def _due(self, w: _Worker, last: float) -> tuple[float, StopReason] | None:
        """When ``w`` must next have shown life, and what it is if it has not.

        Args:
            last: the worker's last beat (monotonic; 0 = never).
        """
        state = w.state
        if w.proc is None or (state is not S.RUNNING and state is not S.STARTING):
            return None
        hbt, sut = self.spec.heartbeat_timeout, self.spec.startup_timeout
        if state is S.STARTING and sut is not None:
            # Still in its startup grace: only the grace counts, however it beats.
            return w.proc.started + sut, StopReason.STARTUP_TIMEOUT
        if hbt is None:
            return None
        if last > 0:
            return last + hbt, StopReason.HUNG
        # Never beat: allowed the startup grace (or one heartbeat timeout) from its start.
        return w.proc.started + (sut if sut is not None else hbt), StopReason.STARTUP_TIMEOUT

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
        if self._needs_ready_scan:
            self._scan_ready(now)
        beats = self._hb.all_beats()
        earliest: float | None = None
        late: list[tuple[_Worker, StopReason, float]] = []
        for w in self._workers.values():
            due = self._due(w, beats[w.index])
            if due is None:
                continue
            if due[0] > now:
                when = self._next_look(due[0], beats[w.index], now)
                if earliest is None or when < earliest:
                    earliest = when
            else:
                late.append((w, due[1], beats[w.index]))
        for w, reason, last in late:
            assert w.proc is not None
            what = (f"no heartbeat for {now - last:.3f}s" if reason is StopReason.HUNG
                    else f"not ready {now - w.proc.started:.3f}s after start")
            self.log.warning("%s is %s (%s); collecting a stack dump, then stopping it", w.who,
                             reason.value, what)
            self._emit(EventKind.UNHEALTHY, w, message=f"{reason.value}: {what}")
            self._stop_worker(w, reason, "policy", now, detail=what, dump=True)
        if earliest is not None:
            self._live_at = earliest

    def _request_dump(self, w: _Worker, now: float) -> bool:
        assert w.proc is not None
        fd = self._hb.read(w.index).dump_fd
        if fd < 0:
            return False
        if not dump_fd_is_ours(w.proc.pid, fd):
            # The worker closed its fds (and may have opened a file of its own on that number):
            # a dump would land in the user's file. Go without one, and say why.
            note = (f"(no stack dump: the worker closed or replaced corral's dump file, fd {fd})")
            w.stop_detail = f"{w.stop_detail}\n{note}" if w.stop_detail else note
            return False
        w.dump_size, w.dump_started = -1, now
        if not w.proc.send(_DUMP_SIGNAL):
            return False
        w.proc.send(signal.SIGCONT)  # a SIGSTOPped worker can still run the C handler
        self._deadlines.set((w.index, "dump"), now + _DUMP_STEP)
        return True

    def _collect_dump(self, w: _Worker, now: float) -> None:
        assert w.proc is not None
        fd = self._hb.read(w.index).dump_fd
        size = stack_dump_size(w.proc.pid, fd)
        done = size > 0 and size == w.dump_size
        if not done and now - w.dump_started < _DUMP_MAX:
            w.dump_size = size
            self._deadlines.set((w.index, "dump"), now + _DUMP_STEP)
            return
        text = read_stack_dump(w.proc.pid, fd)
        if not text:
            text = "(no stack dump: the process could not run the handler, e.g. it was stopped)"
        w.stop_detail = f"{w.stop_detail}\n{text}" if w.stop_detail else text
        self._signal_stop(w, now, grace=self.spec.kill_grace)

    # ------------------------------------------------------------- health checks and recycling

    def _executor(self) -> ThreadPoolExecutor:
        if self._checks is None:
            self._checks = ThreadPoolExecutor(
                max_workers=max(2, min(64, len(self._workers) + 1)),
                thread_name_prefix=f"corral-check[{self.spec.name}]")
        return self._checks

    def _run_health_check(self, w: _Worker, now: float) -> None:
        check = self.spec.health_check
        assert check is not None and w.proc is not None
        interval = self.spec.health_check_interval
        if w.health_pending is not None and not w.health_pending.done():
            # The previous call still hangs: that is one more failure, and no second thread.
            self._health_failed(w, "health check still running (hung)", now)
            if w.state is S.RUNNING:
                self._deadlines.set((w.index, "health"), now + interval)
            return
        handle = WorkerHandle(w.proc, w.index)
        future = self._executor().submit(check, handle, w.index)
        w.health_pending = future
        generation = w.generation
        future.add_done_callback(
            lambda f: self._post("health_result", w.index, generation, f))
        self._deadlines.set((w.index, "health_timeout"), now + self.spec.health_check_timeout)

    def _cmd_health_result(self, cmd: _Command) -> None:
        index, generation, future = cmd.args
        cmd.finish()
        w = self._workers.get(index)
        if w is None or w.generation != generation or w.state is not S.RUNNING:
            return
        if (index, "health_timeout") not in self._deadlines:
            return  # already counted as a timeout
        self._deadlines.cancel((index, "health_timeout"))
        now = time.monotonic()
        error = future.exception()
        if error is None and future.result() is True:
            w.health_failures, w.health_last = 0, "ok"
        elif error is not None:
            self._health_failed(w, f"health check raised {type(error).__name__}: {error}", now)
        else:
            self._health_failed(w, f"health check returned {future.result()!r}", now)
        if w.state is S.RUNNING:
            self._deadlines.set((index, "health"), now + self.spec.health_check_interval)

    def _health_failed(self, w: _Worker, why: str, now: float) -> None:
        self._deadlines.cancel((w.index, "health_timeout"))
        w.health_failures += 1
        w.health_last = why
        threshold = self.spec.failure_threshold
        self.log.warning("%s: %s (failure %d of %d)", w.who, why, w.health_failures, threshold)
        if w.health_failures >= threshold:
            self._emit(EventKind.UNHEALTHY, w, message=why)
            self._stop_worker(w, StopReason.UNHEALTHY, "policy", now,
                              detail=f"{threshold} failed health checks in a row; last: {why}")
        elif (w.index, "health") not in self._deadlines:
            self._deadlines.set((w.index, "health"), now + self.spec.health_check_interval)

    def _measure_memory(self, now: float) -> None:
        # A worker in its graceful recycle is watched closely: it may still be growing.
        recycling = any(w.state is S.STOPPING and w.stop_reason is StopReason.RECYCLED_MEMORY
                        for w in self._workers.values())
        interval = self.spec.memory_check_interval
        if recycling:
            interval = min(interval, _RECYCLE_CHECK)
        self._deadlines.set(("pool", "memory"), now + interval)
        if self._memory_pending:
            return
        targets = [(w.index, w.generation, w.proc.pid) for w in self._workers.values()
                   if w.proc is not None and (w.state in (S.STARTING, S.RUNNING) or (
                       w.state is S.STOPPING and w.stop_reason is StopReason.RECYCLED_MEMORY))]
        if not targets:
            self._deadlines.cancel(("pool", "memory"))
            return
        self._memory_pending = True
        if self._memory_reader is None:
            self._memory_reader = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"corral-memory[{self.spec.name}]")
        future = self._memory_reader.submit(_measure_rss, targets)
        future.add_done_callback(lambda f: self._post("memory_result", f))

    def _cmd_memory_result(self, cmd: _Command) -> None:
        (future,) = cmd.args
        cmd.finish()
        self._memory_pending = False
        limit = self.spec.max_memory
        if future.exception() is not None or limit is None:
            return
        now = time.monotonic()
        for index, generation, rss in future.result():
            w = self._workers.get(index)
            if w is None or w.generation != generation or rss <= limit:
                continue
            if w.state in (S.STARTING, S.RUNNING):
                self._stop_worker(w, StopReason.RECYCLED_MEMORY, "restart", now,
                                  detail=f"RSS {rss / 2**20:.1f} MiB > max_memory "
                                         f"{limit / 2**20:.1f} MiB")
                due = self._deadlines.get(("pool", "memory"))
                if due is not None and due > now + _RECYCLE_CHECK:
                    self._deadlines.set(("pool", "memory"), now + _RECYCLE_CHECK)
            elif (w.state is S.STOPPING and w.stop_reason is StopReason.RECYCLED_MEMORY
                  and rss > limit * _HARD_MEMORY and w.proc is not None):
                # Its graceful stop must not let memory run away: past the hard limit, SIGKILL.
                self.log.warning("%s still grows during its graceful recycle (RSS %.1f MiB > "
                                 "%.0f%% of max_memory); sending SIGKILL", w.who, rss / 2**20,
                                 _HARD_MEMORY * 100)
                w.stop_detail = (f"{w.stop_detail}; killed at RSS {rss / 2**20:.1f} MiB during "
                                 "the grace")
                w.proc.send_group(signal.SIGKILL)

    # -------------------------------------------------------------------------------- commands

    def _cmd_stop(self, cmd: _Command) -> None:
        (timeout,) = cmd.args
        if self.finished.is_set():
            cmd.finish()
            return
        self._stop_waiters.append(cmd)
        self._begin_stop(self.spec.stop_timeout if timeout is None else timeout,
                         StopReason.SHUTDOWN, time.monotonic())

    def _check_not_stopping(self) -> None:
        if self._stopping:
            raise RuntimeError(f"pool {self.spec.name!r} is stopping")

    def _cmd_scale(self, cmd: _Command) -> None:
        n, prepared = cmd.args  # prepared: {index: (name, args)} for every index < n
        self._check_not_stopping()
        self._hb.ensure(n)  # the one step that can fail (no shared memory): before any change
        now = time.monotonic()
        for index in range(n):
            w = self._workers.get(index)
            if w is None:
                name, args = prepared[index]
                w = _Worker(index, name, args, BackoffState(self.spec.backoff))
                self._add(w)
                self._spawn(w, now)
            elif w.after_stop == "remove":
                w.after_stop = "restart"  # scaled back up while it was going: replace it
        for index in sorted(self._workers)[n:] if len(self._workers) > n else ():
            w = self._workers[index]
            if w.state.alive or w.state is S.PENDING:
                self._stop_worker(w, StopReason.SCALED_DOWN, "remove", now)
            else:
                self._deadlines.cancel((index, "backoff"))
                if w.state is S.BACKOFF:
                    self._move(w, Trigger.STOP, S.STOPPED)
                self._remove(w)
        cmd.finish()
        self._note_scaling()
        self._check_ready_waiters()

    def _cmd_restart(self, cmd: _Command) -> None:
        (index,) = cmd.args
        self._check_not_stopping()
        self._restart_one(index, time.monotonic())
        cmd.finish()

    def _restart_one(self, index: int, now: float) -> None:
        w = self._workers.get(index)
        if w is None:
            raise IndexError(f"no worker with index {index} (pool has {len(self._workers)})")
        if w.state in (S.BACKOFF, S.EXITED):
            self._deadlines.cancel((index, "backoff"))
            self._move(w, Trigger.RESTART, S.PENDING)
            self._spawn(w, now)
        elif w.state in (S.STARTING, S.RUNNING):
            self._stop_worker(w, StopReason.RESTARTED, "restart", now)
        # PENDING or STOPPING: a new process is on its way already.

    def _cmd_restart_all(self, cmd: _Command) -> None:
        self._check_not_stopping()
        self._rolling_waiters.append(cmd)
        if self._rolling or self._rolling_current is not None:
            return  # one rolling restart at a time; this caller waits for it
        self._rolling.extend(sorted(self._workers))
        self._rolling_advance()

    def _rolling_advance(self) -> None:
        now = time.monotonic()
        self._rolling_current = None
        while self._rolling:
            index = self._rolling.popleft()
            w = self._workers.get(index)
            if w is None or w.state.final:
                continue
            self._rolling_current = index
            self._restart_one(index, now)
            return
        for cmd in self._rolling_waiters:
            cmd.finish()
        self._rolling_waiters.clear()

    def _check_rolling(self, w: _Worker) -> None:
        if self._rolling_current == w.index and w.state is S.RUNNING:
            self._rolling_advance()

    def _cmd_wait_ready(self, cmd: _Command) -> None:
        (n,) = cmd.args
        self._ready_waiters.append((n, cmd))
        self._check_ready_waiters()

    def _check_ready_waiters(self) -> None:
        """Answer the wait_ready() callers whose count is reached.

        Workers on their way out (scaled down) and workers that finished for good (restart
        policy) are not waited for: "all" means every worker that is meant to run.
        """
        if not self._ready_waiters:
            return
        counts = self._counts
        wanted = len(self._workers) - counts[S.EXITED] - counts[S.STOPPED]
        if self._scaling_down:
            wanted -= sum(1 for w in self._workers.values()
                          if w.after_stop == "remove" and not w.state.final)
        ready = counts[S.RUNNING]  # a worker being removed is STOPPING or PENDING, never RUNNING
        keep = []
        for n, cmd in self._ready_waiters:
            if ready >= (wanted if n is None else n):
                cmd.finish(ready)
            else:
                keep.append((n, cmd))
        self._ready_waiters = keep

    def _cmd_cancel(self, cmd: _Command) -> None:
        (target,) = cmd.args
        self._ready_waiters = [(n, c) for n, c in self._ready_waiters if c is not target]
        cmd.finish()

    # -------------------------------------------------------------------------------- outputs

    def _emit(self, kind: EventKind, w: _Worker | None, *, exit: ExitRecord | None = None,
              delay: float | None = None, message: str = "") -> None:
        pid = w.proc.pid if w is not None and w.proc is not None else (
            exit.pid if exit else None)
        self._emit_cb(Event(kind, self.spec.name, w.index if w else None, w.name if w else None,
                            pid, time.time(), exit, delay, message))

    def _build_status(self) -> tuple[WorkerStatus, ...]:
        now = time.monotonic()
        live = not self.finished.is_set()
        out = []
        for index in sorted(self._workers):
            w = self._workers[index]
            proc = w.proc
            reading = self._hb.read(index) if proc is not None and live else None
            backoff_at = self._deadlines.get((index, "backoff"))
            out.append(WorkerStatus(
                index=index, name=w.name, pid=proc.pid if proc else None, state=w.state,
                ready=w.ready, restarts=w.restarts,
                started_at=proc.started_wall if proc else None,
                uptime=0.0 if proc is None else now - proc.started,
                heartbeat_age=(now - reading.last_beat
                               if reading and reading.last_beat > 0 else None),
                status_text=reading.status if reading else "",
                last_exit=w.last_exit,
                next_restart_in=None if backoff_at is None else max(0.0, backoff_at - now)))
        return tuple(out)

    def _publish(self) -> None:
        """Keep the final view for ``status()`` calls after the monitor has ended."""
        self._snapshot = self._build_status()

    def _cmd_status(self, cmd: _Command) -> None:
        cmd.finish(self._build_status())

    def history(self) -> tuple[ExitRecord, ...]:
        return tuple(self._history)

    def not_ready_error(self, n: int | None) -> BaseException:
        """What wait_ready() raises once the pool has stopped before enough workers were ready."""
        if self.gave_up is not None:
            return self.gave_up
        return SupervisorStateError(
            f"pool {self.spec.name!r} stopped before {'all' if n is None else n} worker(s) "
            "were ready")


def _preload_for_forkserver(ctx: Any, target: Callable[..., Any]) -> None:
    """Have the forkserver import corral and the target's module once, not in every child.

    Only takes effect if the forkserver has not started yet; the list is process-wide, so we add
    to what is there rather than replace it.
    """
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    current = list(getattr(server, "_preload_modules", None) or ["__main__"])
    wanted = ["corral._bootstrap", "corral.heartbeat"]
    module = getattr(target, "__module__", None)
    if isinstance(module, str) and module != "__main__":
        wanted.append(module)
    missing = [m for m in wanted if m not in current]
    if missing:
        ctx.set_forkserver_preload(current + missing)


def _measure_rss(targets: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """RSS of each worker plus its children (runs on a check thread)."""
    import psutil

    out = []
    for index, generation, pid in targets:
        try:
            proc = psutil.Process(pid)
            rss = proc.memory_info().rss
            for child in proc.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    rss += child.memory_info().rss
        except psutil.Error:
            continue
        out.append((index, generation, rss))
    return out


class _SpawnSkipped(Exception):
    """The pool began stopping before this start came up."""

