"""RayWorker against a real local Ray cluster: start, probe, stop, and every way a worker ends.

One cluster for the whole directory (see conftest.py). Timing checks are in seconds; the
latencies are printed (``pytest -s``) and measured properly in benchmarks/ray_bench.py.
"""

from __future__ import annotations

import os
import select
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import ray

from corral.events import StopReason
from corral.exitstatus import ExitStatus
from corral.ray import (
    ActorExit,
    DeathCause,
    Liveness,
    ProbeFailed,
    ProbeFailure,
    RayStartFailed,
    RayWorker,
)
from ray_backend import ray_targets

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("ray_cluster")]


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not _gone(pid):
        assert time.monotonic() < deadline, f"actor process {pid} still alive after {timeout}s"
        time.sleep(0.01)


class Exits:
    """An on_exit callback that records every call (from corral's reaper thread)."""

    def __init__(self) -> None:
        self.calls: list[tuple[RayWorker, ActorExit, float]] = []
        self.event = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, worker: RayWorker, exit_: ActorExit) -> None:
        with self._lock:
            self.calls.append((worker, exit_, time.monotonic()))
        self.event.set()


@pytest.fixture
def start() -> Iterator[Callable[..., tuple[RayWorker, Exits]]]:
    """Start RayWorkers; at the end, kill any still running and check their processes went."""
    started: list[RayWorker] = []

    def _start(target: Callable[..., Any], *args: Any, index: int = 0,
               **kwargs: Any) -> tuple[RayWorker, Exits]:
        exits = Exits()
        worker = RayWorker.start(target, index, args, name=f"t-{index}", pool="t",
                                 on_exit=exits, **kwargs)
        started.append(worker)
        return worker, exits

    yield _start
    for worker in started:
        try:
            os.kill(worker.pid, signal.SIGCONT)
        except OSError:
            pass
        worker.kill()
    for worker in started:
        assert worker.wait(10), f"{worker!r}: Ray never reported its end"
        worker.close()
        wait_gone(worker.pid)


def test_probe_then_cooperative_stop(start: Callable[..., tuple[RayWorker, Exits]],
                                     tmp_path: Path) -> None:
    marker = tmp_path / "cleaned"
    worker, exits = start(ray_targets.beating, str(marker), index=3)
    assert worker.pid > 0 and worker.pid != os.getpid()
    assert worker.node_id == ray.get_runtime_context().get_node_id()
    first = worker.probe(timeout=10)
    deadline = time.monotonic() + 10
    while not first.ready:
        assert time.monotonic() < deadline, "the worker never became ready"
        first = worker.probe(timeout=10)
    assert first.pid == worker.pid and first.running and first.rss > 0
    assert first.status == "worker 3 beating"
    second = worker.probe(timeout=10)
    while second.seq == first.seq:
        assert time.monotonic() < deadline, "the beat sequence never advanced"
        second = worker.probe(timeout=10)

    t0 = time.monotonic()
    end = worker.stop(grace=10)
    took = time.monotonic() - t0
    assert end is not None and end.cause is DeathCause.EXITED
    assert end.exit == ExitStatus(code=0) and end.stop_requested
    assert took < 5, f"a cooperative worker took {took:.2f}s to stop"
    assert marker.read_text().startswith("cleaned up")  # its finally block ran
    assert len(exits.calls) == 1 and exits.calls[0][0] is worker
    wait_gone(worker.pid)


def test_uncooperative_worker_is_killed_at_the_deadline(
        start: Callable[..., tuple[RayWorker, Exits]]) -> None:
    worker, exits = start(ray_targets.sleeper)
    worker.probe(timeout=10)
    grace = 1.5
    t0 = time.monotonic()
    end = worker.stop(grace=grace)
    took = time.monotonic() - t0
    print(f"\nuncooperative stop(grace={grace}): ended after {took:.3f}s", file=sys.stderr)
    assert end is not None and end.cause is DeathCause.KILLED and end.stop_requested
    assert grace - 0.05 <= took <= grace + 0.5
    wait_gone(worker.pid)
    assert len(exits.calls) == 1


def test_sigkill_of_the_actor_is_an_actor_death(
        start: Callable[..., tuple[RayWorker, Exits]]) -> None:
    latencies = []
    for i in range(10):
        worker, exits = start(ray_targets.beating, index=i)
        worker.probe(timeout=10)
        poller = select.poll()
        poller.register(worker.waitable(), select.POLLIN)
        assert poller.poll(0) == []
        t0 = time.monotonic()
        os.kill(worker.pid, signal.SIGKILL)
        assert poller.poll(10_000), "the waitable fd never became readable"
        assert exits.event.wait(10), "the death was never reported"
        latencies.append(exits.calls[0][2] - t0)
        end = exits.calls[0][1]
        assert end.cause is DeathCause.DIED and end.reason is StopReason.KILLED
        assert end.exit is None and not end.stop_requested
        assert "worker process has died" in end.detail and end.hint and "SIGKILL" in end.hint
        record = end.record(worker.index, worker.name, worker.pid, 1.0)
        assert record.reason is StopReason.KILLED and record.pid == worker.pid
    print(f"\nSIGKILL -> on_exit over {len(latencies)} runs: median "
          f"{statistics.median(latencies) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms",
          file=sys.stderr)
    assert max(latencies) < 5


def test_ray_kill_from_outside(start: Callable[..., tuple[RayWorker, Exits]]) -> None:
    worker, exits = start(ray_targets.beating)
    worker.probe(timeout=10)
    ray.kill(worker.actor)
    assert exits.event.wait(10)
    end = exits.calls[0][1]
    assert end.cause is DeathCause.KILLED and end.reason is StopReason.KILLED
    assert "ray.kill" in end.detail
    wait_gone(worker.pid)


def test_a_raising_target_gives_the_users_exception(
        start: Callable[..., tuple[RayWorker, Exits]]) -> None:
    worker, exits = start(ray_targets.raises, index=7)
    assert exits.event.wait(30)
    end = exits.calls[0][1]
    assert end.cause is DeathCause.RAISED and end.exit == ExitStatus(code=1)
    assert end.reason is StopReason.EXITED
    assert type(end.error) is ValueError and str(end.error) == "worker 7 failed on purpose"
    # The remote traceback, down to the user's own frame.
    assert "in inner" in end.detail and "ray_targets.py" in end.detail
    wait_gone(worker.pid)  # corral ends the actor once run() is over


@pytest.mark.parametrize("target, args, cause, code", [
    (ray_targets.exits, (3,), DeathCause.EXITED, 3),
    (ray_targets.returns, (), DeathCause.RETURNED, 0),
])
def test_exit_codes(start: Callable[..., tuple[RayWorker, Exits]], target: Callable[..., Any],
                    args: tuple[Any, ...], cause: DeathCause, code: int) -> None:
    worker, exits = start(target, *args)
    assert exits.event.wait(30)
    end = exits.calls[0][1]
    assert end.cause is cause and end.exit == ExitStatus(code=code)
    wait_gone(worker.pid)


def _watch(worker: RayWorker, live: Liveness, interval: float, probe_timeout: float,
           limit: float) -> tuple[Any, float]:
    """A minimal monitor: probe every ``interval`` until Liveness gives a verdict."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            reply = worker.probe(timeout=probe_timeout)
            live.on_reply(reply.received, reply.seq)
        except ProbeFailed as exc:
            live.on_failure(time.monotonic(), exc.kind)
        now = time.monotonic()
        verdict = live.verdict(now)
        if verdict is not None:
            return verdict, now
        time.sleep(interval)
    raise AssertionError(f"no verdict within {limit}s")


def test_a_worker_that_stops_beating_is_found_hung(
        start: Callable[..., tuple[RayWorker, Exits]]) -> None:
    worker, exits = start(ray_targets.stops_beating)
    live = Liveness(time.monotonic(), heartbeat_timeout=1.5)
    verdict, at = _watch(worker, live, interval=0.25, probe_timeout=2, limit=30)
    assert verdict.reason is StopReason.HUNG and verdict.responsive
    late = at - live.last_progress
    print(f"\nhung found {late:.2f}s after the last progress seen (timeout 1.5s)",
          file=sys.stderr)
    assert 1.5 <= late <= 1.5 + 2
    stacks = worker.stacks()
    assert "(the target)" in stacks and "stops_beating" in stacks  # evidence before the stop
    end = worker.stop(grace=5)  # still cooperative: it runs Python between short sleeps
    assert end is not None and end.cause is DeathCause.EXITED
    record = end.record(worker.index, worker.name, worker.pid, 2.0, reason=verdict.reason)
    assert record.reason is StopReason.HUNG
    assert not exits.calls[0][1].error


def test_a_sigstopped_worker_is_found_by_the_probe_timeout(
        start: Callable[..., tuple[RayWorker, Exits]]) -> None:
    worker, exits = start(ray_targets.beating)
    worker.probe(timeout=10)
    os.kill(worker.pid, signal.SIGSTOP)
    live = Liveness(time.monotonic(), heartbeat_timeout=None, max_probe_failures=3)
    verdict, _ = _watch(worker, live, interval=0.1, probe_timeout=0.5, limit=30)
    assert psutil.Process(worker.pid).status() == psutil.STATUS_STOPPED
    assert verdict.reason is StopReason.HUNG and not verdict.responsive
    assert live.last_failure is ProbeFailure.TIMEOUT and "not answering" in verdict.detail
    t0 = time.monotonic()
    worker.kill()
    assert exits.event.wait(10)
    assert exits.calls[0][1].cause is DeathCause.KILLED
    wait_gone(worker.pid, timeout=3)  # on this node corral SIGKILLs it (Ray waits ~5 s)
    print(f"\nSIGSTOPped actor gone {time.monotonic() - t0:.3f}s after kill()", file=sys.stderr)


def test_options_are_passed_through(start: Callable[..., tuple[RayWorker, Exits]]) -> None:
    worker, _ = start(ray_targets.env_status, "CORRAL_RAY_TEST",
                      options={"num_cpus": 0, "scheduling_strategy": "SPREAD",
                               "runtime_env": {"env_vars": {"CORRAL_RAY_TEST": "from options"}}})
    deadline = time.monotonic() + 30
    while worker.probe(timeout=10).status != "from options":
        assert time.monotonic() < deadline, "the runtime_env did not reach the worker"
        time.sleep(0.05)


def test_an_actor_that_cannot_be_scheduled_fails_to_start() -> None:
    with pytest.raises(RayStartFailed, match="could not be started"):
        RayWorker.start(ray_targets.beating, 0, options={"num_gpus": 1}, start_timeout=2)
