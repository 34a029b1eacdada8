"""The pool's future, whose ``cancel()`` also stops a running task, and ``map``'s results."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures._base import (
    CANCELLED,
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    PENDING,
    RUNNING,
)
from typing import TYPE_CHECKING, Any, TypeVar

from corral._taskstats import TaskMark, outcome_of

if TYPE_CHECKING:
    from corral._taskstats import PoolTaskStats
    from corral.pool._records import Task

__all__ = ["PoolFuture", "cancel_pending", "results"]

_T = TypeVar("_T")


class PoolFuture(Future[_T]):
    """A Future whose ``cancel()`` also works while the task runs: the pool kills its worker.

    The pool moves it PENDING -> RUNNING itself (``_start_running``), so a cancellation notifies
    waiters at once instead of when the manager reaches the task in its queue.

    Args:
        cancel_running: ``cancel_running(task)``, from any thread: the owner cancelled the
            running task (the manager kills its worker).
        stats: the pool's task counters: the future's end is counted there (once, on
            whichever thread ends it), by outcome and, if it ran, how long.
    """

    def __init__(self, cancel_running: Callable[[Task], None],
                 stats: PoolTaskStats | None = None) -> None:
        super().__init__()
        self._cancel_running = cancel_running
        self._task: Task | None = None
        self._stats = stats
        self._mark = TaskMark()

    def _invoke_callbacks(self) -> None:
        # Every end of a future (set_result, set_exception, _cancel) comes through here once,
        # before the user's callbacks: the counters are right by the time anyone looks.
        stats = self._stats
        if stats is not None:
            # Read without the condition's lock: the state is final by now.
            outcome = ("cancelled" if self._state in (CANCELLED, CANCELLED_AND_NOTIFIED)
                       else outcome_of(self._exception))
            stats.task_ended(self._mark, outcome, time.monotonic())
        super()._invoke_callbacks()  # type: ignore[misc]

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
            self._cancel_running(task)
        self._invoke_callbacks()
        return True

    def _start_running(self) -> bool:
        """PENDING -> RUNNING; True also if already RUNNING (a task given to another worker)."""
        with self._condition:
            if self._state == PENDING:
                self._state = RUNNING
                return True
            return self._state == RUNNING


def cancel_pending(futures: Iterable[Future[Any]]) -> None:
    """Cancel the futures whose task has not started (running ones finish)."""
    for f in futures:
        if isinstance(f, PoolFuture):
            f._cancel(allow_running=False)
        else:
            f.cancel()


def _result(fut: Future[Any], end: float | None) -> Any:
    # A function of its own, so that neither the future nor its result outlives the call in a
    # local variable of the generator below.
    return fut.result() if end is None else fut.result(end - time.monotonic())


def results(futures: list[Future[Any]], end: float | None, chunked: bool) -> Iterator[Any]:
    """``map``'s iterator: each result in order (a chunk's items one by one), waiting until
    ``end`` (monotonic) at most; what has not started is cancelled when it is left."""
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
        cancel_pending(futures)
