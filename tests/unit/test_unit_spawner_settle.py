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
