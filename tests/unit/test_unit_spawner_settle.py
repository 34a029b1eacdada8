"""The spawner forks a queued batch first and settles its processes after, before delivering."""

from __future__ import annotations

import queue

import pytest

from corral._spawner import Spawner


class _Proc:
    def __init__(self, n: int) -> None:
        self.n = n


def _run(requests: list[int], fail_settle: set[int]) -> tuple[list[str], list[tuple[int, object]],
                                                               list[int]]:
    log: list[str] = []
    discarded: list[int] = []
    delivered: queue.SimpleQueue[list[tuple[int, object]]] = queue.SimpleQueue()

    def start(req: int) -> _Proc:
        log.append(f"start {req}")
        return _Proc(req)

    def settle(proc: _Proc) -> None:
        log.append(f"settle {proc.n}")
        if proc.n in fail_settle:
            raise OSError(f"settle {proc.n}")

    def deliver(batch: list[tuple[int, _Proc | BaseException]]) -> None:
        log.append("deliver")
        delivered.put(list(batch))

    spawner: Spawner[int, _Proc] = Spawner("test-spawner", start, deliver, lambda: False,
                                           lambda p: discarded.append(p.n), settle=settle,
                                           batch_time=30.0)
    for req in requests:  # queued before the thread runs: one batch
        spawner.request(req)
    spawner.start()
    batch = delivered.get(timeout=10)
    spawner.close(timeout=10)
    assert not spawner.thread.is_alive()
    return log, batch, discarded


@pytest.mark.timeout(30)
def test_a_batch_is_started_whole_then_settled_then_delivered() -> None:
    log, batch, discarded = _run([1, 2, 3], set())
    assert log == ["start 1", "start 2", "start 3", "settle 1", "settle 2", "settle 3",
                   "deliver"]
    assert [(req, p.n) for req, p in batch if isinstance(p, _Proc)] == [(1, 1), (2, 2), (3, 3)]
    assert discarded == []


@pytest.mark.timeout(30)
def test_a_process_that_cannot_be_settled_is_discarded_and_delivered_as_its_error() -> None:
    _, batch, discarded = _run([1, 2], {1})
    assert discarded == [1]
    (req1, res1), (req2, res2) = batch
    assert req1 == 1 and isinstance(res1, OSError)
    assert req2 == 2 and isinstance(res2, _Proc)


def _run_many(before: list[int], many: list[int], after: list[int], *, skip: bool = False,
              ) -> tuple[list[str], list[tuple[int, object]]]:
    """``before`` queued alone, then ``many`` as one request of many, then ``after``; the
    fake start_many starts the even ones, leaves the odd ones (None) and fails 4."""
    log: list[str] = []
    delivered: queue.SimpleQueue[list[tuple[int, object]]] = queue.SimpleQueue()

    def start(req: int) -> _Proc:
        log.append(f"start {req}")
        return _Proc(req)

    def start_many(reqs: list[int]) -> list[_Proc | BaseException | None]:
        log.append(f"many {reqs}")
        return [OSError("4") if r == 4 else _Proc(r) if r % 2 == 0 else None for r in reqs]

    def deliver(batch: list[tuple[int, _Proc | BaseException]]) -> None:
        log.append("deliver")
        delivered.put(list(batch))

    spawner: Spawner[int, _Proc] = Spawner("test-spawner", start, deliver, lambda: skip,
                                           lambda p: None, settle=lambda p: None,
                                           batch_time=30.0, start_many=start_many)
    for req in before:
        spawner.request(req)
    spawner.request_batch(many)
    for req in after:
        spawner.request(req)
    spawner.start()
    spawner.close(timeout=10)
    assert not spawner.thread.is_alive()
    out: list[tuple[int, object]] = []
    while not delivered.empty():
        out.extend(delivered.get())
    return log, out


@pytest.mark.timeout(30)
def test_a_request_of_many_goes_to_start_many_and_what_it_leaves_to_start() -> None:
    log, out = _run_many([1], [2, 3, 4, 6], [7])
    # The lone start before it is delivered first, the batch then, what follows after.
    assert log == ["start 1", "deliver", "many [2, 3, 4, 6]", "start 3", "deliver", "start 7",
                   "deliver"]
    assert [req for req, _ in out] == [1, 2, 3, 4, 6, 7]
    results = dict(out)
    assert isinstance(results[4], OSError)
    assert all(isinstance(results[r], _Proc) for r in (1, 2, 3, 6, 7))


@pytest.mark.timeout(30)
def test_a_request_of_many_while_stopping_starts_nothing() -> None:
    from corral._spawner import SpawnSkipped

    log, out = _run_many([], [2, 3], [], skip=True)
    assert log == ["deliver"]
    assert all(isinstance(result, SpawnSkipped) for _, result in out)


@pytest.mark.timeout(30)
def test_what_start_many_leaves_is_handed_over_as_ordinary_batches_are() -> None:
    """A slow start (spawn, forkserver) of a pool's first workers reaches the loop once its
    batch is full or batch_time has passed, not after the last of them."""
    delivered: queue.SimpleQueue[list[int]] = queue.SimpleQueue()

    def deliver(batch: list[tuple[int, _Proc | BaseException]]) -> None:
        delivered.put([req for req, _ in batch])

    spawner: Spawner[int, _Proc] = Spawner("test-spawner", _Proc, deliver, lambda: False,
                                           lambda p: None, batch_time=0.0,
                                           start_many=lambda reqs: [None] * len(reqs))
    spawner.request_batch([1, 2, 3])
    spawner.start()
    spawner.close(timeout=10)
    assert [delivered.get(timeout=10) for _ in range(3)] == [[1], [2], [3]]
