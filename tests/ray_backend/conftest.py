"""One local Ray cluster for every test in this directory, and the check that it leaves nothing.

The cluster is package-scoped: it starts before the first Ray test and is shut down after the
last one, so no other test of the suite runs inside a Ray driver (ray.init starts ~20 native
threads, a SIGTERM handler and child processes). If Ray cannot be imported, every test here is
skipped with the reason.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator

import psutil
import pytest

ray = pytest.importorskip(
    "ray", reason="Ray is not installed here (pip install 'corral[ray]'): Ray tests skipped")

from ray_backend import ray_targets  # noqa: E402

# Markers of Ray's own processes in a command line (setproctitle rewrites workers' to "ray::").
_RAY_MARKS = ("ray::", "/ray/core/src/ray/", "/ray/_private/", "/ray/dashboard/",
              "gcs_server", "raylet")


def ray_processes() -> dict[int, str]:
    """Ray's processes below this one (raylet, gcs_server, agents, ray::IDLE, actors)."""
    out = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if any(mark in cmd for mark in _RAY_MARKS):
            out[proc.pid] = cmd[:80]
    return out


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="package")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, float]]:
    """A local cluster (4 CPUs, no dashboard); yields how long ray.init took."""
    from corral.ray import connect

    assert not ray.is_initialized(), "a Ray driver is already running in the test process"
    saved_address = os.environ.pop("RAY_ADDRESS", None)  # always a local cluster here
    old_term = signal.getsignal(signal.SIGTERM)
    temp = tmp_path_factory.mktemp("ray")  # Ray's logs go here, not to /tmp/ray
    t0 = time.monotonic()
    started = connect(num_cpus=4, include_dashboard=False, logging_level="ERROR",
                      log_to_driver=False, _temp_dir=str(temp))
    init_time = time.monotonic() - t0
    assert started
    assert signal.getsignal(signal.SIGTERM) is old_term, "connect() left Ray's SIGTERM handler"
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(ray_targets)
    print(f"\nray.init (local, 4 CPUs): {init_time:.2f}s", file=sys.stderr)
    seen = ray_processes()
    try:
        yield {"init_time": init_time}
    finally:
        seen.update(ray_processes())
        ray.shutdown()
        signal.signal(signal.SIGTERM, old_term)
        if saved_address is not None:
            os.environ["RAY_ADDRESS"] = saved_address
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            left = {pid: cmd for pid, cmd in {**seen, **ray_processes()}.items()
                    if _alive(pid)}
            if not left:
                break
            time.sleep(0.05)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        assert not left, f"Ray processes left after ray.shutdown(): {left}"
