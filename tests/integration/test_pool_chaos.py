"""ProcessPool under fire: tasks while workers are SIGKILLed at random moments, some tasks hang
past their timeout and some go over the memory limit. Every future must end exactly once, the
right ones with the right errors, the rest with the right results, and no process may be left.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import random
import signal
import threading
import time
from collections import Counter
from typing import Any

import pool_tasks as tasks
import psutil
import pytest

from corral import RestartBudget
from corral.pool import MemoryLimitExceeded, ProcessPool, TaskTimeout, WorkerLost

# fork is tested on purpose; Python 3.12+ warns about forking a process that has threads.
pytestmark = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning")

# (start method, tasks, kills): the full run under fork, smaller ones where starts are slower.
RUNS = [("fork", 1000, 50), ("forkserver", 200, 10), ("spawn", 100, 5)]


@pytest.mark.parametrize(("start_method", "n_tasks", "n_kills"), RUNS)
@pytest.mark.timeout(150)
def test_chaos(no_leaks: set[int], start_method: str, n_tasks: int, n_kills: int) -> None:
    seed = int(os.environ.get("CHAOS_SEED", random.randrange(1 << 30)))
    print(f"CHAOS_SEED={seed}")  # shown on failure, to replay the same run
    rng = random.Random(seed)
    base = psutil.Process().memory_info().rss  # a forked worker starts about this big
    limit = base + (80 << 20)
    hog_mb = (limit >> 20) + 80
    n_hang = n_hog = max(3, n_tasks // 40)
    kinds = ["hang"] * n_hang + ["hog"] * n_hog + ["normal"] * (n_tasks - n_hang - n_hog)
    rng.shuffle(kinds)

    pool = ProcessPool(4, start_method=start_method, max_memory_per_worker=limit,
                       memory_check_interval=0.1, budget=RestartBudget(max_restarts=None),
                       stop_timeout=2.0)
    calls: Counter[int] = Counter()
    futures: list[cf.Future[Any]] = []
    retries: list[int] = []
    killed: set[int] = set()
    seen: set[int] = set()
    all_done = threading.Event()

    def killer() -> None:
        # Wait for workers to exist, then kill one at a random moment, n_kills times.
        while len(killed) < n_kills and not all_done.is_set():
            pids = pool.worker_pids()
            seen.update(pids)
            no_leaks.update(pids, pool.spare_pids())
            if pids:
                pid = rng.choice(pids)
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
                except ProcessLookupError:
                    pass
            all_done.wait(rng.uniform(0.002, 0.04))

    try:
        for i, kind in enumerate(kinds):
            if kind == "normal":
                r = 2 if i % 3 == 0 else 0
                fut = pool.submit_task(tasks.sleep_then, (i, rng.uniform(0, 0.006)), retries=r)
            elif kind == "hang":
                r = 0
                fut = pool.submit_task(tasks.hang_in_here, timeout=0.2)
            else:
                r = 0
                fut = pool.submit(tasks.hog, hog_mb, 60)
            fut.add_done_callback(lambda _f, i=i: calls.update([i]))
            futures.append(fut)
            retries.append(r)
            if i == 20:
                threading.Thread(target=killer, daemon=True).start()
        _, not_done = cf.wait(futures, timeout=120)
        all_done.set()
        assert not not_done, f"{len(not_done)} futures never ended (seed {seed})"
    finally:
        all_done.set()
        no_leaks.update(pool.worker_pids(), pool.spare_pids())
        t0 = time.monotonic()
        pool.shutdown(wait=True, cancel_futures=True)
        assert time.monotonic() - t0 < 20, "shutdown took too long"
    assert pool.worker_pids() == ()
    assert calls == Counter(range(n_tasks)), "a future ended more than once, or never"

    tally: Counter[str] = Counter()
    for i, (kind, fut) in enumerate(zip(kinds, futures, strict=True)):
        assert not fut.cancelled()
        exc = fut.exception(timeout=0)
        where = f"task {i} ({kind}, seed {seed}): {exc!r}"
        if exc is None:
            assert kind == "normal", where
            assert fut.result() == i * 2, where
            tally["ok"] += 1
        elif type(exc) is WorkerLost:
            # Only a worker the test killed, running this very task.
            assert exc.pid in killed, where
            assert exc.exit is not None and exc.exit.signal == signal.SIGKILL, where
            assert exc.attempts == retries[i] + 1, where
            tally["lost"] += 1
        elif isinstance(exc, TaskTimeout):
            assert kind == "hang", where
            tally["timeout"] += 1
            tally["dump"] += "hang_in_here" in exc.dump
        elif isinstance(exc, MemoryLimitExceeded):
            assert kind == "hog", where
            assert exc.rss > limit, where
            tally["memory"] += 1
        else:
            raise AssertionError(f"unexpected outcome for {where}")
    print(dict(tally), pool.stats(), f"killed={len(killed)}")
    n_normal = kinds.count("normal")
    # Most of the ordinary work survives (the rest was on a killed worker). Hanging and hogging
    # tasks hold a worker longest, so the killer often gets them first; still, enough of them
    # must get their own errors for this run to prove something.
    assert tally["ok"] >= n_normal * 0.8, tally
    assert tally["timeout"] >= max(1, n_hang // 5), tally
    assert tally["dump"] >= tally["timeout"] // 2, tally
    assert tally["memory"] >= max(1, n_hog // 5), tally
    assert len(killed) >= n_kills * 0.8, (len(killed), n_kills)
    stats = pool.stats()
    assert stats["workers_lost"] <= len(killed)
    assert stats["timeouts"] == tally["timeout"]
