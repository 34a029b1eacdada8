"""The daemon-thread executor behind health checks and readiness probes."""

from __future__ import annotations

import threading

import pytest

from corral._daemonpool import DaemonExecutor


@pytest.mark.timeout(30)
def test_runs_calls_and_passes_back_results_and_exceptions() -> None:
    ex = DaemonExecutor(2, "t-daemon")
    try:
        assert ex.submit(pow, 2, 10).result(timeout=10) == 1024
        with pytest.raises(ZeroDivisionError):
            ex.submit(divmod, 1, 0).result(timeout=10)
        assert ex.submit(dict, a=1).result(timeout=10) == {"a": 1}
    finally:
        ex.shutdown()


@pytest.mark.timeout(30)
def test_threads_are_daemons_at_most_max_workers_and_end_at_shutdown() -> None:
    gate = threading.Event()
    ex = DaemonExecutor(2, "t-daemon-max")
    futures = [ex.submit(gate.wait, 20) for _ in range(5)]
    ours = [t for t in threading.enumerate() if t.name.startswith("t-daemon-max_")]
    assert len(ours) == 2 and all(t.daemon for t in ours)
    gate.set()
    assert all(f.result(timeout=10) for f in futures)
    ex.shutdown(wait=True)
    assert not any(t.is_alive() for t in ours)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(abs, 1)


@pytest.mark.timeout(30)
def test_shutdown_cancels_what_has_not_begun_and_never_waits_for_a_hung_call() -> None:
    hung, release = threading.Event(), threading.Event()

    def hang() -> None:
        hung.set()
        release.wait(20)

    ex = DaemonExecutor(1, "t-daemon-hang")
    running = ex.submit(hang)
    queued = ex.submit(abs, -1)
    assert hung.wait(10)
    ex.shutdown(wait=False, cancel_futures=True)
    assert queued.cancelled() and not running.done()
    release.set()
    assert running.result(timeout=10) is None


def test_max_workers_is_checked() -> None:
    with pytest.raises(ValueError, match="max_workers must be >= 1, got 0"):
        DaemonExecutor(0, "x")
    with pytest.raises(TypeError, match="max_workers must be an int"):
        DaemonExecutor(True, "x")
