"""ProcessPool task metrics over a real pool: submitted, completed, failed by kind, retried,
cancelled, queue depth, running, and the duration histogram, scraped from an Endpoint with
prometheus_client's own parser."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path
from typing import Any

import pool_tasks
import pytest

import corral
from corral.endpoint import Endpoint
from obs_support import scrape, value
from support import wait_for


def _pids(pool: corral.ProcessPool, into: set[int]) -> None:
    into.update(pool.worker_pids())
    into.update(pool.spare_pids())


@pytest.mark.timeout(90)
def test_task_metrics_of_a_real_pool(no_leaks: set[int], tmp_path: Path) -> None:
    pool = corral.ProcessPool(2, spare_workers=0, start_method="fork", name="jobs")
    with Endpoint("127.0.0.1:0", pools=[pool]) as endpoint, pool:
        addr = endpoint.address
        got = scrape(addr)
        assert value(got, "corral_tasks_submitted_total", pool="jobs") == 0
        assert value(got, "corral_tasks_failed_total", pool="jobs", kind="worker_lost") == 0
        # Results, a raised error, a dead worker, an unpicklable result, a timeout.
        assert [f.result(30) for f in [pool.submit(pool_tasks.square, i) for i in range(3)]] \
            == [0, 1, 4]
        _pids(pool, no_leaks)
        with pytest.raises(ValueError):
            pool.submit(pool_tasks.raise_value, 1).result(30)
        with pytest.raises(corral.WorkerLost):
            pool.submit(pool_tasks.kill_self).result(30)
        with pytest.raises(corral.NotPicklable):
            pool.submit(pool_tasks.lambda_result).result(30)
        _pids(pool, no_leaks)
        with pytest.raises(corral.TaskTimeout):
            pool.submit_task(pool_tasks.hang_in_here, timeout=0.5).result(30)
        # A task whose worker dies once, retried on another worker.
        assert pool.submit_task(pool_tasks.die_once, (str(tmp_path / "m"), 7),
                                retries=1).result(30) == 7
        _pids(pool, no_leaks)
        # Queue depth: both workers busy, three tasks waiting.
        busy = [pool.submit_task(pool_tasks.hang_after_marker, (str(tmp_path / f"b{i}"),))
                for i in range(2)]
        waiting = [pool.submit(pool_tasks.square, i) for i in range(3)]
        wait_for(lambda: all((tmp_path / f"b{i}").exists() for i in range(2)), 30,
                 "both workers running a task")
        _pids(pool, no_leaks)
        got = scrape(addr)
        assert value(got, "corral_tasks_running", pool="jobs") == 2
        assert value(got, "corral_tasks_queued", pool="jobs") == 3
        # Cancelled: the waiting ones, then the running ones (their workers are killed).
        for f in [*waiting, *busy]:
            assert f.cancel()
        wait_for(lambda: value(scrape(addr), "corral_tasks_running", pool="jobs") == 0, 30,
                 "no task running")
        got = scrape(addr)
        assert value(got, "corral_tasks_submitted_total", pool="jobs") == 13
        assert value(got, "corral_tasks_completed_total", pool="jobs") == 4
        for kind, n in (("error", 1), ("worker_lost", 1), ("not_picklable", 1),
                        ("timeout", 1), ("memory", 0), ("unpicklable", 0),
                        ("pool_broken", 0)):
            assert value(got, "corral_tasks_failed_total", pool="jobs", kind=kind) == n, kind
        assert value(got, "corral_tasks_cancelled_total", pool="jobs") == 5
        assert value(got, "corral_tasks_retried_total", pool="jobs") == 1
        assert value(got, "corral_tasks_queued", pool="jobs") == 0
        # Durations: every task that ran (the 3 cancelled while waiting never did); the
        # timed-out one ran at least its 0.5 s.
        count = value(got, "corral_task_duration_seconds_count", pool="jobs")
        assert count == 10  # die_once: its last attempt
        assert value(got, "corral_task_duration_seconds_bucket", pool="jobs",
                     le="+Inf") == count
        assert value(got, "corral_task_duration_seconds_bucket", pool="jobs",
                     le="0.25") <= count - 1  # type: ignore[operator]
        total = value(got, "corral_task_duration_seconds_sum", pool="jobs")
        assert total is not None and total >= 0.5
        _pids(pool, no_leaks)
    snap = pool.task_stats.snapshot()
    assert snap.submitted == sum(snap.outcomes.values()) == 13
    assert (snap.queued, snap.running) == (0, 0)


@pytest.mark.timeout(60)
def test_drop_in_executor_counts_what_it_refuses(no_leaks: set[int]) -> None:
    # corral.ProcessPoolExecutor reports an unpicklable task through its future, as
    # concurrent.futures does: submitted and failed (not_picklable), never queued.
    with corral.ProcessPoolExecutor(1) as ex:
        fut: concurrent.futures.Future[Any] = ex.submit(lambda: 1)
        with pytest.raises(Exception, match="pickle"):
            fut.result(10)
        assert ex.submit(pool_tasks.square, 3).result(30) == 9
        no_leaks.update(ex.worker_pids())
        snap = ex.task_stats.snapshot()
        assert snap.submitted == 2 and snap.outcomes["ok"] == 1
        assert snap.outcomes["not_picklable"] + snap.outcomes["error"] == 1
        assert (snap.queued, snap.running) == (0, 0)
