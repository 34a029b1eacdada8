"""The usage example of Duck's WorkerProcessManager docstring (examples/duck_usage.py) runs.

It runs as its own program, shortened to two rounds of its monitoring loop, under each start
method: a ``sitecustomize`` module on PYTHONPATH sets the method before the example starts, so
the example itself stays as in the docstring (it uses multiprocessing's default).
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from support import START_METHODS, pid_alive, wait_for

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "duck_usage.py"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", START_METHODS)
def test_docstring_usage_example_runs(method: str, tmp_path: Path,
                                      no_leaks: set[int]) -> None:
    (tmp_path / "sitecustomize.py").write_text(
        "import multiprocessing, os\n"
        "if os.environ.get('DUCK_EXAMPLE_METHOD'):\n"
        "    multiprocessing.set_start_method(os.environ['DUCK_EXAMPLE_METHOD'], force=True)\n"
        "    with open('method-set', 'a') as fh:\n"
        "        fh.write(multiprocessing.get_start_method() + '\\n')\n")
    env = dict(os.environ, DUCK_EXAMPLE_ROUNDS="2", DUCK_EXAMPLE_METHOD=method,
               PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, str(EXAMPLE)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    no_leaks.add(proc.pid)
    try:
        out, err = proc.communicate(timeout=45)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    assert (tmp_path / "method-set").read_text().splitlines()[0] == method
    # Five processes print to one unbuffered pipe, and print() writes its arguments and the
    # newline separately: lines interleave. Take the workers' messages out, then find each
    # status by its shape (the list is one write, so it arrives whole).
    for i in range(4):
        assert f"Worker {i} started..." in out
    assert re.search(r"\[Worker \d\] Sleeping", out)
    rest = re.sub(r"Worker \d started\.\.\.|\[Worker \d\] (Sleeping|Simulating crash)", "", out)
    statuses = [ast.literal_eval(m) for m in re.findall(r"Worker status:\s*(\[\{.*?\}\])", rest)]
    assert len(statuses) == 2
    for status in statuses:
        assert [s["name"] for s in status] == [f"duck-worker-{i}" for i in range(4)]
        # start() returns with every process running, as the original.
        assert all(isinstance(s["pid"], int) for s in status)
    assert all(s["alive"] for s in statuses[0])
    assert "Traceback" not in err
    # stop() in the example's finally left nothing behind.
    pids = {s["pid"] for status in statuses for s in status}
    no_leaks.update(pids)
    wait_for(lambda: not any(pid_alive(p) for p in pids), 10, "the example's workers to exit")
