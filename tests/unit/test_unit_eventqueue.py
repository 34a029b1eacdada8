"""The events queue's ordinals: what an async stream compares with to start "from now on",
right even when the queue has dropped events for a slow subscriber (no process started)."""

from __future__ import annotations

from corral._eventqueue import EventQueue
from corral.events import Event, EventKind


def _event(index: int, kind: EventKind = EventKind.SPAWNED) -> Event:
    return Event(kind, "p", index, f"p-{index}", 1000 + index, 0.0)


def test_ordinals_follow_put_order_across_drops() -> None:
    q = EventQueue("p", maxlen=3)
    for i in range(1, 6):  # 1 and 2 are dropped: the queue keeps the newest 3
        q.put(_event(i))
    assert (q.queued, q.dropped) == (5, 2)
    got = []
    for _ in range(3):
        event = q.get()
        got.append((event.index, q.last_ordinal))
    assert got == [(3, 3), (4, 4), (5, 5)]  # each event's own ordinal, drops counted
    q.put(_event(6))
    q.put(_event(7, EventKind.STOPPED))
    assert [(q.get().index, q.last_ordinal) for _ in range(2)] == [(6, 6), (7, 7)]


def test_a_stream_made_now_starts_after_everything_queued() -> None:
    q = EventQueue("p", maxlen=2)
    for i in range(1, 5):
        q.put(_event(i))
    since = q.queued  # what AsyncSupervisor.events() records
    q.put(_event(5))
    seen = []
    while len(q):
        event = q.get()
        if q.last_ordinal > since:
            seen.append(event.index)
    assert seen == [5]
