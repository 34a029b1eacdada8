"""The pool manager's vocabulary and records: its configuration, tasks and worker records.

Everything here is data; :mod:`corral.pool._manager` decides what happens to it.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from concurrent.futures import InvalidStateError
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from corral.pool._wire import FrameDecoder, header

if TYPE_CHECKING:
    import psutil

    from corral._evidence import StackDump
    from corral.exitstatus import ExitStatus
    from corral.policy import Backoff, RestartBudget
    from corral.pool._future import PoolFuture

__all__ = [
    "Endpoint",
    "LeaveReason",
    "PoolConfig",
    "PoolDeadline",
    "PoolProcess",
    "PoolWorker",
    "Task",
    "WorkerDeadline",
    "WorkerState",
]


@dataclass(frozen=True)
class PoolConfig:
    """A pool's settings, validated by :class:`corral.ProcessPool` (or the drop-in executor)."""

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


class WorkerState(enum.Enum):
    """Where a worker record is in its life. Every state but LEAVING counts as a place taken.

    ::

        SPAWNING --started--> BOOTING --hello--> IDLE <--reply-- BUSY
                                                   +----task----->+
        any state --exit, quit, kill--> LEAVING (until its exit is handled, then forgotten)
    """

    SPAWNING = "spawning"  # queued for the spawner thread; no process yet
    BOOTING = "booting"  # process started; initializer running, no hello yet
    IDLE = "idle"  # waiting for a task (in the manager's idle queue, unless a spare)
    BUSY = "busy"  # running a task
    LEAVING = "leaving"  # told to quit, or killed: waiting for its exit; no longer counts


class LeaveReason(enum.Enum):
    """Why corral took a worker out of service (in the log line of its exit)."""

    SHUTDOWN = "shutdown"
    RECYCLED_TASKS = "recycled: max_tasks_per_worker"
    RECYCLED_MEMORY = "recycled: max_memory_per_worker"
    KILLED_MEMORY = "killed: max_memory_per_worker"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    TERMINATED = "terminated"
    SEND_FAILED = "could not send a task"


class PoolDeadline(enum.Enum):
    """The pool's own deadlines (one each); see the table in :mod:`corral.pool._manager`."""

    BACKOFF = "backoff"  # the backoff after failed starts is over: start workers again
    SPARE_HOLD = "spare hold"  # a promoted spare's first task had its moment: start spares
    STOP = "stop"  # the stop timeout of a closing pool: SIGKILL the stragglers
    KEPT = "kept"  # shutdown(cancel_futures=True): no worker came for the tasks kept for them


class WorkerDeadline(enum.Enum):
    """One worker's deadlines, keyed ``(worker id, kind)``; see :mod:`corral.pool._manager`."""

    TIMER = "timer"  # its task's timeout, or its next memory check, whichever is first
    DUMP = "dump"  # look at the stack dump being written again
    QUIT = "quit"  # it was asked to quit this long ago: SIGKILL it
    BOOT = "boot"  # it has not said hello within startup_timeout


DeadlineKey = PoolDeadline | tuple[int, WorkerDeadline]


class Endpoint(Protocol):
    """The manager's end of a worker's socket (a ``Connection``, or a socket in tests)."""

    def fileno(self) -> int: ...

    def close(self) -> None: ...


class PoolProcess(Protocol):
    """What the manager needs of a worker process (:class:`corral.process.WorkerProcess`, or a
    fake in tests)."""

    pid: int
    started: float  # on the manager's clock

    def waitable(self) -> int: ...

    def send(self, sig: int) -> bool: ...

    def send_group(self, sig: int) -> bool: ...

    def kill_group_leftovers(self) -> None: ...

    def reap(self) -> ExitStatus | None: ...

    def close(self) -> None: ...

    def kill_and_reap(self) -> None: ...


def describe(fn: Any) -> str:
    """``module.qualname`` of a task's function, for messages."""
    fn = getattr(fn, "func", fn)  # functools.partial
    qualname = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if qualname is None:
        return repr(fn)[:80]
    module = getattr(fn, "__module__", None)
    return f"{module}.{qualname}" if module else str(qualname)


class Task:
    """One submitted call, from ``submit()`` to its outcome.

    Example: ``Task(id=7, payload=pickle((square, (3,), {})), timeout=None, retries=0)``; once
    sent, ``attempts == 1`` and ``worker`` is the record running it.
    """

    __slots__ = ("attempts", "deadline", "done", "fn", "future", "header", "id", "payload",
                 "retries", "timeout", "worker")

    def __init__(self, tid: int, future: PoolFuture[Any], payload: bytes, fn: Any,
                 timeout: float | None, retries: int) -> None:
        self.id = tid
        self.future = future
        self.payload = payload  # the pickled (fn, args, kwargs); freed once the task ends
        self.header = header(len(payload))
        self.fn = fn  # for messages
        self.timeout = timeout
        self.retries = retries
        self.attempts = 0  # times sent to a worker
        self.deadline = math.inf  # when the running attempt times out (manager's clock)
        self.done = False  # ended (resolved, cancelled or dropped): never send it again
        self.worker: PoolWorker | None = None  # the record running it

    @property
    def label(self) -> str:
        return f"task {self.id} ({describe(self.fn)})"

    def drop(self) -> None:
        """The task has ended: free its pickled call (the caller may keep the future)."""
        self.done = True
        self.worker = None
        self.payload = self.header = b""
        self.future._task = None

    def resolve(self, value: Any = None, exc: BaseException | None = None) -> None:
        """End the task with a result or an exception (a no-op once it has ended)."""
        if self.done:
            return
        self.drop()
        fut = self.future
        try:
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(value)
        except InvalidStateError:
            pass  # cancelled by its owner meanwhile: the cancellation is its outcome


class PoolWorker:
    """The manager's record of one pool worker (one process, from its request to its exit).

    Example: ``PoolWorker(id=12, slot=3)``, state BUSY, ``proc.pid == 4242``, ``task`` task 7,
    ``tasks_done == 41``; a spare has ``spare=True`` until it takes a worker's place.
    """

    __slots__ = ("booted", "conn", "dead", "decoder", "dump", "dump_task", "dumping", "eof",
                 "fd", "id", "init_error", "init_exc", "init_summary", "leave_reason",
                 "next_mem", "proc", "ps", "slot", "spare", "state", "statm", "task",
                 "tasks_done", "waitable", "watching")

    def __init__(self, wid: int, slot: int, spare: bool = False) -> None:
        self.id = wid
        self.slot = slot  # heartbeat table slot (also in the process title)
        self.spare = spare  # started ahead, idle until promoted (see _promote_spares)
        self.state = WorkerState.SPAWNING
        self.proc: PoolProcess | None = None
        self.conn: Endpoint | None = None  # our end of its socket
        self.fd = -1  # conn's fd, non-blocking
        self.decoder = FrameDecoder()
        self.waitable = -1  # readable once the process has exited (pidfd or sentinel)
        self.watching = False  # our socket end is registered with the reactor
        self.eof = False  # the worker closed its end: it is dying
        self.dead = False  # its exit is being handled
        self.task: Task | None = None
        self.tasks_done = 0
        self.booted = False  # said hello
        self.leave_reason: LeaveReason | None = None
        self.init_error: str | None = None  # why it could not start (traceback or dump)
        self.init_exc: BaseException | None = None  # what its initializer raised
        self.init_summary: str | None = None  # its last line, if its initializer raised
        self.ps: psutil.Process | None = None  # RSS when /proc/<pid>/statm cannot be read
        self.statm = -1  # an open /proc/<pid>/statm: its RSS in one pread, ~2 us
        self.next_mem = math.inf  # its next memory check while busy (manager's clock)
        self.dumping = False  # a stack dump is being collected; SIGKILL follows
        self.dump: StackDump | None = None
        self.dump_task: Task | None = None  # the timed-out task the dump is evidence for

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None
