"""A host program that reaps every child (os.waitpid(-1)/os.wait() in a loop) steals corral's
workers' exit statuses. The pool and the supervisor must carry on (an unknown exit status is
still an exit), never spin, and stop and exit in bounded time.

Each case runs _reaper_host.py in a process of its own: a reaper in the test process would
steal every other test's children too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from support import pid_alive, wait_for

HERE = Path(__file__).parent

# Idle CPU of corral's manager/monitor thread over one second: a spinning thread uses ~1 s.
IDLE_CPU_MAX = 0.3


def _run_host(what: str, method: str, how: str) -> dict[str, object]:
    proc = subprocess.Popen([sys.executable, str(HERE / "_reaper_host.py"), what, method, how],
                            cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"the host did not finish (wedged):\n{err[-3000:]}") from None
    assert proc.returncode == 0, f"rc={proc.returncode}\n{err[-3000:]}"
    result: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return result


def _all_gone(pids: list[int]) -> None:
    try:
        wait_for(lambda: not any(pid_alive(p) for p in pids), 10, "every worker to be gone")
    finally:
        for pid in pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(("method", "how"), [("fork", "waitpid"), ("spawn", "wait")])
@pytest.mark.timeout(120)
def test_the_pool_keeps_serving_under_a_foreign_reaper(method: str, how: str) -> None:
    out = _run_host("pool", method, how)
    pids = out["pids"]
    assert isinstance(pids, list)
    _all_gone(pids)
    assert out["squares"] == [i * i for i in range(20)]
    assert out["workers_lost"] == 3 and out["broken"] is False
    lost = out["lost"]
    assert isinstance(lost, list)
    # Each death is reported: by its signal if corral won the race, else as unknown.
    assert all("SIGKILL" in m or "unknown exit status (reaped by another part" in m
               for m in lost), lost
    assert isinstance(out["reaped_by_host"], int) and out["reaped_by_host"] > 0
    assert isinstance(out["idle_cpu"], float) and out["idle_cpu"] < IDLE_CPU_MAX
    assert isinstance(out["shutdown_s"], float) and out["shutdown_s"] < 10


@pytest.mark.parametrize(("method", "how"), [("fork", "wait"), ("spawn", "waitpid")])
@pytest.mark.timeout(120)
def test_the_supervisor_keeps_restarting_under_a_foreign_reaper(method: str, how: str) -> None:
    out = _run_host("supervisor", method, how)
    pids = out["pids"]
    assert isinstance(pids, list)
    _all_gone(pids)
    assert isinstance(out["restarts"], int) and out["restarts"] >= 3
    exits = out["exits"]
    assert isinstance(exits, list) and len(exits) >= 3
    assert all("SIGKILL" in e or "unknown exit status" in e for e in exits), exits
    assert isinstance(out["reaped_by_host"], int) and out["reaped_by_host"] > 0
    assert isinstance(out["idle_cpu"], float) and out["idle_cpu"] < IDLE_CPU_MAX
    assert isinstance(out["shutdown_s"], float) and out["shutdown_s"] < 10
