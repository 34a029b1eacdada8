"""ProcessPool tests whose semantics both backends share, run on each: ``backend="local"`` and
``backend="ray"`` (the same assertions; the local ones mirror tests/integration/test_pool.py).

They live here, not in tests/integration, because a Ray pool needs this package's cluster, and
no other test may run inside a Ray driver. Every test checks that every worker process the
pool had is gone after ``shutdown(wait=True)``.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from ray import cloudpickle

from corral import RestartBudget
from corral.pool import PoolBroken, ProcessPool, RemoteTraceback, TaskTimeout, WorkerLost
from ray_backend import pool_targets as tasks
from support import pid_alive, wait_for

cloudpickle.register_pickle_by_value(tasks)  # Ray's workers cannot import this directory

BACKENDS = ("local", "ray")
PoolMaker = Callable[..., Any]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "ray":
        request.getfixturevalue("ray_cluster")
    return str(request.param)


@contextmanager
def watched(pool: ProcessPool) -> Iterator[set[int]]:
    """Collect every worker pid the pool shows; after the block, shut it down and check that
    each of those processes is gone (killing leftovers, by pid, even on failure)."""
    seen: set[int] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.update(pool.worker_pids(), pool.spare_pids())
            stop.wait(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield seen
    finally:
        try:
            t0 = time.monotonic()
            pool.shutdown(wait=True, cancel_futures=True)
            assert time.monotonic() - t0 < 30, "shutdown took too long"
        finally:
            stop.set()
            watcher.join()
            # A Ray actor's process ends a moment after Ray reports it killed (a broken pool's
            # last actors): give the processes a bounded while, then count what is left.
            deadline = time.monotonic() + 10
            while any(pid_alive(pid) for pid in seen) and time.monotonic() < deadline:
                time.sleep(0.02)
            left = [pid for pid in seen if pid_alive(pid)]
            for pid in left:
                os.kill(pid, signal.SIGKILL)
        assert not left, f"worker processes left after shutdown(wait=True): {left}"
        assert pool.worker_pids() == () and pool.spare_pids() == ()


def make(backend: str, **options: Any) -> ProcessPool:
    options.setdefault("max_workers", 2)
    options.setdefault("stop_timeout", 2.0)
    return ProcessPool(backend=backend, **options)


def outcome(fut: cf.Future[Any]) -> Any:
    assert fut.done()
    if fut.cancelled():
        return "cancelled"
    exc = fut.exception()
    return exc if exc is not None else fut.result()


# -------------------------------------------------------------------------------- basics


@pytest.mark.timeout(60)
def test_results_map_initializer_and_exceptions(backend: str) -> None:
    pool = make(backend, initializer=tasks.init_set, initargs=("ready",))
    with watched(pool):
        assert pool.submit(tasks.square, 7).result(timeout=30) == 49
        assert pool.submit(tasks.add, 1, 2, z=3).result(timeout=10) == 6
        assert pool.submit(tasks.get_initialized).result(timeout=10) == "ready"
        assert list(pool.map(tasks.square, range(20))) == [i * i for i in range(20)]
        assert list(pool.map(tasks.square, range(20), chunksize=3)) == [i * i for i in range(20)]
        assert list(pool.map(tasks.add, [1, 2], [10, 20])) == [11, 22]

        with pytest.raises(ValueError, match="bad value 3") as info:
            pool.submit(tasks.raise_value, 3).result(timeout=10)
        assert type(info.value) is ValueError
        assert isinstance(info.value.__cause__, RemoteTraceback)
        assert "raise_value" in str(info.value.__cause__)
        # A user's own exception class comes back as itself.
        with pytest.raises(tasks.Oops, match="mine") as oops:
            pool.submit(tasks.raise_oops, "mine").result(timeout=10)
        assert type(oops.value) is tasks.Oops
        assert "raise_oops" in str(oops.value.__cause__)
        assert pool.stats()["tasks_done"] >= 27


# ----------------------------------------------------------------------------- worker deaths


@pytest.mark.timeout(60)
def test_a_dead_worker_fails_only_its_task_and_a_retry_succeeds(backend: str,
                                                                 tmp_path: Path) -> None:
    pool = make(backend)
    with watched(pool):
        slow = [pool.submit(tasks.sleep_then, i, 0.2) for i in range(4)]
        victim = pool.submit(tasks.exit_now, 1)
        more = [pool.submit(tasks.square, i) for i in range(20)]
        with pytest.raises(WorkerLost) as info:
            victim.result(timeout=30)
        err = info.value
        assert err.pid is not None and f"pid {err.pid}" in str(err)
        assert "died while running" in str(err) and "exit_now" in str(err)
        assert [f.result(timeout=30) for f in slow] == [i * 2 for i in range(4)]
        assert [f.result(timeout=30) for f in more] == [i * i for i in range(20)]
        wait_for(lambda: not pid_alive(err.pid), 10, "the dead worker to be gone")

        # retries=1: run again on another worker, where it succeeds.
        fut = pool.submit_task(tasks.die_once, (str(tmp_path / "once"), 5), retries=1)
        assert fut.result(timeout=30) == 5
        stats = pool.stats()
        assert stats["retried"] == 1 and stats["workers_lost"] == 2
        # The pool carries on.
        assert pool.submit(tasks.square, 9).result(timeout=30) == 81


@pytest.mark.timeout(60)
def test_timeout_kills_the_worker_with_a_stack_dump(backend: str, tmp_path: Path) -> None:
    pool = make(backend)
    with watched(pool):
        marker = tmp_path / "started"
        fut = pool.submit_task(tasks.hang_after_marker, (str(marker),), timeout=1)
        wait_for(marker.exists, 30, "the task to start")
        t0 = time.monotonic()
        with pytest.raises(TaskTimeout) as info:
            fut.result(timeout=30)
        elapsed = time.monotonic() - t0
        err = info.value
        assert isinstance(err, TimeoutError)
        worker_pid = int(marker.read_text())
        assert err.pid == worker_pid and err.timeout == 1
        assert "hang_in_here" in err.dump and "hang_after_marker" in err.dump
        assert "did not finish within its timeout of 1s" in str(err)
        # A 1 s timeout, noticed well within the next 1.5 s (seconds, not milliseconds).
        assert elapsed <= 2.5, elapsed
        wait_for(lambda: not pid_alive(worker_pid), 10, "the hung worker to be killed")
        assert pool.submit(tasks.square, 3).result(timeout=30) == 9
        assert pool.stats()["timeouts"] == 1


@pytest.mark.timeout(60)
def test_cancel_a_running_task_kills_its_worker(backend: str, tmp_path: Path) -> None:
    marker = tmp_path / "running"
    pool = make(backend)
    with watched(pool):
        fut = pool.submit(tasks.hang_after_marker, str(marker))
        worker_pid = int(wait_for(lambda: marker.exists() and marker.read_text(), 30,
                                  "the task to start"))
        assert fut.running()
        assert fut.cancel() is True
        assert fut.cancelled()
        wait_for(lambda: not pid_alive(worker_pid), 10, "the worker of the cancelled task to die")
        assert pool.submit(tasks.square, 5).result(timeout=30) == 25
        assert pool.stats()["cancelled_running"] == 1


@pytest.mark.timeout(60)
def test_max_tasks_per_worker_recycles(backend: str) -> None:
    pool = make(backend, max_workers=1, max_tasks_per_worker=2)
    with watched(pool):
        pids = [pool.submit(tasks.getpid).result(timeout=30) for _ in range(6)]
        assert pids[0] == pids[1] and pids[2] == pids[3] and pids[4] == pids[5]
        assert len(set(pids)) == 3, pids
        assert pool.stats()["recycled_tasks"] >= 2
        wait_for(lambda: not any(pid_alive(p) for p in pids[:4]), 10, "recycled workers to go")


@pytest.mark.timeout(60)
def test_an_initializer_that_fails_twice_the_same_way_breaks_the_pool(backend: str) -> None:
    pool = make(backend, initializer=tasks.init_fail, budget=RestartBudget(5, 60))
    with watched(pool):
        fut = pool.submit(tasks.square, 2)
        with pytest.raises(PoolBroken, match="failed the same way in two new workers") as info:
            fut.result(timeout=30)
        cause = info.value.__cause__
        assert isinstance(cause, RuntimeError) and str(cause) == "initializer says no"
        assert "init_fail" in str(cause.__cause__)  # its traceback in the worker
        with pytest.raises(PoolBroken):
            pool.submit(tasks.square, 1)


# ------------------------------------------------------------------------------------ shutdown


@pytest.mark.timeout(60)
def test_shutdown_waits_for_submitted_tasks(backend: str) -> None:
    pool = make(backend)
    with watched(pool) as seen:
        with pool:
            futures = [pool.submit(tasks.sleep_then, i, 0.01) for i in range(30)]
        assert [f.result(timeout=0) for f in futures] == [i * 2 for i in range(30)]
        assert not any(pid_alive(pid) for pid in seen)
        with pytest.raises(RuntimeError, match="after shutdown"):
            pool.submit(tasks.square, 1)


@pytest.mark.timeout(60)
def test_shutdown_cancel_futures_cancels_what_has_not_started(backend: str,
                                                              tmp_path: Path) -> None:
    pool = make(backend, max_workers=1)
    with watched(pool):
        marker = tmp_path / "m"
        running = pool.submit(tasks.sleep_after_marker, str(marker), 0.5)
        waiting = [pool.submit(tasks.square, i) for i in range(20)]
        wait_for(marker.exists, 30, "the first task to start")
        pool.shutdown(wait=True, cancel_futures=True)
        assert running.result(timeout=0) == int(marker.read_text())
        assert [outcome(f) for f in waiting] == ["cancelled"] * 20


@pytest.mark.timeout(60)
def test_shutdown_without_waiting_returns_at_once_and_tasks_finish(backend: str,
                                                                    tmp_path: Path) -> None:
    pool = make(backend, max_workers=1)
    with watched(pool):
        marker = tmp_path / "m"
        running = pool.submit(tasks.sleep_after_marker, str(marker), 1.0)
        queued = pool.submit(tasks.square, 6)
        wait_for(marker.exists, 30, "the task to start")
        t0 = time.monotonic()
        pool.shutdown(wait=False)
        assert time.monotonic() - t0 < 0.5
        assert running.result(timeout=30) == int(marker.read_text())
        assert queued.result(timeout=30) == 36
        runner = pool._runner
        assert runner.finished.wait(30), "the pool did not finish after its tasks"


@pytest.mark.timeout(60)
def test_terminate_cancels_running_tasks_and_kills_their_workers(backend: str,
                                                                 tmp_path: Path) -> None:
    pool = make(backend)
    with watched(pool):
        running = [pool.submit(tasks.hang_after_marker, str(tmp_path / f"m{i}"))
                   for i in range(2)]
        waiting = [pool.submit(tasks.square, i) for i in range(10)]
        pids = [int(wait_for(lambda i=i: (tmp_path / f"m{i}").exists()
                             and (tmp_path / f"m{i}").read_text(), 30, "the tasks to start"))
                for i in range(2)]
        t0 = time.monotonic()
        pool.terminate()
        assert time.monotonic() - t0 < 10
        assert all(f.cancelled() for f in running + waiting)
        assert not any(pid_alive(pid) for pid in pids)
