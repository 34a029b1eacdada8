"""What the threads that submit tasks share with a pool's manager thread."""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable

from corral._taskstats import PoolTaskStats
from corral.pool._records import PoolConfig, Task
from corral.pool.errors import PoolBroken, WorkerLost

__all__ = ["COUNTERS", "PoolShared"]

COUNTERS = ("started", "tasks_done", "workers_lost", "tasks_lost", "retried", "timeouts",
            "cancelled_running", "recycled_tasks", "recycled_memory", "killed_memory",
            "boot_failures", "spares_promoted")


log = logging.getLogger("corral.procpool")

class PoolShared:
    """The state other threads see: the queue of tasks, the pool's fate, what it publishes.

    Submitters append to ``pending`` (under ``lock`` once the pool may close) and the manager
    pops from it; the manager alone writes everything else (``broken`` under ``lock``) and
    other threads read it.
    """

    def __init__(self, cfg: PoolConfig) -> None:
        self.cfg = cfg
        self.lock = threading.Lock()  # submit vs shutdown vs break
        # Submitted, not yet sent. Example: deque([<task 8 (m.square)>, <task 9 (m.square)>]).
        self.pending: deque[Task] = deque()
        self.shutdown_requested = False
        self.terminate_at_exit = False  # shutdown(wait=False, cancel_futures=True)
        self.broken: PoolBroken | None = None  # set once, for good
        self.pids: tuple[int, ...] = ()  # for worker_pids(), e.g. (4242, 4243)
        self.spare_pids: tuple[int, ...] = ()  # for spare_pids(), e.g. (4244,)
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)  # for stats()
        self.task_stats = PoolTaskStats(cfg.name)  # for metrics (corral.metrics)
        self._ids = itertools.count(1)  # task and worker ids (one sequence: never confused)

    def next_id(self) -> int:
        return next(self._ids)

    def broken_error(self) -> PoolBroken:
        """A fresh copy of the error the pool broke with (each raise gets its own traceback)."""
        broken = self.broken
        assert broken is not None
        err = PoolBroken(str(broken), broken.history)
        err.__cause__ = broken.__cause__
        return err

    # -- the manager thread's side of the queue

    def task_lost(self, t: Task, exc: WorkerLost, closing: bool) -> None:
        """``t``'s worker died under it: queue it again first if its retries allow (and the
        pool goes on), else fail it with ``exc``. On the manager thread."""
        t.worker = None
        if t.done or t.future.done():
            t.drop()
            return
        self.counters["tasks_lost"] += 1
        if t.attempts <= t.retries and self.broken is None and not closing:
            log.warning("pool %r: %s; retrying it (attempt %d of %d)", self.cfg.name, exc,
                        t.attempts + 1, t.retries + 1)
            self.counters["retried"] += 1
            self.task_stats.task_requeued(t.future._mark)
            self.pending.appendleft(t)
            return
        t.resolve(exc=exc)

    def next_task(self) -> Task | None:
        """The next task to send (now RUNNING), skipping those that ended while they waited."""
        pending = self.pending
        while pending:
            t = pending.popleft()
            if t.done:
                continue
            if not t.future._start_running():
                t.drop()  # cancelled while it waited
                continue
            return t
        return None

    def has_pending(self) -> bool:
        """Whether a task still waits to be sent (dropping the ended ones in front)."""
        pending = self.pending
        while pending:
            t = pending[0]
            if not (t.done or t.future.done()):
                return True
            pending.popleft()
            t.drop()
        return False

    def cancel_pending(self, keep: int, kept_too: bool = False) -> None:
        """Cancel the waiting tasks but the first ``keep`` (which now count as running);
        ``kept_too``: those kept by an earlier call as well (they never reached a worker)."""
        kept: list[Task] = []
        while self.pending:
            t = self.pending.popleft()
            if t.done:
                continue
            if len(kept) < keep and t.future._start_running():
                kept.append(t)
                continue
            t.drop()
            t.future._cancel(allow_running=kept_too or t.attempts > 0)
        self.pending.extend(kept)

    def fail_pending(self, error: Callable[[], BaseException]) -> None:
        """End every waiting task with a fresh ``error()``."""
        while self.pending:
            self.pending.popleft().resolve(exc=error())
