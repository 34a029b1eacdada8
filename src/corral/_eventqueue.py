"""A bounded queue of events between the monitor and the subscribers' thread.

The monitor must never block on a slow subscriber, and a crash loop must not grow memory without
bound. Past ``maxlen`` events the oldest waiting event is dropped (the newest are the ones that
say what is happening now); the pool's STOPPED event, always the last, is never dropped. Each run
of drops is logged once, with its count, when it starts and when the queue has drained.

Once the pool has stopped, subscribers get :data:`DRAIN` seconds to take what is left; then the
rest is dropped (logged with its count) and STOPPED delivered next, which ends the subscribers'
thread. A callback that never returns keeps that thread (a Python thread cannot be ended from
outside), never the pool's stop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from corral.events import Event, EventKind

__all__ = ["DEFAULT_MAXLEN", "DRAIN", "EventQueue"]

log = logging.getLogger("corral.supervisor")

DEFAULT_MAXLEN = 10_000
# Seconds after the pool's STOPPED event is queued during which subscribers still get every
# event waiting before it.
DRAIN = 1.0


class EventQueue:
    """Many producers (the monitor), one consumer (the dispatcher thread)."""

    def __init__(self, pool: str, maxlen: int = DEFAULT_MAXLEN, drain: float = DRAIN,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._pool = pool
        self._maxlen = maxlen
        self._drain = drain
        self._clock = clock
        self._drain_by: float | None = None  # set when STOPPED is queued
        self._items: deque[Event] = deque()
        self._cv = threading.Condition(threading.Lock())
        self.dropped = 0  # in all
        self._dropping = 0  # in the current run of drops
        self.queued = 0  # events put, in all
        self._taken = 0  # events got, in all
        # The ordinal (1.., in put order) of the event the last get() returned: only older
        # events are ever dropped, so it is what was taken plus what was dropped before it.
        self.last_ordinal = 0

    def put(self, event: Event) -> None:
        with self._cv:
            if len(self._items) >= self._maxlen and event.kind is not EventKind.STOPPED:
                self._items.popleft()
                self.dropped += 1
                self._dropping += 1
                if self._dropping == 1:
                    log.warning("pool %r: event subscribers are too slow; dropping the oldest "
                                "waiting events (the queue keeps the newest %d)", self._pool,
                                self._maxlen)
            if event.kind is EventKind.STOPPED:
                self._drain_by = self._clock() + self._drain
            self._items.append(event)
            self.queued += 1
            self._cv.notify()

    def get(self) -> Event:
        """The next event (blocks)."""
        with self._cv:
            while not self._items:
                self._cv.wait()
            late = self._drop_late()
            event = self._items.popleft()
            self._taken += 1
            self.last_ordinal = self._taken + self.dropped
            dropped = self._dropping if not self._items else 0
            if dropped:
                self._dropping = 0
        if late:
            log.warning("pool %r stopped more than %gs ago: %d event(s) its subscribers had not "
                        "taken yet are dropped; the STOPPED event comes next", self._pool,
                        self._drain, late)
        elif dropped:
            log.warning("pool %r: %d event(s) were dropped for slow subscribers", self._pool,
                        dropped)
        return event

    def _drop_late(self) -> int:
        """Past the drain time, drop all but STOPPED (under the lock); returns how many."""
        if self._drain_by is None or len(self._items) < 2 or self._clock() <= self._drain_by:
            return 0
        keep = deque(e for e in self._items if e.kind is EventKind.STOPPED)
        late = len(self._items) - len(keep)
        self._items = keep
        self.dropped += late
        self._dropping = 0
        return late

    def __len__(self) -> int:
        with self._cv:
            return len(self._items)
