"""corral.ProcessPool with real processes: deaths, timeouts, cancellation, recycling, shutdown."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pool_tasks as tasks
import psutil
import pytest

from corral import Backoff, ExitStatus, NotPicklable, RestartBudget
from corral.pool import (
    MemoryLimitExceeded,
    PoolBroken,
    ProcessPool,
    RemoteTraceback,
    TaskTimeout,
    WorkerLost,
)
from support import START_METHODS, pid_alive, wait_for

# fork is tested on purpose; Python 3.12+ warns about forking a process that has threads.
pytestmark = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning")

FAST = Backoff(initial=0.01, multiplier=2.0, cap=0.05, jitter=0.0)


@contextmanager
def running_pool(started: set[int], **options: Any) -> Iterator[ProcessPool]:
    """A pool that is shut down at the end; every worker pid it had goes to ``no_leaks``."""
    options.setdefault("start_method", "fork")
    options.setdefault("max_workers", 2)
    options.setdefault("stop_timeout", 2.0)
    pool = ProcessPool(**options)
    stop = threading.Event()

    def watch() -> None:  # so that no_leaks can kill every worker by pid, even on failure
        while not stop.is_set():
            started.update(pool.worker_pids(), pool.spare_pids())
            stop.wait(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield pool
    finally:
        started.update(pool.worker_pids(), pool.spare_pids())
        t0 = time.monotonic()
        pool.shutdown(wait=True, cancel_futures=True)
        stop.set()
        watcher.join()
        assert time.monotonic() - t0 < 30, "shutdown took too long"
        assert pool.worker_pids() == () and pool.spare_pids() == ()


def outcome(fut: cf.Future[Any]) -> Any:
    assert fut.done()
    if fut.cancelled():
        return "cancelled"
    exc = fut.exception()
    return exc if exc is not None else fut.result()


# ------------------------------------------------------------------------ basics, every method


@pytest.mark.parametrize("start_method", START_METHODS)
@pytest.mark.timeout(60)
def test_smoke_every_start_method(no_leaks: set[int], tmp_path: Path, start_method: str) -> None:
    with running_pool(no_leaks, start_method=start_method, initializer=tasks.init_set,
                      initargs=("ready",)) as pool:
        assert pool.submit(tasks.square, 7).result(timeout=30) == 49
        assert pool.submit(tasks.add, 1, 2, z=3).result(timeout=10) == 6
        assert pool.submit(tasks.get_initialized).result(timeout=10) == "ready"
        assert list(pool.map(tasks.square, range(20), chunksize=3)) == [i * i for i in range(20)]
        assert list(pool.map(tasks.add, [1, 2], [10, 20])) == [11, 22]

        with pytest.raises(ValueError, match="bad value 3") as info:
            pool.submit(tasks.raise_value, 3).result(timeout=10)
        assert isinstance(info.value.__cause__, RemoteTraceback)
        assert "raise_value" in str(info.value.__cause__)

        lost = pool.submit(tasks.kill_self)
        with pytest.raises(WorkerLost) as lost_info:
            lost.result(timeout=10)
        assert lost_info.value.exit == ExitStatus(signal=signal.SIGKILL)
        assert "SIGKILL(-9)" in str(lost_info.value) and "OOM" in str(lost_info.value)

        hung = pool.submit_task(tasks.hang_in_here, timeout=0.5)
        with pytest.raises(TaskTimeout) as timeout_info:
            hung.result(timeout=20)
        assert "hang_in_here" in timeout_info.value.dump

        # The pool carries on after both.
        assert pool.submit(tasks.square, 9).result(timeout=30) == 81
        stats = pool.stats()
        assert stats["workers_lost"] == 1 and stats["timeouts"] == 1


# ------------------------------------------------------------------------------ worker deaths


@pytest.mark.timeout(60)
def test_a_dead_worker_fails_only_its_task(no_leaks: set[int]) -> None:
    with running_pool(no_leaks, max_workers=3) as pool:
        slow = [pool.submit(tasks.sleep_then, i, 0.2) for i in range(6)]
        victim = pool.submit(tasks.kill_self)
        more = [pool.submit(tasks.square, i) for i in range(50)]
        with pytest.raises(WorkerLost) as info:
            victim.result(timeout=20)
        err = info.value
        assert err.pid is not None and err.exitcode == -signal.SIGKILL
        assert f"worker pid {err.pid} died while running" in str(err)
        assert "pool_tasks.kill_self" in str(err)
        assert [f.result(timeout=20) for f in slow] == [i * 2 for i in range(6)]
        assert [f.result(timeout=20) for f in more] == [i * i for i in range(50)]
        wait_for(lambda: not pid_alive(err.pid), 5, "the dead worker to be reaped")
        # 3 workers (the spare took the dead worker's place), and a new spare apart.
        wait_for(lambda: len(pool.worker_pids()) == 3 and len(pool.spare_pids()) == 1, 10,
                 "a replacement worker")
        assert err.pid not in pool.worker_pids() + pool.spare_pids()
        # The error crosses process boundaries intact.
        copy = pickle.loads(pickle.dumps(err))
        assert (type(copy), copy.pid, copy.exit, str(copy)) == (
            WorkerLost, err.pid, err.exit, str(err))


@pytest.mark.timeout(60)
def test_exit_code_is_reported(no_leaks: set[int]) -> None:
    with running_pool(no_leaks) as pool:
        with pytest.raises(WorkerLost, match=r"exit code 3") as info:
            pool.submit(tasks.exit_with, 3).result(timeout=20)
        assert info.value.exitcode == 3
        assert pool.submit(tasks.square, 2).result(timeout=20) == 4


@pytest.mark.timeout(60)
def test_retries_run_the_task_again_on_another_worker(no_leaks: set[int],
                                                      tmp_path: Path) -> None:
    with running_pool(no_leaks) as pool:
        fut = pool.submit_task(tasks.die_once, (str(tmp_path / "a"), 5), retries=1)
        assert fut.result(timeout=20) == 5
        assert pool.stats()["retried"] == 1
        # Without retries, the same task fails.
        with pytest.raises(WorkerLost, match="die_once"):
            pool.submit(tasks.die_once, str(tmp_path / "b"), 6).result(timeout=20)
        # Retries run out: the last error says how many attempts there were.
        with pytest.raises(WorkerLost, match=r"attempt 3 of 3") as info:
            pool.submit_task(tasks.kill_self, retries=2).result(timeout=20)
        assert info.value.attempts == 3


@pytest.mark.timeout(60)
def test_pool_default_retries(no_leaks: set[int], tmp_path: Path) -> None:
    with running_pool(no_leaks, retries=1) as pool:
        assert pool.submit(tasks.die_once, str(tmp_path / "m"), 7).result(timeout=20) == 7
        with pytest.raises(WorkerLost):
            pool.submit_task(tasks.die_once, (str(tmp_path / "n"), 8),
                             retries=0).result(timeout=20)


# ------------------------------------------------------------------- timeouts, cancellation


@pytest.mark.timeout(60)
def test_timeout_kills_the_worker_with_a_stack_dump(no_leaks: set[int], tmp_path: Path) -> None:
    with running_pool(no_leaks, task_timeout=0.5) as pool:
        marker = tmp_path / "started"
        fut = pool.submit(tasks.hang_after_marker, str(marker))
        quick = pool.submit_task(tasks.sleep_then, (1, 1.0), timeout=None)  # overrides default
        with pytest.raises(TaskTimeout) as info:
            fut.result(timeout=20)
        err = info.value
        assert isinstance(err, TimeoutError)
        worker_pid = int(marker.read_text())
        assert err.pid == worker_pid and err.timeout == 0.5
        assert "hang_in_here" in err.dump and "hang_after_marker" in err.dump
        assert "did not finish within its timeout of 0.5s" in str(err)
        assert "hang_in_here" in str(err)  # the evidence is in the message too
        wait_for(lambda: not pid_alive(worker_pid), 5, "the hung worker to be killed")
        assert quick.result(timeout=20) == 2
        assert pool.submit(tasks.square, 3).result(timeout=20) == 9


@pytest.mark.timeout(60)
def test_timeout_kills_the_workers_children_too(no_leaks: set[int], tmp_path: Path) -> None:
    path = tmp_path / "grandchild"
    with running_pool(no_leaks) as pool:
        fut = pool.submit_task(tasks.start_grandchild, (str(path),), timeout=1.0)
        grandchild = int(wait_for(lambda: path.exists() and path.read_text(), 20,
                                  "the grandchild's pid"))
        no_leaks.add(grandchild)
        with pytest.raises(TaskTimeout):
            fut.result(timeout=20)
        wait_for(lambda: not pid_alive(grandchild), 5, "the grandchild to be killed")


@pytest.mark.timeout(60)
def test_cancel_a_running_task(no_leaks: set[int], tmp_path: Path) -> None:
    marker = tmp_path / "running"
    with running_pool(no_leaks) as pool:
        fut = pool.submit(tasks.hang_after_marker, str(marker))
        done_calls: list[cf.Future[Any]] = []
        fut.add_done_callback(done_calls.append)
        worker_pid = int(wait_for(lambda: marker.exists() and marker.read_text(), 20,
                                  "the task to start"))
        assert fut.running()
        assert fut.cancel() is True
        assert fut.cancelled() and fut.done()
        assert done_calls == [fut]
        with pytest.raises(cf.CancelledError):
            fut.result(timeout=1)
        # wait() and as_completed() see it as done at once.
        assert fut in cf.wait([fut], timeout=1).done
        wait_for(lambda: not pid_alive(worker_pid), 5, "the worker of the cancelled task to die")
        assert pool.submit(tasks.square, 5).result(timeout=20) == 25
        assert pool.stats()["cancelled_running"] == 1
        assert fut.cancel() is True  # idempotent
        assert done_calls == [fut]


@pytest.mark.timeout(60)
def test_cancel_a_pending_task_and_a_finished_one(no_leaks: set[int]) -> None:
    with running_pool(no_leaks, max_workers=1) as pool:
        blocker = pool.submit(tasks.sleep_then, 1, 0.3)
        waiting = pool.submit(tasks.square, 4)
        assert waiting.cancel() is True
        assert list(cf.as_completed([waiting], timeout=1)) == [waiting]
        assert blocker.result(timeout=20) == 2
        assert blocker.cancel() is False
        assert pool.submit(tasks.square, 4).result(timeout=20) == 16


# -------------------------------------------------------------------------------- recycling


@pytest.mark.timeout(90)
def test_recycling_by_task_count_under_load(no_leaks: set[int]) -> None:
    # CPython's max_tasks_per_child deadlocked when a worker exited with work still queued.
    with running_pool(no_leaks, max_workers=3, max_tasks_per_worker=2) as pool:
        futures = [pool.submit(tasks.pid_and_value, i) for i in range(300)]
        results = [f.result(timeout=60) for f in futures]
        assert [value for _, value in results] == list(range(300))
        per_pid: dict[int, int] = {}
        for pid, _ in results:
            per_pid[pid] = per_pid.get(pid, 0) + 1
        assert max(per_pid.values()) <= 2
        assert len(per_pid) >= 150
        assert pool.stats()["recycled_tasks"] >= 149
        assert pool.stats()["workers_lost"] == 0


@pytest.mark.timeout(60)
def test_memory_limit_kills_a_running_task_and_recycles_after_a_task(no_leaks: set[int]) -> None:
    base = psutil.Process().memory_info().rss  # a forked worker starts about this big
    limit = base + (100 << 20)
    with running_pool(no_leaks, max_memory_per_worker=limit,
                      memory_check_interval=0.1) as pool:
        t0 = time.monotonic()
        fut = pool.submit(tasks.hog, (limit >> 20) + 100, 60)
        with pytest.raises(MemoryLimitExceeded) as info:
            fut.result(timeout=30)
        assert time.monotonic() - t0 < 20  # checked while it runs, not after
        err = info.value
        assert isinstance(err, WorkerLost)
        assert err.rss > limit and err.limit == limit
        assert "max_memory_per_worker" in str(err)
        wait_for(lambda: not pid_alive(err.pid or 0), 5, "the worker over the limit to die")
        assert pool.submit(tasks.square, 6).result(timeout=20) == 36

    # A task that leaves its worker over the limit completes; the worker is replaced after it.
    # (A long check interval, so that the check during the task does not catch it first.)
    with running_pool(no_leaks, max_memory_per_worker=limit,
                      memory_check_interval=600) as pool:
        leaker = pool.submit(tasks.leak, (limit >> 20) + 50).result(timeout=30)
        wait_for(lambda: not pid_alive(leaker), 10, "the leaking worker to be recycled")
        assert pool.stats()["recycled_memory"] == 1
        assert pool.stats()["killed_memory"] == 0
        assert pool.submit(tasks.square, 6).result(timeout=20) == 36


# --------------------------------------------------------------------------- pickling


@pytest.mark.timeout(60)
def test_pickling_failures_fail_one_task_only(no_leaks: set[int]) -> None:
    with running_pool(no_leaks, start_method="forkserver") as pool:
        with pytest.raises(NotPicklable, match=r"fn .*lambda.*cannot be pickled"):
            pool.submit(lambda: 1)
        with pytest.raises(NotPicklable, match="args cannot be pickled"):
            pool.submit(tasks.square, threading.Lock())

        with pytest.raises(NotPicklable, match=r"result.*could not be pickled"):
            pool.submit(tasks.lambda_result).result(timeout=30)
        with pytest.raises(NotPicklable, match=r"NeedsTwoArgs.*could not be pickled") as info:
            pool.submit(tasks.raise_unrebuildable).result(timeout=30)
        assert "raise_unrebuildable" in str(info.value.__cause__)
        # Large arguments and results (beyond a socket buffer) go through.
        assert pool.submit(tasks.length, b"y" * (8 << 20)).result(timeout=30) == 8 << 20
        assert len(pool.submit(tasks.make_bytes, 8 << 20).result(timeout=30)) == 8 << 20
        assert pool.stats()["workers_lost"] == 0


# ----------------------------------------------------------------------------- breaking


@pytest.mark.timeout(60)
def test_past_the_restart_budget_the_pool_breaks_cleanly(no_leaks: set[int]) -> None:
    # Each worker's initializer fails in its own way: only the budget can tell a crash loop.
    with running_pool(no_leaks, initializer=tasks.init_fail_differently, backoff=FAST,
                      budget=RestartBudget(max_restarts=3, window=60)) as pool:
        futures = [pool.submit(tasks.square, i) for i in range(10)]
        for fut in futures:
            with pytest.raises(PoolBroken) as info:
                fut.result(timeout=30)
        message = str(info.value)
        assert "restart budget" in message and "initializer says no" in message
        assert isinstance(info.value, cf.BrokenExecutor)
        assert isinstance(info.value, BrokenProcessPool)
        assert info.value.history
        assert pool.broken
        with pytest.raises(PoolBroken):
            pool.submit(tasks.square, 1)


@pytest.mark.parametrize("start_method", START_METHODS)
@pytest.mark.timeout(60)
def test_an_initializer_that_fails_twice_the_same_way_breaks_the_pool_at_once(
        no_leaks: set[int], start_method: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="corral")
    t0 = time.monotonic()
    with running_pool(no_leaks, initializer=tasks.init_fail, start_method=start_method,
                      max_workers=2) as pool:
        fut = pool.submit(tasks.square, 2)
        with pytest.raises(PoolBroken, match="failed the same way in two new workers in a row"
                           ) as info:
            fut.result(timeout=30)
        elapsed = time.monotonic() - t0
        cause = info.value.__cause__
        assert isinstance(cause, RuntimeError) and str(cause) == "initializer says no"
        assert "init_fail" in str(cause.__cause__)  # its traceback in the worker
        with pytest.raises(PoolBroken) as again:
            pool.submit(tasks.square, 1)
        assert isinstance(again.value.__cause__, RuntimeError)
        assert pool.stats()["boot_failures"] <= 3  # two workers and the spare, no retry loop
    # Seconds, not the budget's minutes (the standard library breaks in ~0.3 s).
    assert elapsed < 20
    tracebacks = [r for r in caplog.records
                  if r.levelno >= logging.WARNING and "Traceback" in r.getMessage()]
    assert len(tracebacks) == 1, [r.getMessage() for r in caplog.records]


@pytest.mark.timeout(60)
def test_crashing_tasks_spend_the_budget(no_leaks: set[int]) -> None:
    with running_pool(no_leaks, budget=RestartBudget(max_restarts=2, window=60)) as pool:
        for _ in range(3):
            with pytest.raises(WorkerLost):
                pool.submit(tasks.kill_self).result(timeout=20)
        wait_for(lambda: pool.broken, 10, "the pool to break")
        with pytest.raises(PoolBroken, match="SIGKILL"):
            pool.submit(tasks.square, 1)


@pytest.mark.timeout(60)
def test_a_hung_initializer_is_a_failed_start_with_evidence(no_leaks: set[int]) -> None:
    with running_pool(no_leaks, initializer=tasks.init_hang_in_here, startup_timeout=0.5,
                      backoff=FAST, budget=RestartBudget(max_restarts=1, window=60)) as pool:
        fut = pool.submit(tasks.square, 2)
        with pytest.raises(PoolBroken, match=r"startup_timeout=0\.5s") as info:
            fut.result(timeout=30)
        assert "init_hang_in_here" in str(info.value)  # the stack of the hung initializer


# ----------------------------------------------------------------------------- shutdown


@pytest.mark.timeout(60)
def test_shutdown_with_cancel_futures_under_load(no_leaks: set[int]) -> None:
    pool = ProcessPool(2, start_method="fork")
    futures = [pool.submit(tasks.sleep_then, i, 0.01) for i in range(500)]
    callbacks: dict[int, int] = {}
    for i, fut in enumerate(futures):
        fut.add_done_callback(lambda _f, i=i: callbacks.__setitem__(i, callbacks.get(i, 0) + 1))
    wait_for(lambda: futures[5].done(), 20, "some tasks to finish")
    no_leaks.update(pool.worker_pids(), pool.spare_pids())
    t0 = time.monotonic()
    pool.shutdown(wait=True, cancel_futures=True)
    assert time.monotonic() - t0 < 10
    outcomes = [outcome(f) for f in futures]
    assert all(o == "cancelled" or o == i * 2 for i, o in enumerate(outcomes))
    assert outcomes.count("cancelled") > 100
    assert callbacks == dict.fromkeys(range(500), 1)
    assert pool.worker_pids() == ()
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(tasks.square, 1)


@pytest.mark.timeout(60)
def test_shutdown_waits_for_submitted_tasks(no_leaks: set[int]) -> None:
    with ProcessPool(2, start_method="fork") as pool:
        futures = [pool.submit(tasks.sleep_then, i, 0.01) for i in range(40)]
        no_leaks.update(pool.worker_pids(), pool.spare_pids())
    assert [f.result(timeout=0) for f in futures] == [i * 2 for i in range(40)]


@pytest.mark.timeout(60)
def test_shutdown_never_hangs_on_a_stopped_worker(no_leaks: set[int]) -> None:
    pool = ProcessPool(2, start_method="fork", stop_timeout=0.5)
    pids = {pool.submit(tasks.getpid).result(timeout=20)}
    pids |= set(pool.worker_pids() + pool.spare_pids())
    no_leaks.update(pids)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)  # deaf to the quit message
    t0 = time.monotonic()
    pool.shutdown(wait=True)
    assert time.monotonic() - t0 < 10
    assert not any(pid_alive(pid) for pid in pids)


@pytest.mark.timeout(60)
def test_terminate_cancels_running_tasks_and_kills_their_workers(no_leaks: set[int],
                                                                 tmp_path: Path) -> None:
    pool = ProcessPool(2, start_method="fork")
    running = [pool.submit(tasks.hang_after_marker, str(tmp_path / f"m{i}")) for i in range(2)]
    waiting = [pool.submit(tasks.square, i) for i in range(10)]
    pids = [int(wait_for(lambda i=i: (tmp_path / f"m{i}").exists()
                         and (tmp_path / f"m{i}").read_text(), 20, "the tasks to start"))
            for i in range(2)]
    no_leaks.update(pids)
    t0 = time.monotonic()
    pool.terminate()
    assert time.monotonic() - t0 < 10
    assert all(f.cancelled() for f in running + waiting)
    assert not any(pid_alive(pid) for pid in pids)
    assert pool.worker_pids() == ()


@pytest.mark.timeout(60)
def test_a_dropped_pool_stops_its_workers(no_leaks: set[int]) -> None:
    pool = ProcessPool(2, start_method="fork")
    pid = pool.submit(tasks.getpid).result(timeout=20)
    no_leaks.update(pool.worker_pids(), pool.spare_pids())
    runner = pool._runner
    del pool
    assert runner.thread is not None
    runner.thread.join(20)
    assert not runner.thread.is_alive()
    assert not pid_alive(pid)


@pytest.mark.timeout(60)
def test_map_timeout_cancels_what_has_not_started(no_leaks: set[int]) -> None:
    with running_pool(no_leaks, max_workers=1) as pool:
        results = pool.map(tasks.sleep_then, range(5), [0.5] * 5, timeout=0.2)
        with pytest.raises(TimeoutError):
            list(results)
        # The running one finishes; the rest were cancelled, so the pool is free at once.
        assert pool.submit(tasks.square, 3).result(timeout=20) == 9


@pytest.mark.timeout(60)
def test_many_threads_submitting_at_once(no_leaks: set[int]) -> None:
    with running_pool(no_leaks, max_workers=3) as pool:
        out: dict[int, list[int]] = {}

        def client(k: int) -> None:
            futures = [pool.submit(tasks.add, k * 1000, i) for i in range(250)]
            out[k] = [f.result(timeout=60) for f in futures]

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert out == {k: [k * 1000 + i for i in range(250)] for k in range(4)}


_SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
import pool_tasks
from corral.pool import ProcessPool

if __name__ == "__main__":
    pool = ProcessPool(2, start_method={method!r})
    futures = [pool.submit(pool_tasks.{task}, *{args!r}) for _ in range(2)]
    while (len(pool.worker_pids() + pool.spare_pids()) < {nproc}
           or not all(f.running() for f in futures)):
        time.sleep(0.01)
    print(" ".join(map(str, pool.worker_pids() + pool.spare_pids())), flush=True)
    {end}
"""


def _run_script(tmp_path: Path, method: str, task: str, args: tuple[Any, ...],
                end: str, nproc: int = 2) -> subprocess.Popen[str]:
    script = tmp_path / "pool_script.py"
    script.write_text(_SCRIPT.format(tests=str(Path(tasks.__file__).parent), method=method,
                                     task=task, args=args, end=end, nproc=nproc))
    return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)


@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
@pytest.mark.timeout(60)
def test_workers_die_with_a_killed_parent(no_leaks: set[int], tmp_path: Path,
                                          start_method: str) -> None:
    # 3: the two busy workers and the spare, which must die with the parent too.
    proc = _run_script(tmp_path, start_method, "hang_in_here", (), "time.sleep(3600)", nproc=3)
    try:
        assert proc.stdout is not None
        pids = [int(p) for p in proc.stdout.readline().split()]
        no_leaks.update(pids)
        assert len(pids) == 3 and all(pid_alive(p) for p in pids)
        proc.kill()  # SIGKILL: no clean-up code runs in the parent
        proc.wait(10)
        wait_for(lambda: not any(pid_alive(p) for p in pids), 10, "the orphaned workers to die")
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.timeout(60)
def test_exit_without_shutdown_finishes_the_tasks_and_the_workers(no_leaks: set[int],
                                                                   tmp_path: Path) -> None:
    proc = _run_script(tmp_path, "forkserver", "sleep_then", (1, 0.3), "pass")
    try:
        assert proc.stdout is not None
        pids = [int(p) for p in proc.stdout.readline().split()]
        no_leaks.update(pids)
        assert proc.wait(30) == 0
        assert not any(pid_alive(p) for p in pids)
    finally:
        proc.kill()
        proc.wait(10)


# ------------------------------------------------------------------------------ asyncio


@pytest.mark.timeout(60)
def test_asyncio_run_in_executor_and_wrap_future(no_leaks: set[int], tmp_path: Path) -> None:
    marker = tmp_path / "async-running"
    with running_pool(no_leaks) as pool:

        async def main() -> tuple[list[int], int, bool]:
            loop = asyncio.get_running_loop()
            squares = await asyncio.gather(
                *(loop.run_in_executor(pool, tasks.square, i) for i in range(10)))
            wrapped = await asyncio.wrap_future(pool.submit(tasks.add, 2, 3))
            # Cancelling the asyncio side cancels the running task and kills its worker.
            running = asyncio.ensure_future(
                loop.run_in_executor(pool, tasks.hang_after_marker, str(marker)))
            while not (marker.exists() and marker.read_text()):  # its pid is in it
                await asyncio.sleep(0.01)
            running.cancel()
            try:
                await running
            except asyncio.CancelledError:
                pass
            return squares, wrapped, running.cancelled()

        squares, wrapped, cancelled = asyncio.run(main())
        assert squares == [i * i for i in range(10)]
        assert wrapped == 5 and cancelled
        worker_pid = int(marker.read_text())
        wait_for(lambda: not pid_alive(worker_pid), 5, "the cancelled task's worker to die")


# ----------------------------------------------------------------------------- spare workers


def _ready_spare(pool: ProcessPool) -> int:
    (spare,) = wait_for(pool.spare_pids, 20, "a spare worker")
    return spare


@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
@pytest.mark.timeout(60)
def test_a_spare_takes_the_place_of_a_killed_worker(no_leaks: set[int], tmp_path: Path,
                                                    start_method: str) -> None:
    marker = tmp_path / "running"
    with running_pool(no_leaks, max_workers=1, spare_workers=1,
                      start_method=start_method) as pool:
        worker = pool.submit(tasks.getpid).result(timeout=20)
        spare = _ready_spare(pool)
        assert spare != worker and pool.worker_pids() == (worker,)
        busy = pool.submit(tasks.hang_after_marker, str(marker))
        assert int(wait_for(lambda: marker.exists() and marker.read_text(), 20,
                            "the task to start")) == worker
        os.kill(worker, signal.SIGKILL)
        assert pool.submit(tasks.getpid).result(timeout=20) == spare
        with pytest.raises(WorkerLost):
            busy.result(timeout=20)
        # A new spare is started in the background.
        new_spare = _ready_spare(pool)
        assert new_spare not in (worker, spare)
        wait_for(lambda: pool.worker_pids() == (spare,) and pool.spare_pids() == (new_spare,),
                 10, "the dead worker to be reaped")
        stats = pool.stats()
        assert stats["spares_promoted"] == 1 and stats["workers_lost"] == 1
        assert stats["started"] == 3


@pytest.mark.timeout(60)
def test_a_spare_replaces_a_recycled_worker(no_leaks: set[int]) -> None:
    with running_pool(no_leaks, max_workers=1, spare_workers=1, max_tasks_per_worker=1) as pool:
        first = pool.submit(tasks.getpid).result(timeout=20)  # starts the pool
        # Once the recycled worker is gone, the first spare has taken its place; the spare now
        # is the next one.
        wait_for(lambda: first not in pool.worker_pids(), 20, "the recycled worker to leave")
        spare = _ready_spare(pool)
        assert pool.submit(tasks.getpid).result(timeout=20) not in (first, spare)
        assert pool.submit(tasks.getpid).result(timeout=20) == spare
        assert pool.stats()["recycled_tasks"] >= 1 and pool.stats()["spares_promoted"] >= 1


@pytest.mark.timeout(60)
def test_a_spare_gets_no_task_and_its_death_is_replaced_and_counted(no_leaks: set[int]) -> None:
    with running_pool(no_leaks, max_workers=1, spare_workers=1,
                      budget=RestartBudget(max_restarts=1, window=60)) as pool:
        worker = pool.submit(tasks.getpid).result(timeout=20)
        spare = _ready_spare(pool)
        # Tasks queue up for the only worker; the idle spare never takes one.
        futures = [pool.submit(tasks.pid_and_value, i) for i in range(50)]
        assert [f.result(timeout=20) for f in futures] == [(worker, i) for i in range(50)]
        os.kill(spare, signal.SIGKILL)
        new_spare = wait_for(lambda: [p for p in pool.spare_pids() if p != spare], 20,
                             "a new spare")[0]
        assert pool.stats()["workers_lost"] == 1 and pool.stats()["spares_promoted"] == 0
        assert pool.submit(tasks.getpid).result(timeout=20) == worker
        # A spare's death spends the restart budget like any other: one more breaks the pool.
        os.kill(new_spare, signal.SIGKILL)
        wait_for(lambda: pool.broken, 20, "the pool to break")
        with pytest.raises(PoolBroken, match="SIGKILL"):
            pool.submit(tasks.square, 1)


@pytest.mark.parametrize("how", ["shutdown", "terminate"])
@pytest.mark.timeout(60)
def test_shutdown_and_terminate_stop_the_spares(no_leaks: set[int], how: str) -> None:
    pool = ProcessPool(2, spare_workers=2, start_method="fork", stop_timeout=2.0)
    try:
        assert pool.submit(tasks.square, 3).result(timeout=20) == 9
        spares = wait_for(lambda: len(pool.spare_pids()) == 2 and pool.spare_pids(), 20,
                          "two spares")
        pids = set(wait_for(lambda: len(pool.worker_pids()) == 2 and pool.worker_pids(), 20,
                            "two workers"))
        no_leaks.update(pids, spares)
        assert not set(spares) & pids
        pids |= set(spares)
    finally:
        no_leaks.update(pool.worker_pids(), pool.spare_pids())
        if how == "shutdown":
            pool.shutdown(wait=True)
        else:
            pool.terminate(wait=True)
    assert pool.worker_pids() == () and pool.spare_pids() == ()
    for pid in pids:
        assert not pid_alive(pid)


@pytest.mark.timeout(60)
def test_no_spares_with_spare_workers_0(no_leaks: set[int]) -> None:
    with running_pool(no_leaks, max_workers=2, spare_workers=0) as pool:
        victim = pool.submit(tasks.kill_self)
        assert [pool.submit(tasks.square, i).result(timeout=20) for i in range(5)] == [
            i * i for i in range(5)]
        with pytest.raises(WorkerLost):
            victim.result(timeout=20)
        wait_for(lambda: len(pool.worker_pids()) == 2, 10, "a replacement worker")
        assert pool.spare_pids() == ()
        futures = [pool.submit(tasks.pid_and_value, i) for i in range(20)]
        assert {f.result(timeout=20)[0] for f in futures} <= set(pool.worker_pids())
        stats = pool.stats()
        assert stats["spares_promoted"] == 0 and stats["started"] == 3
