"""A heap of deadlines under typed keys; setting a key again replaces its deadline."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["Deadlines"]

K = TypeVar("K", bound=Hashable)


class Deadlines(Generic[K]):
    """Deadlines with lazy cancellation: O(log n) set, pop and cancel."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, K]] = []
        self._live: dict[K, tuple[float, int]] = {}
        self._seq = itertools.count()

    def set(self, key: K, when: float) -> None:
        seq = next(self._seq)
        self._live[key] = (when, seq)
        heapq.heappush(self._heap, (when, seq, key))

    def cancel(self, key: K) -> None:
        self._live.pop(key, None)

    def cancel_where(self, predicate: Callable[[K], bool]) -> None:
        """Cancel every deadline whose key matches (O(n): for an owner that is done)."""
        for key in [k for k in self._live if predicate(k)]:
            del self._live[key]

    def get(self, key: K) -> float | None:
        entry = self._live.get(key)
        return None if entry is None else entry[0]

    def __contains__(self, key: object) -> bool:
        return key in self._live

    def __len__(self) -> int:
        return len(self._live)

    def _drop_stale(self) -> None:
        heap = self._heap
        while heap:
            when, seq, key = heap[0]
            if self._live.get(key) == (when, seq):
                return
            heapq.heappop(heap)

    def peek(self) -> float | None:
        """The earliest entry's time, cheaply: it may belong to a cancelled deadline (so a
        caller may wake early, then find nothing due), never later than the true one."""
        heap = self._heap
        return heap[0][0] if heap else None

    def next_due(self) -> float | None:
        """When the earliest live deadline falls, or None."""
        self._drop_stale()
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> list[K]:
        """Remove and return the keys whose deadline is <= now, earliest first."""
        due: list[K] = []
        while True:
            self._drop_stale()
            if not self._heap or self._heap[0][0] > now:
                return due
            _, _, key = heapq.heappop(self._heap)
            del self._live[key]
            due.append(key)
