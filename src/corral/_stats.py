"""Counters a pool's loop keeps about itself, for metrics: cheap to update, read from any thread.

The monitor updates them on its own thread; a metrics collector (``corral.metrics``) reads a
:meth:`PoolStats.snapshot`. Labels stay bounded: reasons and causes come from small closed sets
(:class:`corral.StopReason` values; "exit 0".."exit 255" codes are folded into "exit code" unless
they are one of a few named ones; signal names).
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from dataclasses import dataclass

from corral.events import ExitRecord

__all__ = ["LATENCY_BUCKETS", "PoolStats", "StatsSnapshot", "exit_cause"]

# Seconds, death noticed -> replacement started (a process exists).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0)
_NAMED_CODES = {0, 1, 2, 3, 120, 127, 137, 143}


def exit_cause(record: ExitRecord) -> str:
    """A bounded label for how a process ended: "SIGKILL", "exit 1", "exit other", ..."""
    status = record.exit
    if status is None:
        return "not started"
    if status.signal is not None:
        return status.signal_name or f"signal {status.signal}"
    if status.code is None:
        return "unknown"
    return f"exit {status.code}" if status.code in _NAMED_CODES else "exit other"


@dataclass(frozen=True)
class StatsSnapshot:
    restarts: dict[str, int]  # by the StopReason (name, lower case) of the exit before it
    exits: dict[str, int]  # by exit_cause()
    latency_buckets: tuple[int, ...]  # cumulative counts per LATENCY_BUCKETS bound, then +Inf
    latency_sum: float
    latency_count: int
    gave_up: bool
    budget_remaining: int | None  # None: no limit


class PoolStats:
    """Updated by the pool's loop thread only; snapshots are taken under a lock.

    :meth:`snapshot` hands out the same object until a figure changes: a scrape every second
    of a quiet pool then compares its counters by identity, not by content.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changes = 0  # bumped by every update; the last snapshot is valid while equal
        self._last: tuple[int, StatsSnapshot] | None = None
        self._restarts: Counter[str] = Counter()
        self._exits: Counter[str] = Counter()
        self._buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self._sum = 0.0
        self._count = 0
        self.gave_up = False
        self.budget_remaining: int | None = None

    def exited(self, record: ExitRecord) -> None:
        with self._lock:
            self._exits[exit_cause(record)] += 1
            self._changes += 1

    def restarted(self, reason: str, latency: float | None) -> None:
        """A replacement process was started; ``latency``: seconds since the death was seen."""
        with self._lock:
            self._changes += 1
            self._restarts[reason] += 1
            if latency is not None:
                self._buckets[bisect.bisect_left(LATENCY_BUCKETS, latency)] += 1
                self._sum += latency
                self._count += 1

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            last = self._last
            # gave_up and budget_remaining are plain attributes the loop sets: checked here.
            if (last is not None and last[0] == self._changes
                    and last[1].gave_up == self.gave_up
                    and last[1].budget_remaining == self.budget_remaining):
                return last[1]
            cumulative, total = [], 0
            for n in self._buckets:
                total += n
                cumulative.append(total)
            snap = StatsSnapshot(dict(self._restarts), dict(self._exits), tuple(cumulative),
                                 self._sum, self._count, self.gave_up, self.budget_remaining)
            self._last = (self._changes, snap)
            return snap
