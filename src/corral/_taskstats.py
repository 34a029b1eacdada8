"""Task counters of a :class:`corral.ProcessPool`, for metrics: the calls its manager makes.

The pool updates a :class:`PoolTaskStats`; the metrics collector (``corral.metrics``) reads a
:meth:`PoolTaskStats.snapshot` at scrape time. Nothing here imports prometheus_client or the
pool. The life of one task, and the call for each step::

    submit() (caller's thread)               -> submitted()            queued +1
    written to a worker (manager)             -> started()              queued -1, running +1
    its worker died and it is retried         -> requeued()             running -1, queued +1
    its future ends (manager, or submit's     -> finished(outcome, duration)
      thread for a refused task)                 duration None: it never ran (queued -1),
                                                 else: it ran that long (running -1)

``outcome`` is one of :data:`OUTCOMES`; :func:`outcome_of` maps a finished future (or its
exception) to one. Labels stay bounded: every outcome is from that closed set.

A :class:`corral.ProcessPool` whose tasks end on several threads (a result on the manager
thread, a cancellation on the owner's) uses the same steps keyed by a :class:`TaskMark` kept
with each future: ``task_started``, ``task_requeued``, ``task_ended``. Each step checks the
mark under the lock, so a task counts once as queued or running whatever the race (a task
cancelled while its worker dies is not put back in the queue figures).
"""

from __future__ import annotations

import bisect
import threading
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from typing import Any

__all__ = ["FAILURE_KINDS", "OUTCOMES", "TASK_BUCKETS", "PoolTaskStats", "TaskMark",
           "TaskStatsSnapshot", "outcome_of"]

# Seconds a task ran (from when it was written to its worker to its end).
TASK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                30.0, 60.0, 300.0, 900.0, 3600.0)

# A failure's kind, by the exception's class (most specific first in its MRO). By name, so
# this module needs nothing of corral.pool.
_BY_CLASS = {
    "MemoryLimitExceeded": "memory",
    "WorkerLost": "worker_lost",
    "TaskTimeout": "timeout",
    "UnpicklingFailed": "unpicklable",
    "NotPicklable": "not_picklable",
    "PoolBroken": "pool_broken",
}
FAILURE_KINDS = ("error", "worker_lost", "timeout", "memory", "unpicklable", "not_picklable",
                 "pool_broken")
OUTCOMES = ("ok", "cancelled", *FAILURE_KINDS)


def outcome_of(result: Future[Any] | BaseException | None) -> str:
    """The outcome of a finished task: "ok", "cancelled", or a failure kind.

    Args:
        result: the task's finished future, or the exception it ended with (None: a result).
            A task's own exception (it raised) is "error".
    """
    if isinstance(result, Future):
        if result.cancelled():
            return "cancelled"
        result = result.exception()
    if result is None:
        return "ok"
    if isinstance(result, CancelledError):
        return "cancelled"
    for cls in type(result).__mro__:
        kind = _BY_CLASS.get(cls.__name__)
        if kind is not None and cls.__module__.startswith("corral"):
            return kind
    return "error"


class TaskMark:
    """Where one task is, as its pool's :class:`PoolTaskStats` counts it: queued, running
    (since ``since``, on the monotonic clock) or ended. Read and written under that lock."""

    __slots__ = ("since", "state")

    QUEUED, RUNNING, ENDED = 0, 1, 2

    def __init__(self) -> None:
        self.state = TaskMark.QUEUED
        self.since = 0.0


@dataclass(frozen=True)
class TaskStatsSnapshot:
    pool: str
    submitted: int
    outcomes: dict[str, int]  # by outcome ("ok", "cancelled", failure kinds); zeros included
    retried: int
    queued: int  # submitted, not running yet (retries waiting included)
    running: int
    duration_buckets: tuple[int, ...]  # cumulative counts per TASK_BUCKETS bound, then +Inf
    duration_sum: float
    duration_count: int


class PoolTaskStats:
    """Counters one pool's manager keeps about its tasks; read from any thread.

    Args:
        pool: the pool's name (the ``pool`` label).

    Raises:
        TypeError: ``pool`` is not a non-empty str.
    """

    def __init__(self, pool: str) -> None:
        if not isinstance(pool, str) or not pool:
            raise TypeError(f"pool must be a non-empty str, got {pool!r}")
        self.pool = pool
        self._lock = threading.Lock()
        self._submitted = 0
        self._outcomes = dict.fromkeys(OUTCOMES, 0)
        self._retried = 0
        self._queued = 0
        self._running = 0
        self._buckets = [0] * (len(TASK_BUCKETS) + 1)
        self._sum = 0.0
        self._count = 0

    def submitted(self, n: int = 1) -> None:
        """``n`` tasks were queued (submit(), any thread)."""
        with self._lock:
            self._submitted += n
            self._queued += n

    def started(self) -> None:
        """A queued task was written to a worker."""
        with self._lock:
            self._queued -= 1
            self._running += 1

    def requeued(self) -> None:
        """A running task went back to the queue (its worker died and it is retried)."""
        with self._lock:
            self._running -= 1
            self._queued += 1
            self._retried += 1

    def finished(self, outcome: str, duration: float | None) -> None:
        """A task's future ended.

        Args:
            outcome: one of :data:`OUTCOMES` (see :func:`outcome_of`).
            duration: seconds it ran, or None if it never started (cancelled or failed while
                queued, refused at submit).

        Raises:
            ValueError: ``outcome`` is not one of :data:`OUTCOMES` (the label set stays closed).
        """
        if outcome not in self._outcomes:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
        with self._lock:
            self._outcomes[outcome] += 1
            if duration is None:
                self._queued -= 1
            else:
                self._running -= 1
                self._buckets[bisect.bisect_left(TASK_BUCKETS, duration)] += 1
                self._sum += duration
                self._count += 1

    # -- keyed by a task's mark (a pool whose tasks end on several threads)

    def task_started(self, mark: TaskMark, now: float) -> None:
        """The task was written to a worker at ``now`` (a no-op once it has ended)."""
        with self._lock:
            if mark.state == TaskMark.QUEUED:
                mark.state, mark.since = TaskMark.RUNNING, now
                self._queued -= 1
                self._running += 1

    def task_requeued(self, mark: TaskMark) -> None:
        """Its worker died and it goes back to the queue (a no-op unless it was running)."""
        with self._lock:
            if mark.state == TaskMark.RUNNING:
                mark.state = TaskMark.QUEUED
                self._running -= 1
                self._queued += 1
                self._retried += 1

    def task_ended(self, mark: TaskMark, outcome: str, now: float) -> None:
        """Its future ended at ``now`` with ``outcome``; counted once, whatever calls twice.

        Raises:
            ValueError: ``outcome`` is not one of :data:`OUTCOMES`.
        """
        if outcome not in self._outcomes:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
        with self._lock:
            state = mark.state
            if state == TaskMark.ENDED:
                return
            mark.state = TaskMark.ENDED
            self._outcomes[outcome] += 1
            if state == TaskMark.QUEUED:
                self._queued -= 1
            else:
                self._running -= 1
                duration = max(0.0, now - mark.since)
                self._buckets[bisect.bisect_left(TASK_BUCKETS, duration)] += 1
                self._sum += duration
                self._count += 1

    def snapshot(self) -> TaskStatsSnapshot:
        with self._lock:
            cumulative, total = [], 0
            for n in self._buckets:
                total += n
                cumulative.append(total)
            return TaskStatsSnapshot(self.pool, self._submitted, dict(self._outcomes),
                                     self._retried, max(0, self._queued),
                                     max(0, self._running), tuple(cumulative), self._sum,
                                     self._count)

    def __repr__(self) -> str:
        return f"<PoolTaskStats {self.pool!r}>"
