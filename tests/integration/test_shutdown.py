"""stop(): one deadline for the whole pool, idempotent, race-free with start and the monitor."""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest
import workers
from _helpers import EventLog, pool, start_supervisor_script, stays_empty, wait_gone

import corral
from corral import EventKind, StopReason, WorkerState
from support import START_METHODS, descendants, pid_alive, wait_for


def _alive_descendants() -> set[int]:
    return {pid for pid in descendants() if pid_alive(pid)}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", START_METHODS)
def test_stop_takes_one_timeout_not_n(method: str, no_leaks: set[int]) -> None:
    n, stop_timeout = 4, 1.0
    with pool(no_leaks, workers.ignore_sigterm, workers=n, start_method=method,
              ready_when="ready", stop_timeout=stop_timeout) as (sup, _log):
        sup.wait_ready(timeout=20)
        pids = sup.pids()
        assert len(pids) == n
        t0 = time.monotonic()
        sup.stop()
        elapsed = time.monotonic() - t0
    # Sequential stops would take n * stop_timeout = 4 s.
    assert stop_timeout * 0.8 <= elapsed < 3.0, elapsed
    assert not any(psutil.pid_exists(p) for p in pids)
    for s in sup.status():
        assert s.state is WorkerState.STOPPED
        assert s.last_exit is not None and s.last_exit.reason is StopReason.SHUTDOWN
        assert s.last_exit.exit is not None and s.last_exit.exit.signal == signal.SIGKILL


@pytest.mark.timeout(30)
def test_stop_timeout_argument_overrides_spec(no_leaks: set[int]) -> None:
    """stop(timeout=0) kills at once, even workers that would ignore SIGTERM for 60 s."""
    with pool(no_leaks, workers.ignore_sigterm, workers=3, start_method="fork",
              ready_when="ready", stop_timeout=60.0) as (sup, _log):
        sup.wait_ready(timeout=10)
        t0 = time.monotonic()
        sup.stop(timeout=0)
        assert time.monotonic() - t0 < 5.0
    for s in sup.status():
        assert s.last_exit is not None and s.last_exit.exit is not None
        assert s.last_exit.exit.signal == signal.SIGKILL


@pytest.mark.timeout(30)
def test_stop_is_idempotent_and_thread_safe(no_leaks: set[int]) -> None:
    sup = corral.Supervisor(workers.sleeper, workers=3, start_method="fork")
    sup.stop()  # before start: nothing to do
    with pool(no_leaks, workers.sleeper, workers=3, start_method="fork") as (sup, _log):
        sup.wait_ready(timeout=10)
        pids = sup.pids()
        errors: list[BaseException] = []

        def stop() -> None:
            try:
                sup.stop()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=stop) for _ in range(4)]
        for t in threads:
            t.start()
        sup.stop()
        for t in threads:
            t.join(10)
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        assert not sup.running
        assert not any(pid_alive(p) for p in pids)
        t0 = time.monotonic()
        sup.stop()
        sup.stop(timeout=0)
        assert time.monotonic() - t0 < 1.0
        assert sup.wait(1) is True
    assert all(s.state is WorkerState.STOPPED for s in sup.status())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", START_METHODS)
def test_stop_while_workers_are_being_started(method: str, no_leaks: set[int]) -> None:
    """start() returns before the processes exist; a stop from another thread right then."""
    for _ in range(3):
        with pool(no_leaks, workers.sleeper, workers=6, start_method=method, start=False
                  ) as (sup, log):
            go = threading.Event()

            def stop_on_go(go: threading.Event = go, sup: corral.Supervisor = sup) -> None:
                go.wait(10)
                sup.stop()

            stopper = threading.Thread(target=stop_on_go)
            stopper.start()
            sup.start()
            go.set()
            stopper.join(30)
            assert not stopper.is_alive()
            assert not sup.running
            spawned = log.pids()
            assert not any(pid_alive(p) for p in spawned), "a worker outlived stop()"
            assert all(s.state is WorkerState.STOPPED for s in sup.status())
        assert not stays_empty(_alive_descendants, 0.3)


@pytest.mark.timeout(30)
def test_stop_during_start_call(no_leaks: set[int]) -> None:
    """stop() from another thread while start() itself has not returned yet.

    After both calls return, no worker may run: either start() refuses, or the stop applies to
    the pool it started. start() is held inside its call through ``names``, which it runs in the
    caller's thread before any process exists.
    """
    inside, release = threading.Event(), threading.Event()

    def names(index: int) -> str:
        inside.set()
        release.wait(10)
        return f"w{index}"

    sup = corral.Supervisor(workers.sleeper, workers=2, start_method="fork", names=names)
    log = EventLog()
    sup.subscribe(log)
    errors: list[BaseException] = []

    def start() -> None:
        try:
            sup.start()
        except BaseException as exc:
            errors.append(exc)

    starter = threading.Thread(target=start)
    starter.start()
    try:
        assert inside.wait(10)
        stopper = threading.Thread(target=sup.stop)
        stopper.start()
        # stop() may rightly wait for start() to finish; give it the chance, then let start go.
        stopper.join(0.5)
        release.set()
        starter.join(10)
        stopper.join(10)
        assert not starter.is_alive() and not stopper.is_alive()
        # Whatever start() did, nothing may run once both returned.
        assert wait_for(lambda: not sup.running, 2, "the pool to be stopped")
    finally:
        release.set()
        starter.join(10)
        sup.stop()
        no_leaks.update(log.pids())


@pytest.mark.timeout(30)
@pytest.mark.parametrize("method", START_METHODS)
def test_context_manager(method: str, no_leaks: set[int]) -> None:
    log = EventLog()
    with corral.Supervisor(workers.sleeper, workers=2, start_method=method) as sup:
        sup.subscribe(log)
        sup.wait_ready(timeout=15)
        pids = sup.pids()
        no_leaks.update(pids)
        assert sup.running and len(pids) == 2
    assert not sup.running
    assert not any(psutil.pid_exists(p) for p in pids)

    # An exception in the body stops the pool too, and propagates.
    with pytest.raises(KeyError), corral.Supervisor(workers.sleeper, workers=2,
                                                   start_method=method) as sup2:
        sup2.wait_ready(timeout=15)
        pids = sup2.pids()
        no_leaks.update(pids)
        raise KeyError("boom")
    assert not sup2.running
    assert not any(psutil.pid_exists(p) for p in pids)


@pytest.mark.timeout(30)
def test_start_twice_raises(no_leaks: set[int]) -> None:
    with pool(no_leaks, workers.sleeper, workers=2, start_method="fork") as (sup, _log):
        sup.wait_ready(timeout=10)
        pids = sup.pids()
        with pytest.raises(corral.SupervisorStateError):
            sup.start()
        assert sup.pids() == pids  # nothing else started
        assert len(_alive_descendants()) == 2
        sup.stop()
        with pytest.raises(corral.SupervisorStateError):
            sup.start()  # a stopped pool is not started again either
    assert not _alive_descendants()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_no_worker_starts_after_stop(method: str, no_leaks: set[int]) -> None:
    """A crash-looping pool with no backoff: once stop() returns, no worker is or comes alive."""
    no_delay = corral.Backoff(initial=0.0, cap=0.0, jitter=0.0, reset_after=60.0)
    # Stop at different points of the loop: after more and more restarts.
    rounds = (30, 50, 70) if method == "fork" else (20, 40)
    for enough in rounds:
        with pool(no_leaks, workers.crash_at_once, workers=8, start_method=method,
                  backoff=no_delay, budget=corral.RestartBudget(max_restarts=None)
                  ) as (sup, log):
            # Stop in the thick of it: many restarts behind, starts in flight.
            def crash_looped(evs: list[corral.Event], enough: int = enough) -> bool:
                return sum(e.kind is EventKind.SPAWNED for e in evs) >= enough

            log.wait(crash_looped, 30, "the pool to crash-loop")
            sup.stop()
            spawned = log.pids()
            alive = {p for p in spawned if pid_alive(p)} | _alive_descendants()
            assert not alive, f"alive after stop() returned: {sorted(alive)}"
            kinds = [e.kind for e in log.events]
            assert kinds[-1] is EventKind.STOPPED
            assert all(s.state is WorkerState.STOPPED for s in sup.status())
        late = stays_empty(_alive_descendants, 0.5)
        assert not late, f"started after stop(): {sorted(late)}"



@pytest.mark.timeout(30)
def test_stop_timeout_zero_kills_a_worker_being_restarted(no_leaks: set[int]) -> None:
    with pool(no_leaks, workers.ignore_sigterm, workers=1, start_method="fork",
              ready_when="ready", stop_timeout=30.0) as (sup, _log):
        sup.wait_ready(timeout=10)
        pid = sup.pids()[0]
        no_leaks.add(pid)
        sup.restart(0)  # now STOPPING, its own SIGKILL deadline 30 s away
        stopper = threading.Thread(target=sup.stop, kwargs={"timeout": 0}, daemon=True)
        stopper.start()
        stopper.join(5)
        hung = stopper.is_alive()
        if hung:
            os.kill(pid, signal.SIGKILL)  # unblock the monitor so the test can clean up
            stopper.join(10)
        assert not hung, "stop(timeout=0) still waiting after 5 s"


@pytest.mark.timeout(30)
def test_control_after_stop_is_refused(no_leaks: set[int]) -> None:
    with pool(no_leaks, workers.sleeper, workers=1, start_method="fork") as (sup, _log):
        sup.wait_ready(timeout=10)
        sup.stop()
        # SupervisorStateError would be the documented error; it is a RuntimeError too.
        with pytest.raises(RuntimeError):
            sup.scale(2)
        with pytest.raises(RuntimeError):
            sup.restart(0)
        with pytest.raises(RuntimeError):
            sup.restart_all()
        assert not sup.running
        assert not _alive_descendants()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", START_METHODS)
def test_forgotten_stop_at_interpreter_exit(method: str, no_leaks: set[int]) -> None:
    """A program that returns without stop(): its workers are stopped at exit, and it exits."""
    proc, pids = start_supervisor_script(method, 2, "return")
    no_leaks.add(proc.pid)
    no_leaks.update(pids)
    try:
        assert proc.wait(20) == 0
        wait_gone(pids, 10, "the workers of an exited program to die")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()
