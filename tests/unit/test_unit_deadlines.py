"""The deadline heap: ordering, replacement, lazy cancellation."""

from __future__ import annotations

import random
from typing import cast

import pytest

from corral._deadlines import Deadlines

pytestmark = pytest.mark.timeout(10)


def test_empty() -> None:
    d = Deadlines()
    assert len(d) == 0
    assert d.next_due() is None
    assert d.pop_due(1e18) == []
    assert d.get("x") is None
    assert "x" not in d


def test_pops_in_time_order() -> None:
    d = Deadlines()
    d.set((1, "hb"), 5.0)
    d.set((2, "hb"), 1.0)
    d.set((3, "stop"), 3.0)
    assert d.next_due() == 1.0
    assert d.pop_due(0.5) == []
    assert d.pop_due(3.0) == [(2, "hb"), (3, "stop")]  # <= now is due
    assert len(d) == 1
    assert d.next_due() == 5.0
    assert d.pop_due(100.0) == [(1, "hb")]
    assert len(d) == 0
    assert d.next_due() is None


def test_equal_times_pop_in_insertion_order() -> None:
    d = Deadlines()
    keys = [(i, "backoff") for i in (4, 1, 3, 0, 2)]
    for k in keys:
        d.set(k, 7.0)
    assert d.pop_due(6.999) == []
    assert d.pop_due(7.0) == keys
    assert len(d) == 0


def test_unorderable_keys_with_equal_times() -> None:
    # Keys are never compared with each other (a sequence number breaks ties).
    d = Deadlines()
    a, b = object(), object()
    d.set(a, 1.0)
    d.set(b, 1.0)
    d.set((1, 2), 1.0)
    assert d.pop_due(1.0) == [a, b, (1, 2)]


def test_set_again_replaces_the_deadline() -> None:
    d = Deadlines()
    d.set("k", 10.0)
    d.set("other", 5.0)
    d.set("k", 1.0)  # earlier
    assert len(d) == 2
    assert d.get("k") == 1.0
    assert d.pop_due(1.0) == ["k"]
    assert d.pop_due(10.0) == ["other"]  # "k" is not popped again at its old time
    assert len(d) == 0

    d.set("k", 1.0)
    d.set("k", 20.0)  # later
    assert d.next_due() == 20.0
    assert d.pop_due(19.0) == []
    assert "k" in d
    assert d.pop_due(20.0) == ["k"]


def test_replace_with_same_time_pops_once() -> None:
    d = Deadlines()
    d.set("k", 3.0)
    d.set("k", 3.0)
    d.set("k", 3.0)
    assert len(d) == 1
    assert d.pop_due(3.0) == ["k"]
    assert d.next_due() is None


def test_replacement_moves_key_behind_equal_times() -> None:
    d = Deadlines()
    d.set("a", 2.0)
    d.set("b", 2.0)
    d.set("a", 2.0)  # re-set: now later in insertion order than "b"
    assert d.pop_due(2.0) == ["b", "a"]


def test_cancel() -> None:
    d = Deadlines()
    d.set("a", 1.0)
    d.set("b", 2.0)
    d.cancel("a")
    d.cancel("a")  # twice is fine
    d.cancel("never-set")  # unknown is fine
    assert "a" not in d
    assert d.get("a") is None
    assert len(d) == 1
    assert d.next_due() == 2.0  # the cancelled head is skipped lazily
    assert d.pop_due(10.0) == ["b"]


def test_next_due_after_cancelling_several_heads() -> None:
    d = Deadlines()
    for i in range(10):
        d.set(i, float(i))
    for i in range(0, 9):
        d.cancel(i)
    assert d.next_due() == 9.0
    assert len(d) == 1
    d.cancel(9)
    assert d.next_due() is None
    assert d.pop_due(100.0) == []


def test_cancel_then_set_again() -> None:
    d = Deadlines()
    d.set("a", 1.0)
    d.cancel("a")
    d.set("a", 4.0)
    assert d.next_due() == 4.0
    assert d.pop_due(1.0) == []
    assert d.pop_due(4.0) == ["a"]


def test_set_during_iteration_of_due_keys() -> None:
    # The monitor often re-arms a key right after popping it.
    d = Deadlines()
    d.set("hb", 1.0)
    for key in d.pop_due(1.0):
        d.set(key, 2.0)
    assert d.get("hb") == 2.0
    assert d.pop_due(1.5) == []
    assert d.pop_due(2.0) == ["hb"]


def test_against_a_reference_model() -> None:
    rng = random.Random(2024)
    d = Deadlines()
    model: dict[int, float] = {}
    now = 0.0
    for _ in range(5000):
        op = rng.random()
        key = rng.randrange(30)
        if op < 0.5:
            when = now + rng.choice([0.0, 0.5, 1.0, rng.uniform(0, 5)])
            d.set(key, when)
            model[key] = when
        elif op < 0.7:
            d.cancel(key)
            model.pop(key, None)
        else:
            now += rng.uniform(0, 1)
            due = cast(list[int], d.pop_due(now))
            expected = {k for k, w in model.items() if w <= now}
            assert len(due) == len(set(due))
            assert set(due) == expected
            # earliest first (ties in insertion order, which the model does not track)
            assert [model[k] for k in due] == sorted(model[k] for k in due)
            for k in due:
                del model[k]
        assert len(d) == len(model)
        assert d.next_due() == (min(model.values()) if model else None)
        assert all((k in d) == (k in model) for k in range(30))
