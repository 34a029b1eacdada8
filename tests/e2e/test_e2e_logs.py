"""Log capture through ``corral run``: line limits, the console, JSON lines, rotating files
(and /dev/stdout, never rotated), the ring that ``logs -n`` reads, no lost line under load."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import Corral, toml_argv, worker
from support import wait_for

pytestmark = pytest.mark.timeout(120)

STAMP = r"\d\d:\d\d:\d\d\.\d{3}"


def test_long_lines_are_split_and_marked(corral: Any) -> None:
    c: Corral = corral("-n", "1", "--name", "long", "--", *worker("--long-line", "150000"))
    c.wait_running(1)
    wait_for(lambda: "tick 0" in c.out(), 10, "the first tick")
    pieces = [json.loads(x) for x in c.ok("logs", "long", "-n", "100", "--json").splitlines()
              if '"LLL' in x]
    assert [len(p["line"]) for p in pieces] == [65536, 65536, 150000 - 2 * 65536]
    assert [(p.get("more"), p.get("cont")) for p in pieces] == [
        (True, False), (True, True), (False, True)]
    out = c.out()
    assert re.search(rf"{STAMP} long\.0 \|  L{{65536}}\\\n", out)  # marked: goes on
    assert re.search(rf"{STAMP} long\.0 \| \+ L{{18928}}\n", out)  # marked: continues
    assert "tick 0" in out  # and the lines after it are untouched


def test_console_prefix_timestamps_and_json_lines(corral: Any) -> None:
    c: Corral = corral("-n", "2", "--name", "web", "--", *worker("--stderr", "oops"))
    c.wait_running(2)
    wait_for(lambda: "web.1 |! oops" in c.out(), 10, "web.1's stderr line")
    out = c.out()
    assert re.search(rf"^{STAMP} web\.0 \|  start index 0 pid \d+", out, re.M)
    assert re.search(rf"^{STAMP} web\.1 \|! oops$", out, re.M)
    assert "\x1b[" not in out  # not a TTY: no colours
    j: Corral = corral("-n", "1", "--name", "js", "--json-logs", "--", *worker(), name="j")
    j.wait_running(1)
    wait_for(lambda: "tick 1" in j.out(), 10, "two ticks")
    objs = [json.loads(x) for x in j.out().splitlines()]
    keys = {"schema", "ts", "program", "index", "pid", "stream", "line"}
    assert keys <= set(objs[0]) and objs[0]["schema"] == "corral.log/1"
    assert objs[0]["program"] == "js" and objs[0]["line"].startswith("start index 0")
    own = [json.loads(x) for x in j.err().splitlines() if x.startswith("{")]
    # corral's own lines are corral.log/1 too (docs/json-schema.md), with a level
    assert own and all(keys | {"level", "logger"} <= set(o) for o in own)
    assert all(o["schema"] == "corral.log/1" and o["program"] == "corral"
               and o["pid"] == j.pid and o["stream"] == "stderr" for o in own)
    assert any("started" in o["line"] and o["level"] == "INFO" for o in own)


def test_colours_on_a_tty(corral: Any) -> None:
    master, slave = pty.openpty()
    try:
        c: Corral = corral("-n", "1", "--name", "tty", "--", *worker("--stderr", "red"),
                           stdout=slave)
        os.close(slave)
        slave = -1
        c.wait_running(1)
        seen = b""
        deadline = time.monotonic() + 15
        while b"tick 1" not in seen and time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                seen += os.read(master, 65536)
        assert b"tick 1" in seen
        assert re.search(rb"\x1b\[\d+mtty\.0 \|", seen)  # the label in its colour
        assert b"\x1b[31m!" in seen  # stderr marked red
        c.stop()
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)


def test_rotating_file_per_program(corral: Any, tmp_path: Path) -> None:
    logdir = tmp_path / "logs"
    logdir.mkdir()
    c: Corral = corral(config=f"""
[log]
file = "{logdir}/{{program}}.log"
max_bytes = "2KiB"
backups = 2

[program.chatty]
command = {toml_argv(worker("--every", "0.005"))}
""")
    c.wait_running(1)
    path = logdir / "chatty.log"
    wait_for(lambda: (logdir / "chatty.log.2").exists(), 20, "two rotations")
    time.sleep(0.3)  # a few more rotations: .3 must never appear
    names = sorted(p.name for p in logdir.iterdir())
    assert names == ["chatty.log", "chatty.log.1", "chatty.log.2"]
    for p in logdir.iterdir():
        assert p.stat().st_size <= 2048, p
    line = path.read_text().splitlines()[0]
    assert re.match(rf"^\d{{4}}-\d\d-\d\d {STAMP} chatty\.0 \|  tick \d+", line), line


def test_dev_stdout_is_never_seeked_or_rotated(corral: Any, tmp_path: Path) -> None:
    """supervisord #1078: logfile=/dev/stdout fails with "Illegal seek". corral's stdout is a
    pipe here, the file sink writes to it too, with a tiny max_bytes: no seek, no rotation."""
    r, w = os.pipe()
    got = bytearray()
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            if select.select([r], [], [], 0.2)[0]:
                chunk = os.read(r, 65536)
                if not chunk:
                    return
                got.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        c: Corral = corral(config=f"""
[program.out]
command = {toml_argv(worker("--every", "0.01"))}
log = {{ file = "/dev/stdout", max_bytes = 100, backups = 1 }}
""", stdout=w)
        os.close(w)
        w = -1
        c.wait_running(1)
        wait_for(lambda: bytes(got).count(b"tick 20") >= 2, 20, "tick 20 twice (both sinks)")
        text = bytes(got).decode()
        assert re.search(rf"^{STAMP} out\.0 \|  tick 20 ", text, re.M)  # console
        assert re.search(rf"^\d{{4}}-\d\d-\d\d {STAMP} out\.0 \|  tick 20 ", text, re.M)
        assert c.stop() == 0
        assert "seek" not in c.err().lower() and "rotat" not in c.err()
        assert not list(tmp_path.glob("*.1"))
    finally:
        stop.set()
        if w >= 0:
            os.close(w)
        reader.join(5)
        os.close(r)


def test_no_lost_line_with_4_fast_workers(corral: Any, tmp_path: Path) -> None:
    """4 workers x 10,000 numbered lines, as fast as the pipes take them: every line arrives
    once, in order, in the JSON log file (the bench measures the rate)."""
    logdir = tmp_path / "logs"
    logdir.mkdir()
    c: Corral = corral(config=f"""
[log]
console = false
file = "{logdir}/{{program}}.log"
file_json = true
max_bytes = 0

[program.fast]
command = {toml_argv(worker("--stream", "10000", "1"))}
numprocs = 4
restart = "never"
""")
    wait_for(lambda: (logdir / "fast.log").exists()
             and (logdir / "fast.log").read_text().count('"line": "done ') == 4, 60,
             "4 workers done")
    seqs: dict[int, list[int]] = {i: [] for i in range(4)}
    for raw in (logdir / "fast.log").read_text().splitlines():
        obj = json.loads(raw)
        if obj["line"].startswith("seq "):
            _, idx, n, _pad = obj["line"].split(" ")
            assert int(idx) == obj["index"]
            seqs[obj["index"]].append(int(n))
    for i in range(4):
        assert seqs[i] == list(range(10000)), f"worker {i}: {len(seqs[i])} lines"
    assert c.out() == ""  # console = false
    # the ring keeps the tail (1000 lines per worker by default)
    tail = c.ok("logs", "fast:2", "-n", "1000").splitlines()
    assert len(tail) == 1000 and any(x.endswith("|  done 10000") for x in tail)


def test_a_stalled_console_throttles_the_workers_not_corral(corral: Any) -> None:
    """Nobody reads corral's stdout: the workers block on their pipes, corral's memory stays
    bounded and it still answers; once stdout is read, every line comes out, in order."""
    import subprocess

    import psutil

    n = 60_000
    c: Corral = corral("-n", "2", "--name", "fast", "--restart", "never", "--",
                       *worker("--stream", str(n), "1"), stdout=subprocess.PIPE)
    assert c.proc is not None and c.proc.stdout is not None
    # Either worker (on a slow start one may fill the console before the other has begun:
    # from then on both are held back).
    wait_for(lambda: "seq" in c.cli("logs", "-n", "1").stdout, 20, "the workers streaming")
    me = psutil.Process(c.pid)
    rss0 = me.memory_info().rss
    # A bounded look (about 3 s): ~6 MB are offered to a console nobody reads.
    peak = rss0
    t_end = time.monotonic() + 3
    while time.monotonic() < t_end:
        r = c.cli("status", "--json", timeout=10)
        assert r.returncode == 0, r.stderr  # the loop is not blocked by its full stdout
        peak = max(peak, me.memory_info().rss)
    assert peak - rss0 < 16 << 20, f"corral grew by {(peak - rss0) >> 20} MiB"
    assert "done" not in c.cli("logs", "-n", "4").stdout  # the workers were held back
    # Now read: everything arrives.
    got = bytearray()
    fd = c.proc.stdout.fileno()
    deadline = time.monotonic() + 60
    while got.count(b"|  done ") < 2 and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            got += chunk
    seqs: dict[str, list[int]] = {"0": [], "1": []}
    for m in re.finditer(rb"\|  seq (\d) (\d+) ", bytes(got)):
        seqs[m.group(1).decode()].append(int(m.group(2)))
    assert seqs["0"] == list(range(n)) and seqs["1"] == list(range(n))


BLANK_BURSTS = """
import sys, time
out = sys.stdout.buffer
for i in range(3):
    out.write(b"seq %d\\n" % i + b"\\n" * 70000)
    out.flush()
out.write(b"done\\n")
out.flush()
time.sleep(600)
"""


def test_bursts_of_empty_lines_lose_nothing_in_json_logs(corral: Any) -> None:
    """One 64 KiB read of empty lines is ~8 MiB of JSON, past the console buffer's limit: it
    used to be dropped whole, silently. Now the worker is throttled and every line arrives."""
    import subprocess
    import sys

    c: Corral = corral("-n", "1", "--name", "blank", "--json-logs", "--",
                       sys.executable, "-c", BLANK_BURSTS, stdout=subprocess.PIPE)
    assert c.proc is not None and c.proc.stdout is not None
    got = bytearray()
    fd = c.proc.stdout.fileno()
    deadline = time.monotonic() + 60
    while b'"line": "done"' not in got and time.monotonic() < deadline:
        if select.select([fd], [], [], 1)[0]:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            got += chunk
    lines = [json.loads(x)["line"] for x in bytes(got).splitlines()
             if b'"program": "blank"' in x]
    assert [x for x in lines if x] == ["seq 0", "seq 1", "seq 2", "done"]
    assert len(lines) == 3 * 70001 + 1
    c.stop()
    assert "dropped" not in c.err()


LAST_WORDS = """
import os, signal, sys, time
idx = os.environ["CORRAL_INDEX"]
def bye(*_):
    for i in range(3000):
        sys.stdout.write(f"bye {idx} {i} " + "z" * 100 + "\\n")
    sys.stdout.write(f"LAST {idx}\\n")
    sys.stdout.flush()
    os._exit(0)
signal.signal(signal.SIGTERM, bye)
print("up", idx, flush=True)
while True:
    time.sleep(1)
"""


def test_last_lines_reach_a_slow_console_at_shutdown(corral: Any) -> None:
    """The workers' last lines (often why they stopped) used to be dropped at shutdown when
    the console was behind: corral tried one write, then closed. Now it flushes them (within
    a bounded time) before it exits."""
    import subprocess
    import sys

    c: Corral = corral("-n", "2", "--name", "bye", "--stop-timeout", "20", "--",
                       sys.executable, "-c", LAST_WORDS, stdout=subprocess.PIPE)
    assert c.proc is not None and c.proc.stdout is not None
    fd = c.proc.stdout.fileno()
    got = bytearray()

    def consume() -> None:  # a slow console: 4 KiB every 2 ms (about 2 MB/s)
        while chunk := os.read(fd, 4096):
            got.extend(chunk)
            time.sleep(0.002)

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    wait_for(lambda: got.count(b"|  up ") == 2, 20, "both workers up")
    assert c.stop() == 0
    reader.join(30)
    assert not reader.is_alive()
    text = bytes(got).decode()
    for i in range(2):
        assert f"|  LAST {i}\n" in text
        assert len(re.findall(rf"\|  bye {i} \d+ z", text)) == 3000
    assert "unwritten" not in c.err() and "dropped" not in c.err()
