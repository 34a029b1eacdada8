"""Hot standby workers (issue 16) under every start method: handover, failures, stops."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import standby_workers as sw
from _helpers import pool, wait_value

import corral
from corral import EventKind, WorkerState
from support import START_METHODS, pid_alive, wait_for


def reports(flagdir: Path) -> dict[int, dict[str, Any]]:
    """The latest report per pid."""
    out = {}
    for path in flagdir.glob("report-*.json"):
        data = json.loads(path.read_text())
        out[data["pid"]] = data
    return out


def ready_standby(sup: corral.Supervisor) -> corral.WorkerStatus | None:
    return next((s for s in sup.status() if s.standby and s.ready), None)


def kill_worker_1(sup: corral.Supervisor) -> corral.WorkerStatus:
    """SIGKILL worker 1; its replacement, once ready."""
    victim = sup.status()[1].pid
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    return wait_value(lambda: next((s for s in sup.status() if s.index == 1 and s.ready
                                    and s.pid not in (None, victim)), None), 30,
                      "worker 1 replaced")


@pytest.mark.parametrize("method", START_METHODS)
@pytest.mark.timeout(90)
def test_a_handed_over_worker_is_like_a_fresh_one(method: str, no_leaks: set[int],
                                                  tmp_path: Path) -> None:
    with pool(no_leaks, sw.report, workers=2, args=lambda i: (str(tmp_path),),
              start_method=method, ready_when="ready", heartbeat_timeout=5,
              startup_timeout=30, standby=1, standby_init=sw.warm) as (sup, log):
        sup.wait_ready(timeout=60)
        standby = wait_value(lambda: ready_standby(sup), 60, "a ready standby")
        assert standby.index < 0 and standby.state is WorkerState.RUNNING
        assert standby.pid is not None and standby.pid not in sup.pids()
        fresh = {r["pid"]: r for r in reports(tmp_path).values()}
        new = kill_worker_1(sup)
        assert new.pid == standby.pid  # the standby took the place
        got = wait_value(lambda: reports(tmp_path).get(new.pid), 30, "its report")
        cold = fresh[sup.status()[0].pid]  # worker 0 was started the usual way
        for key in ("title", "sigterm", "sigint", "mask", "stdin", "in_worker"):
            expected = cold[key].replace(" 0", " 1") if key == "title" else cold[key]
            assert got[key] == expected, (key, got[key], cold[key])
        assert got["pgid"] == got["pid"]  # its own process group
        assert got["model"] == f"loaded by {new.pid}"  # the warm-up's work is inherited
        wait_value(lambda: (s := next(x for x in sup.status() if x.index == 1)).heartbeat_age
                   is not None and s.heartbeat_age < 5 and s, 30, "its heartbeats seen")
        # A new standby replaces the one used; the events tell both stories.
        wait_value(lambda: (s := ready_standby(sup)) and s.pid != standby.pid and s, 60,
                   "a new standby")
        spawned = [e for e in log.of(EventKind.SPAWNED) if e.index == 1]
        assert spawned[-1].pid == new.pid and not spawned[-1].standby
        assert any(e.standby for e in log.of(EventKind.SPAWNED))
        no_leaks.update(s.pid for s in sup.status() if s.pid)


@pytest.mark.parametrize("method", START_METHODS)
@pytest.mark.timeout(90)
def test_a_warm_up_may_wait_for_the_handover_itself(method: str, no_leaks: set[int],
                                                     tmp_path: Path) -> None:
    """A warm-up returning an OwnWait reads the handover itself: ``take`` gives it the slot
    (title, heartbeats) and it runs the worker in place of the target."""
    with pool(no_leaks, sw.report, workers=2, args=lambda i: (str(tmp_path),),
              start_method=method, ready_when="ready", heartbeat_timeout=5,
              startup_timeout=30, standby=1, standby_init=sw.warm_own_wait) as (sup, _log):
        sup.wait_ready(timeout=60)
        standby = wait_value(lambda: ready_standby(sup), 60, "a ready standby")
        new = kill_worker_1(sup)
        assert new.pid == standby.pid
        got = wait_value(lambda: reports(tmp_path).get(new.pid), 30, "its report")
        assert got["model"] == f"waited for by {new.pid}"
        assert got["title"].endswith("worker 1") and got["in_worker"]
        wait_value(lambda: (s := next(x for x in sup.status() if x.index == 1)).heartbeat_age
                   is not None and s.heartbeat_age < 5 and s, 30, "its heartbeats seen")
        # The next standby waits the same way, and leaves when the pool stops (EOF: take
        # gives None).
        wait_value(lambda: (s := ready_standby(sup)) and s.pid != standby.pid and s, 60,
                   "a new standby")
        no_leaks.update(s.pid for s in sup.status() if s.pid)


@pytest.mark.parametrize("method", START_METHODS)
@pytest.mark.timeout(90)
def test_a_standby_killed_while_waiting_is_replaced_free(method: str, no_leaks: set[int],
                                                         tmp_path: Path) -> None:
    with pool(no_leaks, sw.report, workers=1, args=lambda i: (str(tmp_path),),
              start_method=method, ready_when="ready", standby=1,
              budget=corral.RestartBudget(max_restarts=0, window=60)) as (sup, log):
        first = wait_value(lambda: ready_standby(sup), 60, "a ready standby")
        assert first.pid is not None
        os.kill(first.pid, signal.SIGKILL)
        second = wait_value(lambda: (s := ready_standby(sup)) and s.pid != first.pid and s,
                            60, "a new standby")
        assert sup.running and second.pid is not None  # a budget of 0 was not touched
        exited = [e for e in log.of(EventKind.EXITED) if e.standby]
        assert exited and exited[0].pid == first.pid
        no_leaks.update({first.pid, second.pid, *sup.pids()})


@pytest.mark.parametrize("method", START_METHODS)
@pytest.mark.timeout(90)
def test_a_failed_warm_up_falls_back_to_cold_starts(method: str, no_leaks: set[int],
                                                    tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "corral")
    with pool(no_leaks, sw.report, workers=1, args=lambda i: (str(tmp_path),),
              start_method=method, ready_when="ready", standby=1,
              standby_init="standby_workers:warm_fails") as (sup, log):
        sup.wait_ready(timeout=60)
        wait_for(lambda: any("failed its warm-up" in r.getMessage() for r in caplog.records),
                 60, "the warm-up failure reported")
        message = next(r.getMessage() for r in caplog.records
                       if "failed its warm-up" in r.getMessage())
        assert "the model file is missing" in message and "ValueError" in message
        victim = sup.pids()[0]
        os.kill(victim, signal.SIGKILL)
        new = wait_value(lambda: next((s for s in sup.status() if s.index == 0 and s.ready
                                       and s.pid not in (None, victim)), None), 30,
                         "a cold replacement")
        assert reports(tmp_path)[new.pid]["model"] is None  # started cold
        no_leaks.update(e.pid for e in log.of(EventKind.SPAWNED) if e.pid)


@pytest.mark.parametrize("method", START_METHODS)
@pytest.mark.timeout(90)
def test_stop_during_a_handover_leaves_nothing(method: str, no_leaks: set[int],
                                               tmp_path: Path) -> None:
    with pool(no_leaks, sw.report, workers=2, args=lambda i: (str(tmp_path),),
              start_method=method, ready_when="ready", standby=2,
              stop_timeout=2.0) as (sup, log):
        sup.wait_ready(timeout=60)
        wait_for(lambda: sum(1 for s in sup.status() if s.standby and s.ready) == 2, 60,
                 "two ready standbys")
        everyone = {s.pid for s in sup.status() if s.pid}
        no_leaks.update(everyone)
        for pid in sup.pids():
            os.kill(pid, signal.SIGKILL)
        sup.stop()  # while the standbys take over
        no_leaks.update(e.pid for e in log.of(EventKind.SPAWNED) if e.pid)
        assert not any(pid_alive(p) for p in no_leaks)


@pytest.mark.timeout(90)
def test_four_killed_two_standbys(no_leaks: set[int], tmp_path: Path) -> None:
    """Two come back through the standbys, two by a cold start; all four come back."""
    with pool(no_leaks, sw.report, workers=4, args=lambda i: (str(tmp_path),),
              start_method="forkserver", ready_when="ready", standby=2,
              backoff=corral.Backoff(reset_after=0)) as (sup, log):
        sup.wait_ready(timeout=60)
        wait_for(lambda: sum(1 for s in sup.status() if s.standby and s.ready) == 2, 60,
                 "two ready standbys")
        standbys = {s.pid for s in sup.status() if s.standby}
        old = set(sup.pids())
        for pid in old:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: len(sup.pids()) == 4 and not set(sup.pids()) & old, 60,
                 "four replacements")
        assert len(set(sup.pids()) & standbys) == 2
        no_leaks.update(e.pid for e in log.of(EventKind.SPAWNED) if e.pid)


def test_standby_options_are_validated() -> None:
    with pytest.raises(ValueError, match="standby must be >= 0"):
        corral.PoolSpec(sw.report, standby=-1)
    with pytest.raises(TypeError, match='standby_init must be a callable or "module:function"'):
        corral.PoolSpec(sw.report, standby=1, standby_init="no-colon")
    with pytest.raises(ValueError, match="standby is for Python targets"):
        corral.PoolSpec(command=["sleep", "1"], standby=1)


@pytest.mark.parametrize("method", ["fork", "forkserver"])
@pytest.mark.timeout(120)
def test_scale_up_rolling_restart_and_age_recycling_use_a_standby(
        method: str, no_leaks: set[int], tmp_path: Path) -> None:
    """Every path that starts a worker takes a ready standby first (issue 16, item 4)."""

    def taken_by_standby(sup: corral.Supervisor, log: Any, action: Any, index: int,
                         what: str) -> None:
        wait_value(lambda: ready_standby(sup), 60, f"a ready standby before {what}")
        before = next((s.pid for s in sup.status() if s.index == index), None)
        action()
        new = wait_value(lambda: next((s for s in sup.status() if s.index == index and s.ready
                                       and s.pid not in (None, before)), None), 60,
                         f"worker {index} after {what}")
        standbys = {e.pid for e in log.of(EventKind.SPAWNED) if e.standby}
        assert new.pid in standbys, f"{what}: worker {index} was started cold"

    with pool(no_leaks, sw.report, workers=1, args=lambda i: (str(tmp_path),),
              start_method=method, ready_when="ready", standby=1,
              startup_timeout=30) as (sup, log):
        sup.wait_ready(timeout=60)
        taken_by_standby(sup, log, lambda: sup.scale(2), 1, "scale(2)")
        sup.wait_ready(timeout=60)
        taken_by_standby(sup, log, lambda: sup.restart_all(timeout=60), 0, "restart_all()")
    with pool(no_leaks, sw.report, workers=1, args=lambda i: (str(tmp_path),),
              start_method=method, ready_when="ready", standby=1, max_age=2.0,
              max_age_jitter=0.0, startup_timeout=30) as (sup, log):
        sup.wait_ready(timeout=60)
        taken_by_standby(sup, log, lambda: None, 0, "max_age recycling")
        recycled = [e for e in log.of(EventKind.EXITED) if e.index == 0]
        assert recycled and "max_age" in (recycled[0].exit.detail or "")


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.timeout(90)
def test_a_standby_never_bypasses_the_backoff_or_the_budget(method: str, no_leaks: set[int],
                                                           tmp_path: Path) -> None:
    backoff = corral.Backoff(initial=1.0, multiplier=1.0, cap=1.0, jitter=0.0, reset_after=60)
    with pool(no_leaks, sw.report, workers=1, args=lambda i: (str(tmp_path),),
              start_method=method, ready_when="ready", standby=1, backoff=backoff) as (sup, log):
        sup.wait_ready(timeout=60)
        sb = wait_value(lambda: ready_standby(sup), 60, "a ready standby")
        victim = sup.pids()[0]
        os.kill(victim, signal.SIGKILL)
        new = wait_value(lambda: next((s for s in sup.status() if s.index == 0 and s.ready
                                       and s.pid not in (None, victim)), None), 30,
                         "worker 0 replaced")
        assert new.pid == sb.pid
        exited = next(e for e in log.of(EventKind.EXITED) if e.pid == victim)
        spawned = next(e for e in log.of(EventKind.SPAWNED) if e.pid == sb.pid and not e.standby)
        restarting = next(e for e in log.of(EventKind.RESTARTING) if e.index == 0)
        assert restarting.delay == 1.0
        assert spawned.at - exited.at >= 0.9  # the backoff's delay was served
    with pool(no_leaks, sw.report, workers=1, args=lambda i: (str(tmp_path),),
              start_method=method, ready_when="ready", standby=1,
              backoff=corral.Backoff(reset_after=0),
              budget=corral.RestartBudget(max_restarts=0, window=60)) as (sup, log):
        sup.wait_ready(timeout=60)
        sb = wait_value(lambda: ready_standby(sup), 60, "a ready standby")
        os.kill(sup.pids()[0], signal.SIGKILL)
        with pytest.raises(corral.GaveUp):
            sup.wait(timeout=30)
        assert not any(e.pid == sb.pid and not e.standby for e in log.of(EventKind.SPAWNED))


@pytest.mark.parametrize("method", START_METHODS)
@pytest.mark.timeout(120)
def test_a_standby_goes_in_as_the_killed_worker_begins_to_exit(
        method: str, no_leaks: set[int], caplog: pytest.LogCaptureFixture) -> None:
    """The worker's death lock tells the monitor of a SIGKILL as the exit begins: the standby
    is sent in before the kernel has freed the victim's memory and its pidfd tells. Each kill
    races the kernel's exit (64 MiB to free, tens of ms) against a thread's wake-up; any one
    of three kills won by the notice shows the path works (without it, none ever is)."""
    from corral import _robust

    if not _robust.available():
        pytest.skip("no robust mutexes or futex_waitv here")
    caplog.set_level(logging.DEBUG, logger="corral.pool")
    with pool(no_leaks, sw.heavy, workers=1, args=lambda i: (64,), start_method=method,
              ready_when="ready", startup_timeout=30, standby=1,
              backoff=corral.Backoff(reset_after=0.0)) as (sup, _log):
        early = False
        for _ in range(3):
            sup.wait_ready(timeout=60)
            wait_value(lambda: ready_standby(sup), 60, "a ready standby")
            victim = sup.status()[0].pid
            assert victim is not None
            os.kill(victim, signal.SIGKILL)
            wait_value(lambda v=victim: next((s for s in sup.status() if s.index == 0
                                              and s.ready and s.pid not in (None, v)), None),
                       30, "worker 0 replaced")
            if any(f"(pid {victim}) has begun to exit" in r.getMessage()
                   for r in caplog.records):
                early = True
                break
        assert early, "no kill was noticed before its exit was reaped"
        no_leaks.update(s.pid for s in sup.status() if s.pid)
