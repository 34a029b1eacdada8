"""`make demo` (examples/demo.py) runs to the end, exits 0 and shows what it promises."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from support import pid_alive

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.py"
RUN_TIMEOUT = 90


def _kill_group(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _note_alive(output: str, started: set[int], since: float) -> None:
    # Only pids alive now whose process began while the demo ran: the fixture kills what is in
    # the set, and a pid that died may have been reused by an unrelated process meanwhile.
    until = time.time()
    for pid in {int(p) for p in re.findall(r"\bpid (\d+)", output)}:
        try:
            born = psutil.Process(pid).create_time()
        except psutil.Error:
            continue
        if since - 1 <= born <= until and pid_alive(pid):
            started.add(pid)


def _run_demo(started: set[int]) -> str:
    """Run the demo; the pids it mentions that are still alive go into ``started``."""
    # Its own session, so the demo and multiprocessing's helpers go down together on a failure;
    # the workers (each its own process group) are found in its output.
    since = time.time()
    proc = subprocess.Popen([sys.executable, str(DEMO)], cwd=DEMO.parents[1],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True)
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        output, _ = proc.communicate()
        _note_alive(output, started, since)
        pytest.fail(f"the demo was still running after {RUN_TIMEOUT}s:\n{output}")
    except BaseException:
        _kill_group(proc)
        proc.communicate()
        raise
    _note_alive(output, started, since)
    assert proc.returncode == 0, f"demo exited with {proc.returncode}:\n{output}"
    return output


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_demo_runs_and_shows_each_moment(no_leaks: set[int]) -> None:
    output = _run_demo(no_leaks)
    # Every pid the demo listed is checked here too (they are not our descendants any more: the
    # demo's exit reparented whatever it might have left behind).
    listed = {int(pid) for pid in re.findall(r"^\s+pid\s+(\d+)\s", output, re.M)}
    assert len(listed) >= 6, output  # 4 workers, a replacement, a grandchild at the least
    assert not no_leaks, f"still alive after the demo: {sorted(no_leaks)}\n{output}"

    # The crasher: an uncaught exception, decoded as exit code 1, then restarted.
    assert re.search(r"event\s+exited\s+crasher\s+pid \d+\s+exit code 1 \(exited\)", output), \
        output
    assert "RuntimeError: simulated bug in the crasher" in output  # its traceback, on stderr
    # The victim: SIGKILLed from outside, decoded, restarted at once, its grandchild gone.
    assert re.search(r"event\s+exited\s+victim\s+pid \d+\s+SIGKILL\(-9\) \(killed by signal\)",
                     output), output
    assert re.search(r"event\s+restarting\s+victim\s+at once", output), output
    assert re.search(r"grandchild pid \d+ of the killed victim: gone", output), output
    # corral's own WARNING log lines are shown.
    assert re.search(r"log\s+WARNING corral\S*: worker 'crash-loop'", output), output

    # The crash loop: its restart delays, as the events reported them, grow up to the cap.
    delays = [float(d) for d in re.findall(r"event\s+restarting\s+crash-loop\s+in ([\d.]+)s",
                                           output)]
    assert len(delays) >= 5, output
    assert delays[0] < 0.5, delays
    assert delays[3] > 2 * delays[0], delays
    assert max(delays) >= 2.7, delays  # cap 3 s, jitter 10%
    assert max(delays) <= 3.3 + 0.01, delays
    assert "next restart in" in output

    # Shutdown: stop() timed, nothing left, every check passed.
    assert re.search(r"stop\(\) returned after [\d.]+s", output), output
    assert "STILL ALIVE" not in output
    assert "no process left" in output, output
    assert "every check passed" in output, output
