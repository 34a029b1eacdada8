"""What a :class:`corral.ProcessPool` future may raise besides the task's own exception."""

from __future__ import annotations

import pickle
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from corral.errors import CorralError, GaveUp
from corral.exitstatus import ExitStatus

__all__ = [
    "MemoryLimitExceeded",
    "PoolBroken",
    "RemoteTraceback",
    "TaskTimeout",
    "UnpicklingFailed",
    "WorkerLost",
]


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
