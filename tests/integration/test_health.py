"""Custom health checks and recycling (memory, age), with real processes.

Health checks run in this process on corral's check threads (health_workers.FlakyCheck records
every call); the workers are real processes under each start method where it matters.
"""

from __future__ import annotations

import os
import re
import signal
import statistics
from collections.abc import Callable
from pathlib import Path

import health_workers as hw
import psutil
import pytest
from _helpers import pool, read_pid, running_with_new_pid, status_of, stays_empty

import corral
from corral import EventKind, StopReason, WorkerState
from support import START_METHODS, wait_for


def _flagdir_args(tmp_path: Path, *extra: object) -> Callable[[int], tuple[object, ...]]:
    flagdir = str(tmp_path)
    return lambda index: (flagdir, *extra)


def _rss_in_detail(detail: str | None) -> float:
    match = re.search(r"RSS ([0-9.]+) MiB > max_memory ([0-9.]+) MiB", detail or "")
    assert match, detail
    return float(match.group(1)) * hw.MiB


def _vanished(pid: int) -> bool:
    """Gone for good: not running, not stopped, not a zombie."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_DEAD
    except psutil.NoSuchProcess:
        return True


# ---------------------------------------------------------------------------------- memory

LIMIT = 150 * hw.MiB


@pytest.mark.timeout(40)
@pytest.mark.parametrize("method", START_METHODS)
def test_memory_leak_recycled(no_leaks: set[int], tmp_path: Path, method: str) -> None:
    """A worker growing ~800 MiB/s (to at most 400 MiB) past max_memory=150 MiB is recycled
    gracefully, with the RSS in the record; its small replacement stays; the bystander too."""
    with pool(no_leaks, hw.leak_memory, workers=2, args=_flagdir_args(tmp_path, 400 * hw.MiB),
              start_method=method, max_memory=LIMIT, memory_check_interval=0.1) as (sup, log):
        bystander = wait_for(lambda: status_of(sup, 1).pid, 15, "worker 1")
        old = read_pid(tmp_path / "first-0")
        no_leaks.add(old)
        new = running_with_new_pid(sup, 0, old, timeout=20)
        record = new.last_exit
        assert record is not None and record.pid == old, new
        assert record.reason is StopReason.RECYCLED_MEMORY, record
        rss = _rss_in_detail(record.detail)
        assert rss > LIMIT, record.detail
        # Graceful: the stop signal, which this worker does not catch.
        assert record.exit is not None and record.exit.signal == signal.SIGTERM, record
        wait_for(lambda: _vanished(old), 10, "the recycled process to be gone")
        log.wait(lambda _: any(e.exit is not None and e.exit.reason is StopReason.RECYCLED_MEMORY
                               for e in log.of(EventKind.EXITED, 0)), 5, "the EXITED event")
        # The replacement is small: over several more checks it is not recycled again.
        again = stays_empty(lambda: {s.pid for s in sup.status()
                                     if s.pid is not None} - {new.pid, bystander}, 1.0)
        assert not again, again
        assert status_of(sup, 1).restarts == 0
        assert [r.reason for r in sup.history()] == [StopReason.RECYCLED_MEMORY]


@pytest.mark.timeout(40)
def test_memory_of_children_counts(no_leaks: set[int], tmp_path: Path) -> None:
    """The RSS is the worker's plus its children's: a small worker whose child leaks is recycled,
    and the child goes with it."""
    with pool(no_leaks, hw.leak_in_child, workers=1, args=_flagdir_args(tmp_path, 400 * hw.MiB),
              start_method="forkserver", max_memory=LIMIT,
              memory_check_interval=0.1) as (sup, _):
        old = read_pid(tmp_path / "first-0")
        child = read_pid(tmp_path / "child-0")
        no_leaks.update({old, child})
        new = running_with_new_pid(sup, 0, old, timeout=20)
        record = new.last_exit
        assert record is not None and record.reason is StopReason.RECYCLED_MEMORY, record
        assert _rss_in_detail(record.detail) > LIMIT
        wait_for(lambda: _vanished(child), 10, "the leaking child to be gone")


# ------------------------------------------------------------------------------------- age


@pytest.mark.timeout(40)
def test_max_age_recycles_with_jitter(no_leaks: set[int]) -> None:
    """max_age=2, jitter 0.3, 6 workers: each recycled between 1.4 and 2.6 s (plus the time to
    stop), not all at once."""
    n, age, jitter = 6, 2.0, 0.3
    with pool(no_leaks, hw.sleeper, workers=n, start_method="forkserver", max_age=age,
              max_age_jitter=jitter) as (sup, _):
        def first_recycles() -> dict[int, corral.ExitRecord] | None:
            out: dict[int, corral.ExitRecord] = {}
            for r in sup.history():
                out.setdefault(r.index, r)
            return out if len(out) == n else None
        records = wait_for(first_recycles, 15, "every worker to be recycled once")
        assert records is not None
        uptimes = sorted(r.uptime for r in records.values())
        for r in records.values():
            assert r.reason is StopReason.RECYCLED_AGE, r
            assert "max_age" in (r.detail or ""), r.detail
            assert r.exit is not None and r.exit.signal == signal.SIGTERM, r
        assert uptimes[0] >= age * (1 - jitter) - 0.05, uptimes
        assert uptimes[-1] <= age * (1 + jitter) + 2.0, uptimes  # generous: stop + noise
        # Spread out: with a uniform jitter over 1.2 s, six within 0.1 s is ~1e-6 likely.
        assert uptimes[-1] - uptimes[0] > 0.1, uptimes
        assert statistics.pstdev(uptimes) > 0.03, uptimes
        wait_for(lambda: all(s.state is WorkerState.RUNNING and s.restarts >= 1
                             for s in sup.status()), 10, "every replacement running")


# ---------------------------------------------------------------------------- health checks

WHY = {
    "false": "health check returned False",
    "raise": "health check raised RuntimeError: probe refused",
    "hang": "health check still running",
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["false", "raise"])
def test_failing_health_check_restarts_that_worker(no_leaks: set[int], mode: str) -> None:
    threshold, interval = 3, 0.1
    check = hw.FlakyCheck(mode, bad_index=1)
    with pool(no_leaks, hw.sleeper, workers=3, start_method="forkserver", health_check=check,
              health_check_interval=interval, health_check_timeout=2.0,
              failure_threshold=threshold) as (sup, log):
        assert sup.wait_ready(timeout=15) == 3
        before = {s.index: s.pid for s in sup.status()}
        bad = before[1]
        assert bad is not None
        new = running_with_new_pid(sup, 1, bad, timeout=15)
        record = new.last_exit
        assert record is not None and record.pid == bad, new
        assert record.reason is StopReason.UNHEALTHY, record
        assert f"{threshold} failed health checks in a row" in (record.detail or ""), record
        assert WHY[mode] in (record.detail or ""), record.detail
        # Exactly the threshold: no restart before it, no call after it.
        assert len(check.calls(1, bad)) == threshold, check.calls(1, bad)
        unhealthy = log.wait(lambda _: log.of(EventKind.UNHEALTHY), 5, "the UNHEALTHY event")
        assert [e.index for e in unhealthy] == [1] and WHY[mode] in unhealthy[0].message

        # The others were checked and left alone; the replacement passes its checks and stays.
        wait_for(lambda: len(check.calls(1, new.pid)) >= threshold + 1, 10,
                 "the replacement to pass several checks")
        for index in (0, 2):
            s = status_of(sup, index)
            assert s.pid == before[index] and s.restarts == 0, s
            assert check.calls(index, before[index]), f"worker {index} never checked"
        assert status_of(sup, 1).pid == new.pid
        assert len(sup.history()) == 1, sup.history()


@pytest.mark.timeout(60)
def test_hanging_health_check(no_leaks: set[int]) -> None:
    """A check that hangs (30 s) for worker 1: it fails by timeout, worker 1 is restarted after
    the threshold; meanwhile a SIGKILLed worker 2 is replaced at once, and its replacement and
    worker 0 are checked as usual."""
    threshold, interval, timeout = 2, 0.2, 2.0
    check = hw.FlakyCheck("hang", bad_index=1, hang_for=30.0)
    try:
        with pool(no_leaks, hw.sleeper, workers=3, start_method="forkserver",
                  health_check=check, health_check_interval=interval,
                  health_check_timeout=timeout, failure_threshold=threshold) as (sup, _):
            assert sup.wait_ready(timeout=15) == 3
            before = {s.index: s.pid for s in sup.status()}
            bad, victim = before[1], before[2]
            assert bad is not None and victim is not None
            wait_for(check.hanging.is_set, 10, "the check of worker 1 to hang")

            os.kill(victim, signal.SIGKILL)
            replaced = running_with_new_pid(sup, 2, victim, timeout=3)
            wait_for(lambda: check.calls(2, replaced.pid), 3, "the new worker 2 to be checked")
            calls0 = len(check.calls(0))
            wait_for(lambda: len(check.calls(0)) > calls0, 3, "worker 0 to be checked again")
            assert check.hanging.is_set(), "the hanging check returned early"
            assert status_of(sup, 1).pid == bad  # not restarted before the timeout

            new = running_with_new_pid(sup, 1, bad, timeout=15)
            record = new.last_exit
            assert record is not None and record.reason is StopReason.UNHEALTHY, record
            assert WHY["hang"] in (record.detail or ""), record.detail
            assert f"{threshold} failed health checks in a row" in (record.detail or "")
            assert record.uptime >= timeout, record  # no verdict before the first timeout
            assert len(check.calls(1, bad)) == 1, "a second call piled up behind the hung one"
            assert check.hanging.is_set(), "still hanging: the restart did not wait for it"
    finally:
        check.release.set()  # let the blocked check thread go before the test ends


@pytest.mark.timeout(60)
def test_replacement_not_blamed_for_predecessors_hung_check(no_leaks: set[int]) -> None:
    """Worker 1's first process gets a check that hangs for 30 s; once that process is
    restarted as unhealthy, its replacement (whose checks pass) must stay up."""
    threshold, interval, timeout = 2, 0.2, 1.0
    check = hw.FlakyCheck("hang", bad_index=1, hang_for=30.0)
    try:
        with pool(no_leaks, hw.sleeper, workers=2, start_method="forkserver",
                  health_check=check, health_check_interval=interval,
                  health_check_timeout=timeout, failure_threshold=threshold) as (sup, _):
            assert sup.wait_ready(timeout=15) == 2
            bad = status_of(sup, 1).pid
            assert bad is not None
            new = running_with_new_pid(sup, 1, bad, timeout=15)
            assert new.last_exit is not None
            assert new.last_exit.reason is StopReason.UNHEALTHY, new.last_exit
            # Several check intervals (and more than threshold * interval) later: same process.
            restarted = stays_empty(lambda: {s.pid for s in sup.status() if s.index == 1
                                             and s.pid not in (None, new.pid)}, 2.0)
            assert not restarted, f"the replacement was restarted: {sup.history()}"
            assert len(check.calls(1, new.pid)) >= threshold + 1, check.calls(1)
    finally:
        check.release.set()
