"""Heartbeats, readiness and hang detection, with real processes and real signals.

Hang kinds (each in its own frame in health_workers.py, so the stack dump can be checked):
silent (runs Python, no beats), SIGSTOPped by the test, a tight pure-Python loop, a C call that
releases the GIL (time.sleep), a C call that holds it (sum over a huge range, with a graceful
SIGTERM handler that can never run, so only SIGKILL ends it).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import health_workers as hw
import psutil
import pytest
from _helpers import pool, read_pid, running_with_new_pid, status_of, stays_empty

import corral
from corral import EventKind, StopReason, WorkerState
from support import START_METHODS, wait_for

# Generous against a noisy 2-core machine: workers beat every 0.05 s.
HBT = 1.0


def _flagdir_args(tmp_path: Path, *extra: object) -> Callable[[int], tuple[object, ...]]:
    flagdir = str(tmp_path)
    return lambda index: (flagdir, *extra)


def _when(sup: corral.Supervisor, index: int, cond: Callable[[corral.WorkerStatus], bool],
          timeout: float, what: str) -> corral.WorkerStatus:
    """Worker ``index``'s status, once ``cond`` holds for it."""
    def check() -> corral.WorkerStatus | None:
        s = status_of(sup, index)
        return s if cond(s) else None
    result = wait_for(check, timeout, what)
    assert result is not None
    return result


def _all_when(sup: corral.Supervisor, cond: Callable[[corral.WorkerStatus], bool],
              timeout: float, what: str) -> tuple[corral.WorkerStatus, ...]:
    """Every worker's status, once ``cond`` holds for all of them."""
    def check() -> tuple[corral.WorkerStatus, ...] | None:
        st = sup.status()
        return st if st and all(cond(s) for s in st) else None
    result = wait_for(check, timeout, what)
    assert result is not None
    return result


def _beating_pid(tmp_path: Path, index: int = 0) -> int:
    """The pid of worker ``index``'s first life, once it has beaten."""
    pid = read_pid(tmp_path / f"first-{index}")
    wait_for((tmp_path / f"beating-{index}-{pid}").exists, 15, f"worker {index} to beat")
    return pid


def _wait_vanished(pid: int, timeout: float = 10.0) -> None:
    """Gone for good: not running, not stopped, not a zombie waiting to be reaped."""
    def vanished() -> bool:
        try:
            status = psutil.Process(pid).status()
        except psutil.NoSuchProcess:
            return True
        return status == psutil.STATUS_DEAD
    wait_for(vanished, timeout, f"pid {pid} to be gone (not stopped, not a zombie)")


def _with_new_pid(sup: corral.Supervisor, index: int, old: int,
                  timeout: float = 15.0) -> corral.WorkerStatus:
    """Worker ``index`` in a new process, in whatever state (STARTING or RUNNING)."""
    return _when(sup, index, lambda s: s.pid not in (None, old) and s.state.alive, timeout,
                 f"worker {index} in a new process")


# ------------------------------------------------------------------------------------ hangs


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", START_METHODS)
@pytest.mark.parametrize("kind", list(hw.HANGS))
def test_hung_worker_dumped_killed_replaced(no_leaks: set[int], tmp_path: Path, kind: str,
                                            method: str, caplog: pytest.LogCaptureFixture
                                            ) -> None:
    caplog.set_level(logging.WARNING, logger="corral")
    target = hw.HANGS[kind]
    # ready_when="beat": the first beat wakes the monitor, which then watches the beats (with
    # "started", a hang inside the startup grace is seen only when the grace ends: see
    # test_hang_inside_startup_grace_detected_on_time).
    with pool(no_leaks, target, workers=2, args=_flagdir_args(tmp_path), start_method=method,
              heartbeat_timeout=HBT, startup_timeout=15, ready_when="beat",
              kill_grace=0.5) as (sup, log):
        # Worker 1 is a healthy bystander that must be left alone throughout.
        bystander = _when(sup, 1, lambda s: s.heartbeat_age is not None, 15, "worker 1 to beat")
        old = _beating_pid(tmp_path, 0)
        no_leaks.add(old)
        if kind == "sigstop":
            os.kill(old, signal.SIGSTOP)
            wait_for(lambda: psutil.Process(old).status() == psutil.STATUS_STOPPED, 5,
                     "the worker to be stopped")

        new = running_with_new_pid(sup, 0, old, timeout=20)
        _wait_vanished(old)

        record = new.last_exit
        assert record is not None and record.pid == old, new
        assert record.reason is StopReason.HUNG, record
        assert record.exit is not None
        # The C call holding the GIL cannot run its graceful SIGTERM handler: killed after the
        # grace. The others die of the stop signal's default action.
        expected = signal.SIGKILL if kind == "c_gil" else signal.SIGTERM
        assert record.exit.signal == expected, record.exit
        detail = record.detail or ""
        silent_for = float(re.search(r"no heartbeat for ([0-9.]+)s", detail).group(1))  # type: ignore[union-attr]
        assert HBT <= silent_for < HBT + 3, detail  # seen on time (generously)
        # The evidence: faulthandler's dump of every thread, naming the hung frame.
        assert "most recent call first" in detail, detail
        assert "health_workers.py" in detail and f"in {target.__name__}" in detail, detail
        # ... and it was logged, not only stored.
        assert any(target.__name__ in r.getMessage() and "stack of hung worker" in r.getMessage()
                   for r in caplog.records), [r.getMessage() for r in caplog.records]
        log.wait(lambda _: log.of(EventKind.UNHEALTHY, 0), 5, "the UNHEALTHY event")
        assert "hung" in log.of(EventKind.UNHEALTHY, 0)[0].message

        # The replacement is healthy: it beats, and the bystander was never touched.
        wait_for(lambda: (status_of(sup, 0).heartbeat_age or 99) < HBT, 10,
                 "the replacement to beat")
        after = status_of(sup, 1)
        assert after.pid == bystander.pid and after.restarts == 0, after
        assert after.last_exit is None, after


@pytest.mark.timeout(40)
def test_hang_inside_startup_grace_detected_on_time(no_leaks: set[int], tmp_path: Path) -> None:
    """heartbeat_timeout=1, startup_timeout=10: a worker that beat, then hung at once is hung
    about 1 s after its last beat, not 10 s after its start."""
    with pool(no_leaks, hw.hang_c_sleep, workers=1, args=_flagdir_args(tmp_path),
              start_method="forkserver", heartbeat_timeout=HBT, startup_timeout=10.0,
              ready_when="started", kill_grace=0.5) as (sup, _):
        old = _beating_pid(tmp_path)
        no_leaks.add(old)
        new = running_with_new_pid(sup, 0, old, timeout=HBT + 4)
        assert new.last_exit is not None and new.last_exit.reason is StopReason.HUNG, new


# ------------------------------------------------------------------ slow starts and grace


@pytest.mark.timeout(60)
def test_slow_first_beat_is_never_killed(no_leaks: set[int]) -> None:
    """5 s before the first beat, heartbeat_timeout=1, startup_timeout=10: same pid throughout.

    Both ways of being ready at once: ready_when="started" (RUNNING from the start, the startup
    grace covers the missing beat) and ready_when="ready" (STARTING until ready()).
    """
    opts: dict[str, Any] = dict(workers=1, args=lambda i: (5.0,), heartbeat_timeout=1.0,
                                startup_timeout=10.0, start_method="forkserver")
    with pool(no_leaks, hw.slow_first_beat, ready_when="started", **opts) as (started, _), \
            pool(no_leaks, hw.slow_first_beat, ready_when="ready", **opts) as (gated, _):
        pids = {name: _when(sup, 0, lambda s: s.pid is not None, 15, "a pid").pid
                for name, sup in (("started", started), ("ready", gated))}
        t0 = time.monotonic()
        while True:
            s1, s2 = status_of(started, 0), status_of(gated, 0)
            assert (s1.pid, s2.pid) == (pids["started"], pids["ready"]), (s1, s2)
            assert s1.last_exit is None and s2.last_exit is None, (s1, s2)
            assert s1.state is WorkerState.RUNNING, s1
            if s2.state is WorkerState.STARTING:
                assert not s2.ready
            if s1.status_text == "serving" and s2.state is WorkerState.RUNNING:
                break
            assert time.monotonic() - t0 < 20, f"not healthy after 20 s: {s1} {s2}"
            time.sleep(0.05)
        assert s2.ready and s2.status_text == "serving", s2
        # Healthy now, and past a few heartbeat timeouts it is still the same process.
        for sup in (started, gated):
            assert sup.wait_ready(timeout=5) == 1
        changed = stays_empty(lambda: {s.pid or 0 for s in (status_of(started, 0),
                                                            status_of(gated, 0))
                                       if s.pid not in pids.values()}, 2.5)
        assert not changed, changed
        for sup in (started, gated):
            s = status_of(sup, 0)
            assert s.restarts == 0 and s.heartbeat_age is not None and s.heartbeat_age < 1.0, s
            assert not sup.history(), sup.history()


@pytest.mark.timeout(60)
def test_replacement_after_hang_starts_fresh(no_leaks: set[int], tmp_path: Path) -> None:
    """After a hang-restart the replacement gets its own startup grace, not the old beat, and,
    healthy, is not restarted again for 10 s.

    The replacement waits 1.5 s (> heartbeat_timeout, < startup_timeout) before its first beat: had
    it inherited its predecessor's last beat it would be judged hung at once. Two pools run side
    by side: ready_when="started" and ready_when="beat" (where an inherited beat would also make
    the replacement RUNNING before it ever beat). The first life beats past its startup grace
    before it hangs.
    """
    dirs = {how: tmp_path / how for how in ("started", "beat")}
    for d in dirs.values():
        d.mkdir()
    opts: dict[str, Any] = dict(workers=1, heartbeat_timeout=HBT, startup_timeout=4.0,
                                kill_grace=0.5, start_method="forkserver")
    with pool(no_leaks, hw.hang_then_slow_replacement, ready_when="started",
              args=_flagdir_args(dirs["started"], 4.2, 1.5), **opts) as (a, _), \
            pool(no_leaks, hw.hang_then_slow_replacement, ready_when="beat",
                 args=_flagdir_args(dirs["beat"], 4.2, 1.5), **opts) as (b, _):
        pools = {"started": a, "beat": b}
        old = {how: _beating_pid(dirs[how]) for how in pools}
        no_leaks.update(old.values())
        # Each replacement as first seen (both pools watched at once).
        first_seen: dict[str, corral.WorkerStatus] = {}

        def both_replaced() -> bool:
            for how, sup in pools.items():
                s = status_of(sup, 0)
                if how not in first_seen and s.pid not in (None, old[how]) and s.state.alive:
                    first_seen[how] = s
            return len(first_seen) == 2
        wait_for(both_replaced, 20, "both hung workers to be replaced")
        for how, s in first_seen.items():
            assert s.last_exit is not None and s.last_exit.reason is StopReason.HUNG, s
            # A fresh slot: no beat yet (the replacement waits 1.5 s before its first one).
            assert s.heartbeat_age is None, (how, s)
        assert first_seen["started"].state is WorkerState.RUNNING, first_seen["started"]
        beat_new = first_seen["beat"]
        assert beat_new.state is WorkerState.STARTING and not beat_new.ready, beat_new

        pids = {s.pid or 0 for s in first_seen.values()}
        changed = stays_empty(lambda: {status_of(sup, 0).pid or 0 for sup in pools.values()}
                              - pids, 10.0)
        assert not changed, (f"a replacement was restarted: {changed}",
                             {how: sup.history() for how, sup in pools.items()})
        for how, sup in pools.items():
            s = status_of(sup, 0)
            assert s.state is WorkerState.RUNNING and s.restarts == 1, (how, s)
            assert s.heartbeat_age is not None and s.heartbeat_age < HBT, (how, s)
            assert [r.reason for r in sup.history()] == [StopReason.HUNG], sup.history()


@pytest.mark.timeout(40)
@pytest.mark.parametrize("method", START_METHODS)
def test_never_ready_hits_startup_timeout(no_leaks: set[int], method: str) -> None:
    """ready_when="ready", beats but never calls ready(): STARTING, then STARTUP_TIMEOUT."""
    with pool(no_leaks, hw.beats_never_ready, workers=1, start_method=method,
              ready_when="ready", startup_timeout=1.5, heartbeat_timeout=5.0,
              kill_grace=0.5) as (sup, log):
        first = _when(sup, 0, lambda s: s.heartbeat_age is not None, 15, "the worker to beat")
        # Beating is not readiness when ready() is required.
        assert first.state is WorkerState.STARTING and not first.ready, first
        assert first.pid is not None
        no_leaks.add(first.pid)
        new = _with_new_pid(sup, 0, first.pid, timeout=20)
        _wait_vanished(first.pid)
        record = new.last_exit
        assert record is not None and record.pid == first.pid, new
        assert record.reason is StopReason.STARTUP_TIMEOUT, record
        assert record.uptime >= 1.4, record
        assert "not ready" in (record.detail or ""), record.detail
        # A stack dump is taken here too: it shows where start-up was stuck.
        assert "in beats_never_ready" in (record.detail or ""), record.detail
        assert not log.of(EventKind.READY, 0)


# -------------------------------------------------------------------------------- readiness


@pytest.mark.timeout(40)
@pytest.mark.parametrize("method", START_METHODS)
@pytest.mark.parametrize("how", ["ready", "beat"])
def test_readiness_gates_running(no_leaks: set[int], tmp_path: Path, how: str,
                                 method: str) -> None:
    with pool(no_leaks, hw.ready_on_flag, workers=2, args=_flagdir_args(tmp_path, how),
              start_method=method, ready_when=how) as (sup, log):
        loading = _all_when(sup, lambda s: s.status_text == "loading model", 15, "status texts")
        for s in loading:
            assert s.state is WorkerState.STARTING and not s.ready, s
            assert s.heartbeat_age is None, s  # neither has beaten yet
        with pytest.raises(TimeoutError):
            sup.wait_ready(timeout=0.3)
        assert not log.of(EventKind.READY)

        (tmp_path / "go").write_text("")
        assert sup.wait_ready(timeout=15) == 2
        for s in sup.status():
            assert s.state is WorkerState.RUNNING and s.ready, s
            assert s.pid == next(x.pid for x in loading if x.index == s.index), s
        # Events reach subscribers on their own thread: they may lag wait_ready() a little.
        log.wait(lambda events: {e.index for e in events if e.kind is EventKind.READY} == {0, 1},
                 5, "a READY event for each worker")
        serving = _all_when(sup, lambda s: s.status_text == "serving", 10, "status 'serving'")
        for s in serving:
            assert s.heartbeat_age is not None and 0 <= s.heartbeat_age < 1.0, s
        assert sup.wait_ready(n=1, timeout=1) == 2


# ----------------------------------------------------------------- the worker-side functions


def test_worker_api_outside_a_worker() -> None:
    """In a process corral did not start, the worker-side calls do nothing and say so."""
    assert corral.in_worker() is False
    assert corral.beat() is False
    assert corral.ready() is False
    assert corral.set_status("anything") is False


@pytest.mark.timeout(30)
@pytest.mark.parametrize("method", START_METHODS)
def test_worker_api_inside_and_beside_a_worker(no_leaks: set[int], tmp_path: Path,
                                               method: str) -> None:
    """Inside a corral worker they work; in a plain child of a running supervisor they don't."""
    with pool(no_leaks, hw.report_api, workers=1, args=_flagdir_args(tmp_path),
              start_method=method, ready_when="ready") as (sup, _):
        assert sup.wait_ready(timeout=15) == 1
        api = tmp_path / "api-0"
        wait_for(api.exists, 10, "the worker's report")
        assert api.read_text() == repr(
            {"in_worker": True, "set_status": True, "beat": True, "ready": True})
        assert status_of(sup, 0).status_text == "reporting"

        # A supervisor running in this process does not make it (or its plain children) a worker.
        test_worker_api_outside_a_worker()
        plain = tmp_path / "plain"
        ctx: Any = multiprocessing.get_context(method)
        proc = ctx.Process(
            target=hw.report_api_plain, args=(str(plain),))
        proc.start()
        assert proc.pid is not None
        no_leaks.add(proc.pid)
        proc.join(15)
        assert proc.exitcode == 0
        assert plain.read_text() == repr(
            {"in_worker": False, "set_status": False, "beat": False, "ready": False})
