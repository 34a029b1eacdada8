"""ProcessPool: a process pool whose workers may die, hang or bloat without breaking it.

Data flow::

    submit() --pickle (caller's thread)--> pending deque ---1 byte--> wakeup pipe --+
    future.cancel() of a running task ---> command deque ---1 byte--> wakeup pipe --+
    spawner thread: Process.start() -----> command deque ---1 byte--> wakeup pipe --+
    worker replies (hello, result, error) --> its own socket (non-blocking reads) --+--> epoll
    worker exits --> pidfd / forkserver sentinel readable ---------------------------+     |
    next deadline (task timeout, memory check, stack dump, stop timeout, backoff) -timeout-+
                                                                                           v
                                        the manager thread: owns every worker and task record

One manager thread owns all state. Each round it blocks in ``epoll`` until a worker replies or
exits, a command arrives, or the earliest deadline falls; there is no polling tick. (epoll rather
than ``multiprocessing.connection.wait``: the latter builds a new selector on every call, which is
most of the cost of a tiny task.) Each worker has its own socket and runs one task at a time, so
a worker that dies takes exactly one task with it. Process starts (up to tens of ms under
forkserver or spawn) happen on a separate long-lived spawner thread, so a restart never delays the
results of other workers, and the workers' parent-death signal is tied to a thread that lives as
long as the pool.

A spare worker (``spare_workers``) is started ahead and kept idle; when a worker dies or leaves,
the spare takes its place in the same round, so the next task waits for no process start, and a
new spare is started once that task is done.

The manager never blocks on a worker: it reads replies without blocking and reassembles frames
itself, writes a task in one non-blocking write to an empty socket, and hands the rest of a large
task to a short-lived sender thread.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import pickle
import random
import select
import signal
import struct
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, InvalidStateError
from concurrent.futures._base import (
    CANCELLED,
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    PENDING,
    RUNNING,
)
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from corral import _pool_worker
from corral import _validate as v
from corral._bootstrap import BootConfig, run_worker, signals_to_reset
from corral._deadlines import Deadlines
from corral._keeper import keeper
from corral.errors import CorralError, GaveUp, NotPicklable
from corral.events import ExitRecord, StopReason
from corral.exitstatus import ExitStatus
from corral.heartbeat import HeartbeatTable
from corral.policy import Backoff, BackoffState, BudgetWindow, RestartBudget
from corral.process import (
    DUMP_SIGNAL,
    WorkerProcess,
    disown_fd,
    dump_fd_is_ours,
    own_fd,
    read_stack_dump,
    stack_dump_size,
)
from corral.spec import START_METHODS

if TYPE_CHECKING:
    import psutil

__all__ = [
    "MemoryLimitExceeded",
    "PoolBroken",
    "ProcessPool",
    "RemoteTraceback",
    "TaskTimeout",
    "UnpicklingFailed",
    "WorkerLost",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_P = ParamSpec("_P")

_PROTOCOL = pickle.HIGHEST_PROTOCOL
_DUMP_SIGNAL = DUMP_SIGNAL  # faulthandler's C handler in the worker (see _bootstrap)
_DUMP_STEP = 0.005  # how often a stack dump is checked for completion (only while one is due)
_DUMP_MAX = 0.2  # the longest a hung worker may take to write its dump
_READ_SIZE = 1 << 16
_HDR = struct.Struct("!i")  # multiprocessing.Connection's framing
_BIG_HDR = struct.Struct("!Q")
_QUIT = _HDR.pack(0)  # an empty frame
_HISTORY = 10  # exits quoted when the pool breaks
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# A promoted spare's own replacement is started once the task it took is done, or after this
# many seconds: a process start (fork copies page tables holding the GIL; the child's boot takes
# a CPU) would otherwise delay that task's result, the one the spare is there to speed up.
_SPARE_HOLD = 0.05
_SPARE_GRACE = 0.002

# Worker states.
_SPAWNING = "spawning"  # queued for the spawner thread; no process yet
_BOOTING = "booting"  # process started; initializer running, no hello yet
_IDLE = "idle"
_BUSY = "busy"  # running a task
_LEAVING = "leaving"  # told to quit, or killed: waiting for its exit; no longer counts
_ACTIVE = frozenset({_SPAWNING, _BOOTING, _IDLE, _BUSY})
# A spare (``_Worker.spare``) goes through _SPAWNING, _BOOTING and _IDLE like any worker, but is
# counted apart (``_Core._spares``), is never in the idle queue and never gets a task until it
# is promoted to take the place of a worker that left.

_DEFAULT: Any = object()  # "use the pool's default" in submit_task()


# ------------------------------------------------------------------------------------ errors


class WorkerLost(CorralError, BrokenProcessPool):
    """The worker process running a task died before it replied.

    Only this task fails; the pool replaces the worker and carries on. For code written for
    ``concurrent.futures`` it is a ``BrokenProcessPool`` (the task's worker broke), though the
    pool itself is not broken.

    Attributes:
        pid: the worker's pid.
        exit: how it ended (:class:`corral.ExitStatus`), None if unknown.
        attempts: how many times the task was started (``retries`` + 1 at most).
    """

    def __init__(self, message: str, pid: int | None = None, exit: ExitStatus | None = None,
                 attempts: int = 1) -> None:
        super().__init__(message)
        self.pid = pid
        self.exit = exit
        self.attempts = attempts

    @property
    def exitcode(self) -> int | None:
        """multiprocessing-style: the exit code, or minus the signal number."""
        return None if self.exit is None else self.exit.returncode

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.pid, self.exit, self.attempts))


class MemoryLimitExceeded(WorkerLost):
    """The worker went over ``max_memory_per_worker`` while running the task and was killed.

    Attributes:
        rss: the resident set size measured, bytes.
        limit: the pool's ``max_memory_per_worker``, bytes.
    """

    def __init__(self, message: str, pid: int | None = None, exit: ExitStatus | None = None,
                 attempts: int = 1, rss: int = 0, limit: int = 0) -> None:
        super().__init__(message, pid, exit, attempts)
        self.rss = rss
        self.limit = limit

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.pid, self.exit, self.attempts, self.rss, self.limit))


class TaskTimeout(CorralError, TimeoutError):
    """A task ran past its timeout; its worker was stopped (and replaced).

    Attributes:
        timeout: the limit, seconds (counted from when the task started running).
        pid: the worker that ran it.
        dump: every thread's stack in the worker when it was stopped (also in the message).
    """

    def __init__(self, message: str, timeout: float = 0.0, pid: int | None = None,
                 dump: str = "") -> None:
        super().__init__(message)
        self.timeout = timeout
        self.pid = pid
        self.dump = dump

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.timeout, self.pid, self.dump))


class PoolBroken(GaveUp, BrokenProcessPool):
    """The pool takes no more tasks: it used up its restart budget, its initializer failed
    twice in a row the same way (the ``__cause__`` is the initializer's exception), or it could
    not start its threads.

    Tasks that had not started fail with it, and so does ``submit()``. It is a
    :class:`corral.GaveUp` (``history`` lists the last worker exits) and a
    ``concurrent.futures.process.BrokenProcessPool``.
    """


class UnpicklingFailed(CorralError, BrokenProcessPool, pickle.UnpicklingError):
    """A task could not be unpickled in its worker, or its result in the parent.

    Only this task fails; the worker and the pool carry on. The ``__cause__`` holds the error
    (for a task, its traceback in the worker). It is a ``BrokenProcessPool``, as
    ``concurrent.futures`` reports these, and a ``pickle.UnpicklingError``.
    """


class RemoteTraceback(Exception):
    """The ``__cause__`` of an exception raised by a task: its traceback in the worker."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def _safe_str(obj: object) -> str:
    try:
        return str(obj)
    except BaseException:
        return f"<{type(obj).__name__} whose str() failed>"


def _last_line(text: str) -> str:
    """The last non-empty line of a traceback: ``ValueError: the message``."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else text


def _describe(fn: Any) -> str:
    fn = getattr(fn, "func", fn)  # functools.partial
    qualname = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if qualname is None:
        return repr(fn)[:80]
    module = getattr(fn, "__module__", None)
    return f"{module}.{qualname}" if module else str(qualname)


# ------------------------------------------------------------------------------ the future


class _PoolFuture(Future[_T]):
    """A Future whose ``cancel()`` also works while the task runs: the pool kills its worker.

    The pool moves it PENDING -> RUNNING itself (``_start_running``), so a cancellation notifies
    waiters at once instead of when the manager reaches the task in its queue.
    """

    def __init__(self, core: _Core) -> None:
        super().__init__()
        self._core = core
        self._task: _Task | None = None

    def cancel(self) -> bool:
        """Cancel the task, even a running one (its worker is killed and replaced).

        Returns False only if the task has already finished.
        """
        return self._cancel(allow_running=True)

    def _cancel(self, allow_running: bool) -> bool:
        with self._condition:
            state = self._state
            if state == FINISHED or (state == RUNNING and not allow_running):
                return False
            if state in (CANCELLED, CANCELLED_AND_NOTIFIED):
                return True
            self._state = CANCELLED_AND_NOTIFIED
            for waiter in self._waiters:
                waiter.add_cancelled(self)
            self._condition.notify_all()
            task = self._task
        if state == RUNNING and task is not None:
            self._core.post(("cancel", task))
        self._invoke_callbacks()  # type: ignore[attr-defined]
        return True

    def _start_running(self) -> bool:
        """PENDING -> RUNNING; True also if already RUNNING (a task given to another worker)."""
        with self._condition:
            if self._state == PENDING:
                self._state = RUNNING
                return True
            return self._state == RUNNING


# ------------------------------------------------------------------------ manager records


class _Task:
    __slots__ = ("attempts", "deadline", "done", "fn", "future", "header", "id", "payload",
                 "retries", "timeout", "worker")

    def __init__(self, tid: int, future: _PoolFuture[Any], payload: bytes, fn: Any,
                 timeout: float | None, retries: int) -> None:
        self.id = tid
        self.future = future
        self.payload = payload
        n = len(payload)
        self.header = _HDR.pack(n) if n <= 0x7FFFFFFF else _HDR.pack(-1) + _BIG_HDR.pack(n)
        self.fn = fn  # for messages
        self.timeout = timeout
        self.retries = retries
        self.attempts = 0
        self.deadline = math.inf
        self.done = False
        self.worker: _Worker | None = None

    @property
    def label(self) -> str:
        return f"task {self.id} ({_describe(self.fn)})"


class _Worker:
    __slots__ = ("big", "big_got", "booted", "conn", "dead", "dump_fd", "dump_size",
                 "dump_started", "dump_task", "dumping", "eof", "fd", "id", "init_error",
                 "init_exc", "init_summary", "leave_reason", "next_mem", "proc", "ps", "rbuf",
                 "slot", "spare", "state", "statm", "task", "tasks_done", "waitable", "watching")

    def __init__(self, wid: int, slot: int, spare: bool = False) -> None:
        self.id = wid
        self.slot = slot  # heartbeat table slot (also in the process title)
        self.spare = spare  # started ahead, idle until promoted (see _promote_spares)
        self.state = _SPAWNING
        self.proc: WorkerProcess | None = None
        self.conn: Connection | None = None
        self.fd = -1
        self.waitable: int = -1
        self.watching = False  # our socket end is registered with epoll
        self.eof = False  # the worker closed its end: it is dying
        self.dead = False  # its exit is being handled
        self.task: _Task | None = None
        self.rbuf = bytearray()
        self.big: bytearray | None = None
        self.big_got = 0
        self.tasks_done = 0
        self.booted = False
        self.leave_reason = ""
        self.init_error: str | None = None
        self.init_exc: BaseException | None = None  # what its initializer raised
        self.init_summary: str | None = None  # its last line, if its initializer raised
        self.ps: psutil.Process | None = None  # RSS when /proc/<pid>/statm cannot be read
        self.statm = -1  # an open /proc/<pid>/statm: its RSS in one pread, ~2 us
        self.next_mem = math.inf
        self.dumping = False  # a stack dump is being collected; SIGKILL follows
        self.dump_task: _Task | None = None  # the timed-out task it is evidence for
        self.dump_fd = -1
        self.dump_started = 0.0
        self.dump_size = -1

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


@dataclass(frozen=True)
class _Config:
    name: str
    max_workers: int
    spare_workers: int
    start_method: str
    initializer: Callable[..., Any] | None
    initargs: tuple[Any, ...]
    task_timeout: float | None
    retries: int
    max_tasks_per_worker: int | None
    max_memory_per_worker: int | None
    memory_check_interval: float
    startup_timeout: float | None
    backoff: Backoff
    budget: RestartBudget
    stop_timeout: float
    context: Any = None  # a multiprocessing context to start workers with (else start_method's)
    drop_in: bool = False  # concurrent.futures behaviours (see corral.futures)


class _SpawnSkipped(Exception):
    """The pool began closing before this start came up."""


_CONN, _EXIT, _WAKE = 0, 1, 2


class _Core:
    """The pool's state and its manager thread (no reference to the ProcessPool object)."""

    def __init__(self, cfg: _Config) -> None:
        self.cfg = cfg
        self.lock = threading.Lock()  # submit vs shutdown vs break
        self.pending: deque[_Task] = deque()  # appended by submitters, popped by the manager
        self.commands: deque[tuple[Any, ...]] = deque()
        self.shutdown_requested = False
        self.terminate_at_exit = False  # shutdown(wait=False, cancel_futures=True)
        self.broken: PoolBroken | None = None
        self.thread: threading.Thread | None = None
        self.finished = threading.Event()
        self.pids: tuple[int, ...] = ()
        self.spare_pids: tuple[int, ...] = ()
        self.counters: dict[str, int] = dict.fromkeys(
            ("started", "tasks_done", "workers_lost", "tasks_lost", "retried", "timeouts",
             "cancelled_running", "recycled_tasks", "recycled_memory", "killed_memory",
             "boot_failures", "spares_promoted"), 0)
        self._wake_lock = threading.Lock()
        self._wake_r = self._wake_w = -1
        self._wake_pending = False
        self._ids = itertools.count(1)

    # --------------------------------------------------------------- called from other threads

    def next_id(self) -> int:
        return next(self._ids)

    def start(self) -> None:
        """Start the manager and spawner threads (under ``lock``, at the first submit).

        All or nothing: if anything fails, whatever was set up is released and nothing is left
        running.

        Raises:
            PoolBroken: a thread could not be started (thread limits, interpreter shutdown);
                the pool is broken for good.
            OSError: a pipe, epoll or the heartbeat table could not be created; the pool stays
                unstarted (the next submit tries again).
        """
        cfg = self.cfg
        keeper.start()  # workers' process groups die with this process, however it ends
        self._ctx = (cfg.context if cfg.context is not None
                     else multiprocessing.get_context(cfg.start_method))
        self._ep: Any = None
        self._hb: Any = None
        try:
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._ep = select.epoll()
            self._watch: dict[int, tuple[int, _Worker | None]] = {
                self._wake_r: (_WAKE, None)}
            self._ep.register(self._wake_r, select.EPOLLIN)
            self._hb = HeartbeatTable(2 * (cfg.max_workers + cfg.spare_workers) + 2)
        except BaseException:
            self._release()
            raise
        self._free_slots: list[int] = []
        self._next_slot = 0
        self._workers: dict[int, _Worker] = {}
        self._idle: deque[_Worker] = deque()
        self._active = 0  # workers in _ACTIVE states, spares not included
        self._spares = 0  # spares in _ACTIVE states
        self._busy = 0
        self._spawning = 0
        self._deadlines: Deadlines[Any] = Deadlines()
        self._budget = BudgetWindow(cfg.budget)
        self._backoff = BackoffState(cfg.backoff)
        self._spawn_after = 0.0
        # A promoted spare's first task, and until when it holds back new spares (_SPARE_HOLD).
        self._hold: tuple[_Worker, _Task | None, float] | None = None
        self._history: deque[ExitRecord] = deque(maxlen=_HISTORY)
        self._last_init_error: str | None = None
        # How the last worker that could not start failed (see _start_failed); a worker that
        # boots clears it.
        self._last_start_failure: str | None = None
        self._rng = random.Random()
        self._closing = False
        self._stop_spawning = False
        self._done = False
        self._spawn_q: deque[tuple[int, BootConfig] | None] = deque()
        self._spawn_cv = threading.Condition(threading.Lock())
        self._spawner = threading.Thread(target=self._spawn_loop,
                                         name=f"corral-pool-spawner[{cfg.name}]", daemon=True)
        thread = threading.Thread(target=self._run, name=f"corral-pool[{cfg.name}]",
                                  daemon=True)
        try:
            self._spawner.start()
            thread.start()
        except BaseException as exc:
            if self._spawner.ident is not None:
                self._request_spawn(None)
                self._spawner.join()
            self._release()
            self.broken = PoolBroken(
                f"pool {cfg.name!r} is broken: it could not start its threads "
                f"({type(exc).__name__}: {exc})")
            self.broken.__cause__ = exc
            self.finished.set()
            raise self.broken_error() from exc
        self.thread = thread
        _live_cores.add(self)

    def _release(self) -> None:
        """Close the wakeup pipe, epoll and the heartbeat table (whichever exist)."""
        with self._wake_lock:
            for fd in (self._wake_r, self._wake_w):
                if fd >= 0:
                    os.close(fd)
            self._wake_r = self._wake_w = -1
        if self._ep is not None:
            self._ep.close()
        if self._hb is not None:
            self._hb.close()

    def broken_error(self) -> PoolBroken:
        """A fresh copy of the error the pool broke with (each raise gets its own traceback)."""
        broken = self.broken
        assert broken is not None
        err = PoolBroken(str(broken), broken.history)
        err.__cause__ = broken.__cause__
        return err

    def wake(self) -> None:
        if self._wake_pending:
            return  # a byte is in the pipe (or on its way): the manager will look
        self._wake_pending = True
        with self._wake_lock:
            if self._wake_w >= 0:
                with contextlib.suppress(BlockingIOError):
                    os.write(self._wake_w, b"\0")

    def post(self, command: tuple[Any, ...]) -> None:
        self.commands.append(command)
        self.wake()

    def request_shutdown(self, cancel_futures: bool, terminate: bool = False,
                         wait: bool = True) -> None:
        with self.lock:
            self.shutdown_requested = True
            if cancel_futures and not wait:
                # The caller wants neither the queued tasks nor to wait for the running ones:
                # at interpreter exit, running tasks are stopped rather than waited for.
                self.terminate_at_exit = True
            started = self.thread is not None
        if started:
            self.post(("terminate",) if terminate else ("shutdown", cancel_futures))

    # ------------------------------------------------------------------------- spawner thread

    def _spawn_loop(self) -> None:
        cfg = self.cfg
        while True:
            with self._spawn_cv:
                while not self._spawn_q:
                    self._spawn_cv.wait()
                item = self._spawn_q.popleft()
            if item is None:
                return
            wid, boot = item
            result: tuple[WorkerProcess, Connection] | BaseException
            if self._stop_spawning:
                result = _SpawnSkipped()
            else:
                ours, theirs = multiprocessing.Pipe(duplex=True)
                # Ours is the supervisor's own: a fork-started sibling must not hold it (it
                # lives as long as this pool, whose spawner frame keeps the Connection alive
                # in every fork child too, so it is never closed twice there).
                own_fd(ours.fileno())
                try:
                    proc = WorkerProcess.start(
                        self._ctx, run_worker,
                        (boot, _pool_worker.main,
                         (theirs, cfg.initializer, cfg.initargs,
                          "concurrent.futures" if cfg.drop_in else None)),
                        boot.name, False)
                    result = (proc, ours)
                except BaseException as exc:  # reported to the manager as a failed start
                    disown_fd(ours.fileno())
                    ours.close()
                    result = exc
                finally:
                    theirs.close()
            self.post(("spawned", wid, result))

    def _request_spawn(self, item: tuple[int, BootConfig] | None) -> None:
        with self._spawn_cv:
            self._spawn_q.append(item)
            self._spawn_cv.notify()

    # --------------------------------------------------------------------------- manager loop

    def _run(self) -> None:
        try:
            self._fill(time.monotonic())
            while not self._done:
                self._round()
        except BaseException:
            log.critical("pool %r: the manager thread failed; killing every worker",
                         self.cfg.name, exc_info=True)
            self._emergency()
        finally:
            self._request_spawn(None)
            self._spawner.join(10)
            for cmd in self.commands:  # a start that came up after an emergency
                if cmd[0] == "spawned" and isinstance(cmd[2], tuple):
                    _kill_and_reap(cmd[2][0])
                    cmd[2][1].close()
            self._release()
            self.pids = self.spare_pids = ()
            self.finished.set()
            _live_cores.discard(self)

    def _round(self) -> None:
        due = self._deadlines.next_due()
        timeout = -1.0 if due is None else max(0.0, due - time.monotonic())
        events = self._ep.poll(timeout)
        exits: list[_Worker] = []
        woke = False
        watch = self._watch
        for fd, _ in events:
            entry = watch.get(fd)
            if entry is None:
                continue  # closed earlier in this batch
            kind, w = entry
            if kind == _CONN:
                assert w is not None
                self._on_conn(w)
            elif kind == _EXIT:
                assert w is not None
                exits.append(w)
            else:
                woke = True
        for w in exits:
            if not w.dead:
                self._on_exit(w)
        if woke:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._wake_r, 4096):
                    pass
            # Only now: a wake() that saw the flag set has its command queued before this line,
            # and one that sets it from here on writes a byte that the next poll sees.
            self._wake_pending = False
            commands = self.commands
            while commands:
                cmd = commands.popleft()
                getattr(self, f"_cmd_{cmd[0]}")(*cmd[1:])
        now = time.monotonic()
        if due is not None and due <= now:
            for key in self._deadlines.pop_due(now):
                self._on_deadline(key, now)
        if self._idle and self.pending:
            self._dispatch()
        if self._active < self.cfg.max_workers or (
                self._spares < self.cfg.spare_workers and not self._held(now)):
            self._fill(now)
        if self.shutdown_requested or self.broken is not None:
            self._maybe_close(now)

    # ---------------------------------------------------------------------------- bookkeeping

    def _set_state(self, w: _Worker, new: str) -> None:
        old = w.state
        delta = (new in _ACTIVE) - (old in _ACTIVE)
        if w.spare:
            self._spares += delta
        else:
            self._active += delta
        if old == _BUSY:
            self._busy -= 1
        if new == _BUSY:
            self._busy += 1
        w.state = new

    def _watch_fd(self, fd: int, kind: int, w: _Worker) -> None:
        self._ep.register(fd, select.EPOLLIN)
        self._watch[fd] = (kind, w)

    def _unwatch_fd(self, fd: int) -> None:
        # Always before closing: a forked worker may hold a copy of the fd, and epoll keeps a
        # registration alive as long as the open file is.
        if self._watch.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self._ep.unregister(fd)

    def _unwatch_conn(self, w: _Worker) -> None:
        if w.watching:
            w.watching = False
            self._unwatch_fd(w.fd)

    def _publish(self) -> None:
        workers = self._workers.values()
        # Spares apart: max_workers is what the user sees running tasks (see spare_workers).
        self.pids = tuple(w.proc.pid for w in workers if w.proc is not None and not w.spare)
        self.spare_pids = tuple(w.proc.pid for w in workers if w.spare and w.proc is not None)

    # ------------------------------------------------------------------------------- spawning

    def _fill(self, now: float) -> None:
        if self._closing or self.broken is not None:
            return
        cfg = self.cfg
        if self._active < cfg.max_workers and self._spares:
            self._promote_spares(now)  # no process start: not held back by the backoff
        if now < self._spawn_after:
            return
        while self._active < cfg.max_workers:
            self._spawn_worker(spare=False)
        if not self._held(now):
            while self._spares < cfg.spare_workers:
                self._spawn_worker(spare=True)

    def _held(self, now: float) -> bool:
        """Whether new spares wait for a promoted spare's first task (see _SPARE_HOLD)."""
        hold = self._hold
        if hold is None:
            return False
        w, t, until = hold
        if now >= until:
            self._hold = None
            return False
        if t is not None and not (w.task is t and w.state == _BUSY):
            # Done: its result's consumer gets a moment to run before a fork takes the GIL.
            self._hold = (w, None, min(until, now + _SPARE_GRACE))
            self._deadlines.set(("pool", "spare"), min(until, now + _SPARE_GRACE))
        return True

    def _promote_spares(self, now: float) -> None:
        """Fill the places of workers that left with spares, the readiest first."""
        rank = {_IDLE: 0, _BOOTING: 1, _SPAWNING: 2}
        spares = sorted((w for w in self._workers.values()
                         if w.spare and w.state in rank and not (w.eof or w.dead or w.dumping)),
                        key=lambda w: (rank[w.state], w.id))
        if not spares:
            return
        for w in spares:
            if self._active >= self.cfg.max_workers:
                break
            self._spares -= 1
            self._active += 1
            w.spare = False
            self.counters["spares_promoted"] += 1
            if w.state == _IDLE:
                self._became_idle(w)  # takes the next task now, if there is one
                if w.state == _BUSY and self._hold is None:
                    self._hold = (w, w.task, now + _SPARE_HOLD)
                    self._deadlines.set(("pool", "spare"), now + _SPARE_HOLD)
        self._publish()

    def _spawn_worker(self, spare: bool) -> None:
        cfg = self.cfg
        if self._free_slots:
            slot = self._free_slots.pop()
        else:
            slot = self._next_slot
            self._next_slot += 1
            self._hb.ensure(slot + 1)
        self._hb.reset(slot)
        w = _Worker(next(self._ids), slot, spare)
        self._workers[w.id] = w
        if spare:
            self._spares += 1
        else:
            self._active += 1
        self._spawning += 1
        pid = os.getpid()
        fork = self._ctx.get_start_method() == "fork"
        boot = BootConfig(
            pool=cfg.name, index=slot, name=f"{cfg.name}-{slot}", supervisor_pid=pid,
            heartbeat_path=self._hb.path, wake_path=None, ready_on_beat=False,
            dump_signal=_DUMP_SIGNAL, forkserver=self._ctx.get_start_method() == "forkserver",
            forked=fork, table=self._hb if fork else None,
            reset_signals=signals_to_reset() if fork else None)
        self._request_spawn((w.id, boot))

    def _cmd_spawned(self, wid: int, result: tuple[WorkerProcess, Connection] | BaseException,
                     ) -> None:
        self._spawning -= 1
        w = self._workers[wid]
        now = time.monotonic()
        if isinstance(result, BaseException):
            self._set_state(w, _LEAVING)
            self._forget(w)
            if isinstance(result, _SpawnSkipped):
                return
            self.counters["boot_failures"] += 1
            what = f"{type(result).__name__}: {result}"
            record = ExitRecord(w.slot, f"{self.cfg.name}-{w.slot}", None, None,
                                StopReason.SPAWN_FAILED, time.time(), 0.0, what)
            # An OSError (no memory, process or fd limits) may pass; anything else (pickling
            # the initializer's arguments, say) fails the same way every time.
            if not isinstance(result, OSError) and self._start_failed(
                    what, f"a worker could not be started ({what})", result, record):
                return
            log.error("pool %r: could not start a worker: %s", self.cfg.name, what)
            self._crashed(record, now, boot=True)
            return
        proc, conn = result
        w.proc, w.conn, w.fd = proc, conn, conn.fileno()
        os.set_blocking(w.fd, False)
        w.waitable = int(proc.waitable())
        self._watch_fd(w.waitable, _EXIT, w)
        self.counters["started"] += 1
        self._publish()
        if self._closing or w.state == _LEAVING:
            self._set_state(w, _LEAVING)
            w.leave_reason = "shutdown"
            proc.send_group(signal.SIGKILL)
            return
        self._set_state(w, _BOOTING)
        w.watching = True
        self._watch_fd(w.fd, _CONN, w)
        if self.cfg.startup_timeout is not None:
            self._deadlines.set((w.id, "boot"), now + self.cfg.startup_timeout)
        log.debug("pool %r: worker pid %d started", self.cfg.name, proc.pid)

    def _forget(self, w: _Worker) -> None:
        """Drop a worker whose process is gone (or never was)."""
        del self._workers[w.id]
        self._free_slots.append(w.slot)
        if w.statm >= 0:
            os.close(w.statm)
            w.statm = -1
        if w.conn is not None:
            self._unwatch_conn(w)
            disown_fd(w.fd)
            w.conn.close()
            w.conn = None
            w.fd = -1

    # ------------------------------------------------------------------------ worker replies

    def _on_conn(self, w: _Worker) -> None:
        fd = w.fd
        while True:
            big = w.big
            if big is not None:
                try:
                    n = os.readv(fd, [memoryview(big)[w.big_got:]])
                except BlockingIOError:
                    return
                except OSError:
                    n = 0
                if n == 0:
                    self._on_eof(w)
                    return
                w.big_got += n
                if w.big_got < len(big):
                    continue
                w.big = None
                self._on_frame(w, big)
                if not (w.watching or w.dead):
                    return
                continue
            try:
                chunk = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                self._on_eof(w)
                return
            buf = w.rbuf
            data: bytes | bytearray
            if buf:
                buf += chunk
                data = buf
            else:
                data = chunk
            pos, end = 0, len(data)
            while end - pos >= 4:
                (size,) = _HDR.unpack_from(data, pos)
                start = pos + 4
                if size < 0:
                    if end - pos < 12:
                        break
                    (size,) = _BIG_HDR.unpack_from(data, start)
                    start += 8
                if end - start >= size:
                    frame = data[start:start + size]
                    pos = start + size
                    self._on_frame(w, frame)
                    if not (w.watching or w.dead):
                        return
                    continue
                if size > _READ_SIZE:
                    # A large reply: read the rest straight into a buffer of its full size.
                    got = end - start
                    big = bytearray(size)
                    big[:got] = data[start:end]
                    w.big, w.big_got = big, got
                    pos = end
                break
            if data is buf:
                del buf[:pos]
            elif pos < end:
                buf += data[pos:]
            if len(chunk) < _READ_SIZE and w.big is None:
                return  # drained: spare the syscall that would say so

    def _on_eof(self, w: _Worker) -> None:
        # The worker is dying; its exit (pidfd) says how. Never give it another task.
        w.eof = True
        self._unwatch_conn(w)
        if w.state == _IDLE:
            with contextlib.suppress(ValueError):
                self._idle.remove(w)

    def _on_frame(self, w: _Worker, data: bytes | bytearray) -> None:
        try:
            msg = pickle.loads(data)
            kind = msg[0]
        except BaseException as exc:  # a __reduce__ may raise anything, SystemExit included
            t = w.task
            if w.state == _BUSY and t is not None:
                unreadable = UnpicklingFailed(
                    f"the result of {t.label} could not be unpickled in the parent "
                    f"({type(exc).__name__}: {_safe_str(exc)})")
                unreadable.__cause__ = exc
                self._task_finished(w, t, unreadable, ok=False)
            else:
                log.error("pool %r: unreadable message from worker pid %s: %s: %s",
                          self.cfg.name, w.pid, type(exc).__name__, _safe_str(exc))
            return
        if kind == "r" or kind == "e" or kind == "u" or kind == "t":
            t = w.task
            if w.state != _BUSY or t is None:
                return  # a reply for a task given up on (cannot happen: we stop reading)
            if kind == "r":
                self._task_finished(w, t, msg[1], ok=True)
                return
            err: BaseException
            if kind == "e":
                err, tb = msg[1], msg[2]
            elif kind == "u":  # its result (or exception) could not be pickled
                _, text, tb, original = msg
                if self.cfg.drop_in and original is not None:
                    err = original  # as concurrent.futures reports it
                else:
                    err = NotPicklable(f"{t.label}: {text}")
            else:  # "t": the task could not be unpickled in the worker
                err = UnpicklingFailed(f"{t.label}: {msg[1]}")
                tb = msg[2]
            if tb:
                err.__cause__ = RemoteTraceback(f'\n"""\n{tb}"""')
            self._task_finished(w, t, err, ok=False)
        elif kind == "h":
            if w.state == _BOOTING:
                w.booted = True
                self._deadlines.cancel((w.id, "boot"))
                self._backoff.streak = 0  # a worker that boots ends a crash loop
                self._last_start_failure = None
                log.debug("pool %r: worker pid %s is ready", self.cfg.name, w.pid)
                self._set_state(w, _IDLE)
                self._became_idle(w)
        elif kind == "i":
            w.init_error = f"its initializer raised:\n{msg[1]}"
            w.init_summary = _last_line(msg[1])
            w.init_exc = msg[2]
            if w.init_exc is not None:
                w.init_exc.__cause__ = RemoteTraceback(f'\n"""\n{msg[1]}"""')

    def _task_finished(self, w: _Worker, t: _Task, value: Any, ok: bool) -> None:
        w.task = None
        t.worker = None
        w.tasks_done += 1
        self.counters["tasks_done"] += 1
        self._set_state(w, _IDLE)
        cfg = self.cfg
        if w.dead:
            pass  # its last reply, read after it died: its exit is handled next
        elif cfg.max_tasks_per_worker is not None and w.tasks_done >= cfg.max_tasks_per_worker:
            self.counters["recycled_tasks"] += 1
            self._leave(w, "recycled: max_tasks_per_worker", "quit")
        elif cfg.max_memory_per_worker is not None:
            rss = self._rss(w)
            if rss is not None and rss > cfg.max_memory_per_worker:
                log.info("pool %r: worker pid %s uses %d bytes, over max_memory_per_worker=%d; "
                         "recycling it", cfg.name, w.pid, rss, cfg.max_memory_per_worker)
                self.counters["recycled_memory"] += 1
                self._leave(w, "recycled: max_memory_per_worker", "quit")
        if w.state == _IDLE:
            self._became_idle(w)  # the next task goes out before this result is delivered
        if ok:
            self._resolve(t, value)
        else:
            self._resolve(t, exc=value)

    def _became_idle(self, w: _Worker) -> None:
        if w.eof or w.dead or w.spare:
            return  # dying (its exit will be handled), or a spare: no task until promoted
        t = self._next_task()
        if t is not None:
            self._send(w, t)
        else:
            self._idle.append(w)

    # ------------------------------------------------------------------------------ tasks out

    def _next_task(self) -> _Task | None:
        pending = self.pending
        while pending:
            t = pending.popleft()
            if t.done:
                continue
            if not t.future._start_running():
                self._drop(t)  # cancelled while it waited
                continue
            return t
        return None

    def _dispatch(self) -> None:
        idle = self._idle
        while idle:
            t = self._next_task()
            if t is None:
                return
            self._send(idle.popleft(), t)

    def _send(self, w: _Worker, t: _Task) -> None:
        t.attempts += 1
        t.worker = w
        w.task = t
        self._set_state(w, _BUSY)
        if t.timeout is not None or self.cfg.max_memory_per_worker is not None:
            now = time.monotonic()
            if t.timeout is not None:
                t.deadline = now + t.timeout
            if self.cfg.max_memory_per_worker is not None:
                w.next_mem = now + self.cfg.memory_check_interval
            self._arm(w)
        header, payload = t.header, t.payload
        try:
            n = os.writev(w.fd, [header, payload])
        except BlockingIOError:
            n = 0
        except OSError:
            # The worker is already gone: the task never reached it. Give it to another one.
            w.task = None
            t.worker = None
            t.attempts -= 1
            self.pending.appendleft(t)
            self._set_state(w, _IDLE)
            self._on_eof(w)
            return
        total = len(header) + len(payload)
        if n < total:
            # A large task: a sender thread writes the rest while the worker reads it. It
            # writes to its own copy of the fd, which it closes itself; the worker's death ends
            # the write with EPIPE.
            rest = [memoryview(header)[n:], memoryview(payload)] if n < len(header) else [
                memoryview(payload)[n - len(header):]]
            fd = os.dup(w.fd)
            try:
                threading.Thread(target=_send_rest, args=(fd, rest),
                                 name="corral-pool-sender", daemon=True).start()
            except BaseException as exc:  # no thread (limits, interpreter exit): half sent
                os.close(fd)
                w.task = None
                t.worker = None
                self._leave(w, "could not send a task", "kill")
                self._resolve(t, exc=exc)

    def _arm(self, w: _Worker) -> None:
        """Make sure a timer covers the running task's timeout and its next memory check.

        Lazy: a timer that fires early (set for an earlier task) re-arms itself, so a stream of
        tasks costs one heap entry per worker per timeout, not one per task.
        """
        t = w.task
        need = min(t.deadline if t is not None else math.inf, w.next_mem)
        if need == math.inf:
            return
        key = (w.id, "timer")
        current = self._deadlines.get(key)
        if current is None or need < current:
            self._deadlines.set(key, need)

    # ------------------------------------------------------------------------------ outcomes

    def _drop(self, t: _Task) -> None:
        """The task has ended: free its pickled call (the caller may keep the future)."""
        t.done = True
        t.worker = None
        t.payload = t.header = b""
        t.future._task = None

    def _resolve(self, t: _Task, value: Any = None, exc: BaseException | None = None) -> None:
        if t.done:
            return
        self._drop(t)
        fut = t.future
        try:
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(value)
        except InvalidStateError:
            pass  # cancelled by its owner meanwhile: the cancellation is its outcome

    def _task_lost(self, t: _Task, exc: WorkerLost) -> None:
        t.worker = None
        if t.done or t.future.done():
            self._drop(t)
            return
        self.counters["tasks_lost"] += 1
        if t.attempts <= t.retries and self.broken is None and not self._closing:
            log.warning("pool %r: %s; retrying it (attempt %d of %d)", self.cfg.name, exc,
                        t.attempts + 1, t.retries + 1)
            self.counters["retried"] += 1
            self.pending.appendleft(t)
            return
        self._resolve(t, exc=exc)

    def _leave(self, w: _Worker, reason: str, how: str) -> None:
        """Take ``w`` out of service; ``how``: "quit" (ask), "kill" (SIGKILL) or "none"."""
        if w.state == _IDLE:
            with contextlib.suppress(ValueError):
                self._idle.remove(w)
        self._set_state(w, _LEAVING)
        w.leave_reason = reason
        self._unwatch_conn(w)
        proc = w.proc
        if proc is None:
            return  # still spawning: killed as soon as it exists
        if how == "kill":
            proc.send_group(signal.SIGKILL)
        elif how == "quit":
            try:
                os.write(w.fd, _QUIT)
            except OSError:
                pass  # gone already, or a task frame is still being written: the kill follows
            self._deadlines.set((w.id, "kill"), time.monotonic() + self.cfg.stop_timeout)

    # ---------------------------------------------------------------------------- exits

    def _on_exit(self, w: _Worker) -> None:
        proc = w.proc
        assert proc is not None
        w.dead = True
        if w.watching:
            self._on_conn(w)  # a reply written just before it died still counts
        # Take the rest of its group down while the dead worker still holds the group id.
        proc.kill_group_leftovers()
        status = proc.reap()
        if status is None:
            w.dead = False
            return  # not really gone yet (cannot happen with pidfds): wait again
        self._unwatch_fd(w.waitable)
        for key in ("timer", "dump", "kill", "boot"):
            self._deadlines.cancel((w.id, key))
        self._forget(w)
        proc.close()
        now = time.monotonic()
        uptime = now - proc.started
        prior = w.state
        if prior == _IDLE:
            with contextlib.suppress(ValueError):
                self._idle.remove(w)
        self._set_state(w, _LEAVING)
        self._publish()
        if w.dumping:
            self._dump_done(w, "(no stack dump: the worker ended before it was written)")
        if prior == _LEAVING:
            # corral asked it to leave (shutdown, recycling, timeout, cancellation), or killed
            # it: no news, whatever the status (a SIGKILL is most likely ours). Anything worth
            # a warning (a worker that ignored the quit) was logged when it happened.
            level = (logging.DEBUG if status.clean or status.signal == signal.SIGKILL
                     else logging.INFO)
            log.log(level, "pool %r: worker pid %d (%s) ended: %s", self.cfg.name, proc.pid,
                    w.leave_reason, status.describe() + (
                        f" ({status.hint})" if status.unknown else ""))
            self._fill(now)
            return
        # It died by itself (or before it could take the task it was sent).
        self.counters["workers_lost"] += 1
        reason = StopReason.KILLED if status.signal is not None else StopReason.EXITED
        hint = status.hint
        how = status.describe() + (f" ({hint})" if hint else "")
        record = ExitRecord(w.slot, f"{self.cfg.name}-{w.slot}", proc.pid, status, reason,
                            time.time(), uptime, w.init_error)
        t = w.task
        if t is not None:
            w.task = None
            attempts = f" (attempt {t.attempts} of {t.retries + 1})" if t.retries else ""
            msg = f"worker pid {proc.pid} died while running {t.label}: {how}{attempts}"
            self._task_lost(t, WorkerLost(msg, proc.pid, status, t.attempts))
        elif not w.booted:
            self.counters["boot_failures"] += 1
            if w.init_error:
                self._last_init_error = w.init_error
                if self.broken is not None:
                    log.debug("pool %r: worker pid %d could not start either: %s",
                              self.cfg.name, proc.pid, _last_line(w.init_error))
                    self._history.append(record)
                    return
                summary = w.init_summary
                if summary is not None and self._start_failed(f"initializer: {summary}",
                                      f"its initializer failed the same way in two new workers "
                                      f"in a row: {summary}", w.init_exc, record):
                    return
                # The traceback is logged here, once: a second failure like it breaks the pool
                # with a one-line summary. (The drop-in's workers log it themselves, as
                # concurrent.futures' do.)
                if summary is None:  # a startup timeout, with a stack dump
                    log.error("pool %r: worker pid %d could not start (%s): %s", self.cfg.name,
                              proc.pid, how, w.init_error.rstrip())
                else:
                    log.warning("pool %r: worker pid %d could not start: its initializer raised "
                                "%s; trying a new worker%s", self.cfg.name, proc.pid, summary,
                                "" if self.cfg.drop_in else "\n" + w.init_error.rstrip())
            else:
                if (status.code and self.broken is None and self._start_failed(
                        f"exit: {how}", f"two new workers in a row died while starting: {how}. "
                        "Their stderr says why (an import error, most likely).", None, record)):
                    return
                log.error("pool %r: worker pid %d died while starting: %s", self.cfg.name,
                          proc.pid, how)
        else:
            log.warning("pool %r: %s worker pid %d died: %s", self.cfg.name,
                        "spare" if w.spare else "idle", proc.pid, how)
        self._crashed(record, now, boot=not w.booted)

    def _crashed(self, record: ExitRecord, now: float, boot: bool) -> None:
        """An unplanned exit: spend from the restart budget; back off if it never booted."""
        self._history.append(record)
        if self.broken is not None:
            return
        if not self._budget.try_spend(now):
            self._break()
            return
        if boot:
            delay = self._backoff.on_death(record.uptime, self._rng)
            if delay > 0:
                self._spawn_after = max(self._spawn_after, now + delay)
                self._deadlines.set(("pool", "spawn"), self._spawn_after)
                log.info("pool %r: next worker start in %.3fs (failure %d in a row)",
                         self.cfg.name, delay, self._backoff.streak)
        self._fill(now)

    def _start_failed(self, key: str, reason: str, cause: BaseException | None,
                      record: ExitRecord) -> bool:
        """A new worker could not start. Twice in a row the same way is a broken pool.

        An initializer that raises (or arguments that cannot reach the worker) fail the same
        way on every new worker: retrying until the restart budget runs out only delays the
        error. Returns True if the pool broke.
        """
        if key != self._last_start_failure:
            self._last_start_failure = key
            return False
        self._history.append(record)
        self._break(reason, cause)
        return True

    def _break(self, reason: str | None = None, cause: BaseException | None = None) -> None:
        last = list(self._history)
        if reason is not None:
            message = f"pool {self.cfg.name!r} is broken: {reason}"  # __cause__: the details
        else:
            budget = self.cfg.budget
            lines = "\n".join("  " + r.describe() for r in last)
            message = (f"pool {self.cfg.name!r} is broken: its workers died more than "
                       f"{budget.max_restarts} times within {budget.window:g}s (the restart "
                       f"budget). Last exits:\n{lines}")
            if self._last_init_error:
                message += ("\nThe last worker that could not start: "
                            f"{self._last_init_error.rstrip()}")
        log.error("%s", message)
        broken = PoolBroken(message, last)
        broken.__cause__ = cause
        with self.lock:
            self.broken = broken
        self._deadlines.cancel(("pool", "spawn"))
        while self.pending:
            t = self.pending.popleft()
            self._resolve(t, exc=self.broken_error())

    # ------------------------------------------------------------------------- deadlines

    def _on_deadline(self, key: Any, now: float) -> None:
        owner, kind = key
        if owner == "pool":
            if kind == "spawn" or kind == "spare":
                self._fill(now)
            elif kind == "kill":
                for straggler in self._workers.values():
                    if straggler.state == _LEAVING and straggler.proc is not None:
                        log.warning("pool %r: worker pid %d did not exit within stop_timeout="
                                    "%gs; killing it", self.cfg.name, straggler.proc.pid,
                                    self.cfg.stop_timeout)
                        straggler.proc.send_group(signal.SIGKILL)
            return
        w = self._workers.get(owner)
        if w is None or w.dead:
            return
        if kind == "timer":
            self._on_timer(w, now)
        elif kind == "dump":
            self._collect_dump(w, now)
        elif kind == "boot" and w.state == _BOOTING and not w.dumping:
            # Hung in its initializer (or import): evidence, then a boot failure like a crash.
            log.warning("pool %r: worker pid %s did not finish starting within startup_timeout="
                        "%gs; collecting a stack dump, then killing it", self.cfg.name, w.pid,
                        self.cfg.startup_timeout)
            self._unwatch_conn(w)  # a late hello does not count
            self._dump_then_kill(w, now)
        elif kind == "kill" and w.state == _LEAVING and w.proc is not None:
            log.warning("pool %r: worker pid %d (%s) did not exit within stop_timeout=%gs; "
                        "killing it", self.cfg.name, w.proc.pid, w.leave_reason,
                        self.cfg.stop_timeout)
            w.proc.send_group(signal.SIGKILL)

    def _on_timer(self, w: _Worker, now: float) -> None:
        t = w.task
        if w.state != _BUSY or t is None:
            return
        if now >= t.deadline:
            self._timed_out(w, t, now)
            return
        limit = self.cfg.max_memory_per_worker
        if limit is not None and now >= w.next_mem:
            w.next_mem = now + self.cfg.memory_check_interval
            rss = self._rss(w)
            if rss is not None and rss > limit:
                self._memory_kill(w, t, rss, limit)
                return
        self._arm(w)

    def _rss(self, w: _Worker) -> int | None:
        """The worker's resident set size, bytes (None if it cannot be read: it is dying).

        Read after every task, so it has to be cheap: psutil costs several times more than a
        pread of /proc/<pid>/statm (the same number), which is tried first.
        """
        import psutil  # imported here: every spawn/forkserver worker imports this module

        try:
            if w.statm < 0 and w.ps is None and w.proc is not None:
                try:
                    w.statm = os.open(f"/proc/{w.proc.pid}/statm", os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    w.ps = psutil.Process(w.proc.pid)
            if w.statm >= 0:
                return int(os.pread(w.statm, 128, 0).split()[1]) * _PAGE_SIZE
            return int(w.ps.memory_info().rss) if w.ps is not None else None
        except (OSError, IndexError, ValueError, psutil.Error):
            return None

    def _memory_kill(self, w: _Worker, t: _Task, rss: int, limit: int) -> None:
        pid = w.pid
        w.task = None
        self.counters["killed_memory"] += 1
        self._leave(w, "killed: max_memory_per_worker", "kill")
        attempts = f" (attempt {t.attempts} of {t.retries + 1})" if t.retries else ""
        msg = (f"worker pid {pid} used {rss} bytes of memory (RSS) while running {t.label}, over "
               f"max_memory_per_worker={limit}; it was killed{attempts}")
        log.warning("pool %r: %s", self.cfg.name, msg)
        self._task_lost(t, MemoryLimitExceeded(msg, pid, ExitStatus(signal=signal.SIGKILL),
                                               t.attempts, rss, limit))

    def _timed_out(self, w: _Worker, t: _Task, now: float) -> None:
        w.task = None
        self.counters["timeouts"] += 1
        self._leave(w, "timeout", "none")
        w.dump_task = t
        log.warning("pool %r: %s ran past its timeout of %gs on worker pid %s; collecting a "
                    "stack dump, then killing it", self.cfg.name, t.label, t.timeout, w.pid)
        self._dump_then_kill(w, now)

    def _dump_then_kill(self, w: _Worker, now: float) -> None:
        w.dumping = True
        if not self._request_dump(w, now):
            self._dump_done(w, "(no stack dump: the worker has no dump handler yet)")

    def _request_dump(self, w: _Worker, now: float) -> bool:
        proc = w.proc
        assert proc is not None
        fd = self._hb.read(w.slot).dump_fd
        if fd < 0 or not dump_fd_is_ours(proc.pid, fd):
            # None yet, or the task closed corral's dump file (and may have opened one of its
            # own on that number): never write a dump into a user's file.
            return False
        if not proc.send(_DUMP_SIGNAL):
            return False
        proc.send(signal.SIGCONT)  # a stopped worker can still run the C handler
        w.dump_fd, w.dump_size, w.dump_started = fd, -1, now
        self._deadlines.set((w.id, "dump"), now + _DUMP_STEP)
        return True

    def _collect_dump(self, w: _Worker, now: float) -> None:
        if not w.dumping or w.proc is None:
            return
        size = stack_dump_size(w.proc.pid, w.dump_fd)
        if not (size > 0 and size == w.dump_size) and now - w.dump_started < _DUMP_MAX:
            w.dump_size = size
            self._deadlines.set((w.id, "dump"), now + _DUMP_STEP)
            return
        text = read_stack_dump(w.proc.pid, w.dump_fd)
        self._dump_done(w, text or "(no stack dump: the worker could not write one)")

    def _dump_done(self, w: _Worker, dump: str) -> None:
        w.dumping = False
        self._deadlines.cancel((w.id, "dump"))
        if w.proc is not None and not w.dead:
            w.proc.send_group(signal.SIGKILL)
        t = w.dump_task
        if t is None:  # a startup timeout: the evidence goes with the boot failure
            w.init_error = (f"it did not finish starting within startup_timeout="
                            f"{self.cfg.startup_timeout:g}s. Its stack when it was stopped:\n"
                            f"{dump.rstrip()}")
            return
        w.dump_task = None
        msg = (f"{t.label} did not finish within its timeout of {t.timeout:g}s; worker pid "
               f"{w.pid} was killed. Its stack when it was stopped:\n{dump.rstrip()}")
        self._resolve(t, exc=TaskTimeout(msg, t.timeout or 0.0, w.pid, dump))

    # ------------------------------------------------------------------------------ commands

    def _cmd_cancel(self, t: _Task) -> None:
        # The owner cancelled the future of a running task: its outcome is the cancellation.
        if t.done:
            return
        w = t.worker
        self._drop(t)
        if w is not None and w.task is t and w.state == _BUSY:
            w.task = None
            self.counters["cancelled_running"] += 1
            log.info("pool %r: %s was cancelled while running; killing worker pid %s",
                     self.cfg.name, t.label, w.pid)
            self._leave(w, "cancelled", "kill")

    def _cmd_shutdown(self, cancel_futures: bool, keep_committed: bool = True) -> None:
        if cancel_futures:
            # The next tasks for workers that are still starting are as good as started (as
            # in concurrent.futures, whose call queue holds them): they run. The rest is
            # cancelled.
            keep = (max(0, self._active - self._busy) if keep_committed and not self._closing
                    else 0)
            kept: list[_Task] = []
            while self.pending:
                t = self.pending.popleft()
                if t.done:
                    continue
                if len(kept) < keep and t.future._start_running():
                    kept.append(t)
                    continue
                self._drop(t)
                t.future._cancel(allow_running=t.attempts > 0)
            self.pending.extend(kept)

    def _cmd_terminate(self) -> None:
        """Cancel every task, running ones too (their workers are killed), and close."""
        self._cmd_shutdown(cancel_futures=True, keep_committed=False)
        for w in list(self._workers.values()):
            t = w.task
            if w.state == _BUSY and t is not None:
                w.task = None
                self._drop(t)
                t.future._cancel(allow_running=True)
                self._leave(w, "terminated", "kill")
            if w.dumping:
                self._dump_done(w, "(no stack dump: the pool was terminated)")

    def _has_pending(self) -> bool:
        pending = self.pending
        while pending:
            t = pending[0]
            if not (t.done or t.future.done()):
                return True
            pending.popleft()
            self._drop(t)
        return False

    def _maybe_close(self, now: float) -> None:
        if not self._closing:
            if self._busy or self._has_pending():
                return
            self._closing = True
            self._stop_spawning = True
            for w in list(self._workers.values()):
                if w.state in (_IDLE, _BOOTING):
                    self._leave(w, "shutdown", "quit")
                elif w.state == _SPAWNING:
                    self._set_state(w, _LEAVING)
                    w.leave_reason = "shutdown"
            self._deadlines.cancel(("pool", "spawn"))
            self._deadlines.set(("pool", "kill"), now + self.cfg.stop_timeout)
        if not self._workers and not self._spawning:
            self._done = True

    def _emergency(self) -> None:
        """The manager failed: kill every worker and fail every task, so that nothing hangs."""
        message = "the pool's manager thread failed (a bug in corral; see the log)"
        with self.lock:
            self.broken = PoolBroken(f"pool {self.cfg.name!r} is broken: {message}",
                                     list(getattr(self, "_history", ())))
        self._stop_spawning = True
        for w in list(getattr(self, "_workers", {}).values()):
            for t in (w.task, w.dump_task):
                if t is not None:
                    self._resolve(t, exc=PoolBroken(message))
            if w.proc is not None and not w.dead:
                _kill_and_reap(w.proc)
            if w.conn is not None:
                w.conn.close()
        while self.pending:
            self._resolve(self.pending.popleft(), exc=PoolBroken(message))


def _kill_and_reap(proc: WorkerProcess) -> None:
    proc.send_group(signal.SIGKILL)
    multiprocessing.connection.wait([proc.waitable()], timeout=5)  # well under 1 ms
    proc.kill_group_leftovers()
    proc.reap()
    proc.close()


def _send_rest(fd: int, bufs: list[memoryview]) -> None:
    try:
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        while bufs:
            poller.poll()
            try:
                n = os.writev(fd, bufs)
            except BlockingIOError:
                continue
            except OSError:
                return  # the worker died: the manager sees its exit
            while n and bufs:
                if n >= len(bufs[0]):
                    n -= len(bufs[0])
                    bufs.pop(0)
                else:
                    bufs[0] = bufs[0][n:]
                    n = 0
    finally:
        os.close(fd)


_live_cores: weakref.WeakSet[_Core] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The child of os.fork() in a program with a pool has no manager thread: its copies of the
    # parent's pools refuse to work (RuntimeError) and exit must not wait for them.
    _live_cores.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _shutdown_all_at_exit() -> None:
    # A program that forgets shutdown() must not leave workers behind. Like
    # concurrent.futures, submitted tasks still run to completion first.
    for core in list(_live_cores):
        if core.terminate_at_exit:
            core.post(("terminate",))
        else:
            core.request_shutdown(cancel_futures=False)
    for core in list(_live_cores):
        if core.thread is not None:
            core.thread.join()


def _finalize(core: _Core, owner: int) -> None:
    if os.getpid() == owner:  # a forked child's copy has nothing to shut down
        core.request_shutdown(False)


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# -------------------------------------------------------------------------------- the pool


class ProcessPool(Executor):
    """A ``concurrent.futures.Executor`` whose workers may crash, hang or bloat without harm.

    A worker that dies fails only the task it was running (:class:`WorkerLost`, with the pid and
    the exit code or signal and its likely cause) and is replaced; a task past its timeout gets
    its worker killed after a stack dump (:class:`TaskTimeout`); ``future.cancel()`` works on a
    running task too (its worker is killed). Workers are recycled after ``max_tasks_per_worker``
    tasks or above ``max_memory_per_worker`` bytes of RSS.

    ::

        with corral.ProcessPool(4, task_timeout=60, retries=1) as pool:
            for result in pool.map(work, items, chunksize=16):
                ...

    Args:
        max_workers: number of worker processes (default: the CPUs this process may use).
        spare_workers: extra workers kept started and ready, but idle, beyond ``max_workers``
            (they do not count against it, and are listed by :meth:`spare_pids`, not
            :meth:`worker_pids`). When a worker dies or leaves (crash, timeout, cancellation,
            recycling) a spare takes its place at once, so the next task does not wait for a
            process to start; a new spare is then started in the background. A spare never
            runs a task until it takes a place; one that dies counts against ``budget`` like
            any worker. 0: none (each replacement is started when it is needed).
        start_method: "forkserver" (default), "spawn" or "fork".
        initializer: ``initializer(*initargs)`` runs in each worker before its first task. A
            worker whose initializer raises counts as a crash (backoff, restart budget); two
            new workers in a row whose initializer raises the same way break the pool at once
            (:class:`PoolBroken`, whose ``__cause__`` is the initializer's exception).
        initargs: arguments for the initializer. They reach each worker as
            ``multiprocessing.Process`` arguments do, so ``multiprocessing`` queues, locks and
            events work under every start method.
        task_timeout: default per-task timeout, seconds from when the task starts running
            (None or ``math.inf``: none). :meth:`submit_task` overrides it per task.
        retries: default number of times a task whose worker died (:class:`WorkerLost`) is run
            again on another worker. Only for idempotent tasks; timeouts are not retried.
        max_tasks_per_worker: replace a worker after this many tasks (None: never).
        max_memory_per_worker: RSS limit of a worker, bytes (None: none). Checked after each
            task (over it: the worker is replaced, gracefully) and every
            ``memory_check_interval`` seconds while a task runs (over it: the worker is
            killed and the task fails with :class:`MemoryLimitExceeded`, or is retried).
        memory_check_interval: seconds between RSS checks of a busy worker.
        startup_timeout: seconds a new worker gets to import and run its initializer (None: no
            limit). Past it, its stack is dumped and it is killed: a failed start.
        backoff: delays between worker starts after workers died before they were ready
            (import or initializer failures). A worker that was ready is replaced at once.
        budget: at most ``max_restarts`` unplanned worker deaths within ``window`` seconds;
            one more and the pool breaks (:class:`PoolBroken`). Kills the pool decides itself
            (timeouts, cancellation, memory, recycling) do not count.
        stop_timeout: seconds a worker asked to quit (recycling, shutdown) gets before SIGKILL.
        name: the pool's name, in logs and process titles.

    Raises:
        TypeError, ValueError: a bad argument (the message names it).
        NotPicklable: under forkserver or spawn, ``initializer`` or ``initargs`` cannot be
            pickled.

    Every task is pickled when it is submitted, so a function or argument that cannot be
    pickled is refused by ``submit()`` with :class:`corral.NotPicklable` (a ``TypeError`` and a
    ``pickle.PicklingError``), whatever the start method. (:class:`corral.ProcessPoolExecutor`
    reports it through the future instead, as ``concurrent.futures`` does.) A task runs as
    ``fn(*args, **kwargs)`` in a worker. Every future ends exactly once: a result, an
    exception, or cancelled.

    What a future may raise besides the task's own exception (with its remote traceback as
    ``__cause__``): :class:`WorkerLost` (its worker died; a ``BrokenProcessPool``),
    :class:`TaskTimeout` (a ``TimeoutError``), :class:`MemoryLimitExceeded`,
    :class:`NotPicklable` (its result could not be pickled), :class:`UnpicklingFailed` (the
    task could not be unpickled in the worker, or its result in the parent; a
    ``BrokenProcessPool``), :class:`PoolBroken`; and a ``SystemExit`` that the task (or its
    result's pickling) raised in the worker.
    """

    def __init__(self, max_workers: int | None = None, *, spare_workers: int = 1,
                 start_method: str = "forkserver",
                 initializer: Callable[..., Any] | None = None, initargs: tuple[Any, ...] = (),
                 task_timeout: float | None = None, retries: int = 0,
                 max_tasks_per_worker: int | None = None,
                 max_memory_per_worker: int | None = None, memory_check_interval: float = 1.0,
                 startup_timeout: float | None = None,
                 backoff: Backoff | None = None, budget: RestartBudget | None = None,
                 stop_timeout: float = 5.0, name: str = "pool") -> None:
        if max_workers is None:
            max_workers = _default_workers()
        v.integer("max_workers", max_workers, minimum=1)
        v.integer("spare_workers", spare_workers)
        v.choice("start_method", start_method, START_METHODS)
        v.callable_("initializer", initializer, optional=True)
        if not isinstance(initargs, tuple):
            raise TypeError(f"initargs must be a tuple, got {initargs!r} "
                            f"({type(initargs).__name__})")
        task_timeout = _timeout("task_timeout", task_timeout)
        v.integer("retries", retries)
        if max_tasks_per_worker is not None:
            v.integer("max_tasks_per_worker", max_tasks_per_worker, minimum=1)
        if max_memory_per_worker is not None:
            v.integer("max_memory_per_worker", max_memory_per_worker, minimum=1)
        v.number("memory_check_interval", memory_check_interval, strict=True)
        startup_timeout = _timeout("startup_timeout", startup_timeout)
        if backoff is None:
            # A pool's crash loop is an initializer or import failure: retry fast, and let the
            # restart budget break the pool within seconds rather than minutes.
            backoff = Backoff(initial=0.05, cap=1.0)
        if not isinstance(backoff, Backoff):
            raise TypeError(f"backoff must be a corral.Backoff, got {backoff!r}")
        if budget is None:
            budget = RestartBudget()
        if not isinstance(budget, RestartBudget):
            raise TypeError(f"budget must be a corral.RestartBudget, got {budget!r}")
        v.number("stop_timeout", stop_timeout)
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty str, got {name!r}")
        self._setup(_Config(
            name=name, max_workers=max_workers, spare_workers=spare_workers,
            start_method=start_method,
            initializer=initializer, initargs=initargs,
            task_timeout=task_timeout, retries=retries,
            max_tasks_per_worker=max_tasks_per_worker,
            max_memory_per_worker=max_memory_per_worker,
            memory_check_interval=float(memory_check_interval),
            startup_timeout=startup_timeout,
            backoff=backoff, budget=budget,
            stop_timeout=float(stop_timeout)))

    def _setup(self, cfg: _Config) -> None:
        if cfg.start_method != "fork":
            _check_spawnable(cfg.start_method, cfg.initializer, cfg.initargs)
        self._cfg = cfg
        self._core = _Core(cfg)
        self._owner_pid = os.getpid()
        # Dropped without shutdown(): finish the submitted tasks, then stop the workers.
        weakref.finalize(self, _finalize, self._core, self._owner_pid)

    # ----------------------------------------------------------------------------- submitting

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args,
               **kwargs: _P.kwargs) -> Future[_T]:
        """Run ``fn(*args, **kwargs)`` in a worker, with the pool's timeout and retries.

        Every keyword goes to ``fn``; for per-task options use :meth:`submit_task`.

        Raises:
            TypeError: ``fn`` is not callable.
            NotPicklable: ``fn`` or an argument cannot be pickled.
            PoolBroken: the pool is broken.
            RuntimeError: after ``shutdown()``.
        """
        return self._submit(fn, args, kwargs, self._cfg.task_timeout, self._cfg.retries, fn)

    def submit_task(self, fn: Callable[..., _T], args: Iterable[Any] = (),
                    kwargs: dict[str, Any] | None = None, *, timeout: float | None = _DEFAULT,
                    retries: int = _DEFAULT) -> Future[_T]:
        """Run ``fn(*args, **kwargs)`` in a worker, with per-task options.

        Args:
            fn: a callable (module-level under forkserver and spawn).
            args: the positional arguments: a tuple, list or other iterable (not a str).
            kwargs: the keyword arguments (a dict with str keys), or None.
            timeout: seconds from when the task starts running; past it the worker is killed
                after a stack dump and the future raises :class:`TaskTimeout`. None or
                ``math.inf``: no limit. Default: the pool's ``task_timeout``.
            retries: how many times to run the task again on another worker if its worker
                dies (it must be idempotent). Default: the pool's ``retries``.

        Raises:
            TypeError, ValueError: a bad argument (the message names it).
            NotPicklable, PoolBroken, RuntimeError: as :meth:`submit`.
        """
        v.callable_("fn", fn)
        if isinstance(args, str | bytes | bytearray) or not isinstance(args, Iterable):
            raise TypeError(f"args must be a tuple (or another iterable of positional "
                            f"arguments, not a string), got {args!r} ({type(args).__name__}); "
                            "for one argument write args=(value,)")
        args = tuple(args)
        if kwargs is None:
            kwargs = {}
        elif not isinstance(kwargs, dict):
            raise TypeError(f"kwargs must be a dict or None, got {kwargs!r} "
                            f"({type(kwargs).__name__})")
        else:
            bad = [k for k in kwargs if not isinstance(k, str)]
            if bad:
                raise TypeError(f"kwargs keys must be str (argument names), got {bad[0]!r} "
                                f"({type(bad[0]).__name__})")
        timeout = (self._cfg.task_timeout if timeout is _DEFAULT
                   else _timeout("timeout", timeout))
        if retries is _DEFAULT:
            retries = self._cfg.retries
        else:
            v.integer("retries", retries)
        return self._submit(fn, args, kwargs, timeout, retries, fn)

    def _check_owner(self) -> None:
        if os.getpid() != self._owner_pid:
            raise RuntimeError(
                f"pool {self._cfg.name!r} belongs to process {self._owner_pid}; this is a "
                f"forked child (pid {os.getpid()}), which has no manager thread. Make a new "
                "pool here.")

    def _submit(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                timeout: float | None, retries: int, label: Any) -> Future[Any]:
        self._check_owner()
        v.callable_("fn", fn)
        core = self._core
        if core.broken is not None:
            raise core.broken_error()
        if core.shutdown_requested:
            raise RuntimeError("cannot schedule new futures after shutdown")
        fut: _PoolFuture[Any] = _PoolFuture(core)
        refused: BaseException | None = None
        try:
            payload = pickle.dumps((fn, args, kwargs), _PROTOCOL)
        except Exception as exc:
            refused = self._refuse(fn, args, kwargs, exc)
        else:
            if (self._cfg.start_method != "fork"
                    and getattr(fn, "__module__", None) == "__main__"
                    and getattr(sys.modules.get("__main__"), "__file__", None) is None):
                refused = NotPicklable(
                    f"fn {_describe(fn)} is defined in an interactive __main__, which a "
                    f"start_method={self._cfg.start_method!r} worker cannot import. Move it "
                    "into a module, or use start_method='fork'.")
        if refused is not None:
            if not self._cfg.drop_in:
                raise refused
            # concurrent.futures reports it through the future.
            fut.set_running_or_notify_cancel()
            fut.set_exception(refused)
            return fut
        task = _Task(core.next_id(), fut, payload, label, timeout, retries)
        fut._task = task
        with core.lock:
            if core.broken is not None:
                raise core.broken_error()
            if core.shutdown_requested:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if core.thread is None:
                core.start()
            core.pending.append(task)
        core.wake()
        return fut

    def _refuse(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                exc: Exception) -> BaseException:
        what = "the task"
        for name, value in (("fn", fn), ("args", args), ("kwargs", kwargs)):
            try:
                pickle.dumps(value, _PROTOCOL)
            except Exception:
                what = f"{name} {_describe(value)}" if name == "fn" else name
                break
        advice = ("every task is sent to its worker by pickle. Use a module-level function (not "
                  "a lambda, closure or nested function) and picklable arguments.")
        if self._cfg.drop_in:
            # The very exception pickle raised, as concurrent.futures reports it, with advice.
            exc.add_note(f"corral: {what} cannot be pickled; {advice}")
            return exc
        err = NotPicklable(f"{what} cannot be pickled ({type(exc).__name__}: {exc}); {advice}")
        err.__cause__ = exc
        return err

    def map(self, fn: Callable[..., _T], *iterables: Iterable[Any],
            timeout: float | None = None, chunksize: int = 1) -> Iterator[_T]:
        """Like ``concurrent.futures.Executor.map``: results in order, ``chunksize`` items a task.

        ``timeout`` bounds the wait for all results (as in concurrent.futures; None or
        ``math.inf``: no limit); each task gets the pool's ``task_timeout``. Leaving the
        iterator early cancels the tasks that have not started; running ones finish. Each
        result is released as it is yielded.

        Raises:
            TypeError, ValueError: a bad argument (the message names it).
        """
        v.callable_("fn", fn)
        v.integer("chunksize", chunksize, minimum=1)
        timeout = _timeout("timeout", timeout, allow_zero=True)
        end = None if timeout is None else time.monotonic() + timeout
        futures: list[Future[Any]] = []
        try:
            if chunksize == 1:
                for args in zip(*iterables, strict=False):
                    futures.append(self.submit(fn, *args))
            else:
                items = zip(*iterables, strict=False)
                while chunk := tuple(itertools.islice(items, chunksize)):
                    futures.append(self._submit(_pool_worker.run_chunk, (fn, chunk), {},
                                                self._cfg.task_timeout, self._cfg.retries, fn))
        except BaseException:
            _cancel_pending(futures)
            raise
        return _results(futures, end, chunksize > 1)

    # ------------------------------------------------------------------------------- lifecycle

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking tasks; the workers exit once the submitted tasks are done.

        Args:
            wait: block until every task has ended and every worker process is gone.
            cancel_futures: cancel the tasks that have not started (running ones finish).
                With ``wait=False`` too, tasks still running at interpreter exit are stopped
                (their workers killed) instead of waited for.
        """
        wait = _flag("wait", wait)
        cancel_futures = _flag("cancel_futures", cancel_futures)
        self._check_owner()
        self._core.request_shutdown(cancel_futures, wait=wait)
        if wait:
            self._join()

    def terminate(self, wait: bool = True) -> None:
        """Stop now: cancel every task, running ones too (their workers are killed at once).

        Every future that has not finished ends cancelled. ``wait``: block until every worker
        process is gone (about a millisecond per worker).
        """
        wait = _flag("wait", wait)
        self._check_owner()
        self._core.request_shutdown(True, terminate=True)
        if wait:
            self._join()

    def _join(self) -> None:
        thread = self._core.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def worker_pids(self) -> tuple[int, ...]:
        """The pids of the worker processes that exist right now (starting, idle, busy or
        leaving), spares not included: at most ``max_workers``, but for workers on their way
        out (recycled, killed) whose places are already taken."""
        return self._core.pids

    def spare_pids(self) -> tuple[int, ...]:
        """The pids of the spare workers right now (see ``spare_workers``).

        A spare that takes a worker's place moves to :meth:`worker_pids`.
        """
        return self._core.spare_pids

    def stats(self) -> dict[str, int]:
        """Counters: workers started (spares too) and lost, tasks done, lost, retried, timed
        out, spares promoted, ..."""
        return dict(self._core.counters)

    @property
    def broken(self) -> bool:
        return self._core.broken is not None

    def __repr__(self) -> str:
        core = self._core
        state = ("broken" if core.broken else "shut down" if core.shutdown_requested
                 else "running" if core.thread is not None else "not started")
        return (f"<corral.{type(self).__name__} {self._cfg.name!r} "
                f"max_workers={self._cfg.max_workers} "
                f"start_method={self._cfg.start_method!r} {state}>")


def _flag(name: str, value: Any) -> bool:
    """A bool (0 and 1 pass too, as concurrent.futures code sometimes writes them)."""
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")


def _timeout(name: str, value: Any, *, allow_zero: bool = False) -> float | None:
    """A timeout in seconds: > 0 (>= 0 with ``allow_zero``); None or ``math.inf``: none."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) and value == math.inf:
        return None
    return v.number(name, value, strict=not allow_zero)


class _DryRunPopen:
    """Stands for the process being started while initargs are test-pickled (_check_spawnable).

    multiprocessing lets its queues, locks and events be pickled only while a process is being
    started (they reach the child as Process arguments); this makes the test pickling look like
    that, without duplicating any fd.
    """

    @staticmethod
    def duplicate_for_child(fd: int) -> int:
        return fd

    @staticmethod
    def DupFd(fd: int) -> int:  # multiprocessing's name
        return fd


def _check_spawnable(start_method: str, initializer: Any, initargs: tuple[Any, ...]) -> None:
    """Refuse at once what a forkserver/spawn worker could never receive."""
    from multiprocessing import context

    for what, value in (("initializer", initializer), ("initargs", initargs)):
        context.set_spawning_popen(_DryRunPopen())  # type: ignore[arg-type]
        try:
            pickle.dumps(value, _PROTOCOL)
        except Exception as exc:
            raise NotPicklable(
                f"{what} {_describe(value) if callable(value) else repr(value)[:80]} "
                f"cannot be pickled, which start_method={start_method!r} requires "
                f"({type(exc).__name__}: {exc}). Use a module-level function with "
                "picklable arguments, or start_method='fork'.") from exc
        finally:
            context.set_spawning_popen(None)


def _cancel_pending(futures: Iterable[Future[Any]]) -> None:
    for f in futures:
        if isinstance(f, _PoolFuture):
            f._cancel(allow_running=False)
        else:
            f.cancel()


def _result(fut: Future[Any], end: float | None) -> Any:
    # A function of its own, so that neither the future nor its result outlives the call in a
    # local variable of the generator below.
    return fut.result() if end is None else fut.result(end - time.monotonic())


def _results(futures: list[Future[Any]], end: float | None, chunked: bool) -> Iterator[Any]:
    # Holds no reference to a result it has yielded (concurrent.futures' test_free_reference):
    # futures are popped, results yielded straight from the call, chunks popped item by item.
    try:
        futures.reverse()
        while futures:
            if chunked:
                chunk = _result(futures.pop(), end)
                chunk.reverse()
                while chunk:
                    yield chunk.pop()
                del chunk
            else:
                yield _result(futures.pop(), end)
    finally:
        _cancel_pending(futures)
