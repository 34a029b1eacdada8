"""Processes of command workers under ``corral run``: process groups, one stop deadline, exit
causes, backoff and budget, orphans and setsid() escapees, PID 1 in a container."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from conftest import CLI, Corral, alive, toml_argv, worker
from support import wait_for

pytestmark = pytest.mark.timeout(90)

WORKER_MARK = "e2e/worker.py"


def pids_in(text: str, word: str) -> list[int]:
    return [int(p) for p in re.findall(rf"{word} (\d+)", text)]


def zombie_children(pid: int) -> list[int]:
    try:
        return [c.pid for c in psutil.Process(pid).children()
                if c.status() == psutil.STATUS_ZOMBIE]
    except psutil.NoSuchProcess:
        return []


def test_the_process_group_goes_with_the_worker(corral: Any) -> None:
    c: Corral = corral("-n", "2", "--name", "g", "--", *worker("--grandchild"))
    ws = c.wait_running(2)
    wait_for(lambda: len(pids_in(c.out(), "grandchild")) == 2, 10, "2 grandchildren")
    gc = {int(m.group(1)): int(m.group(2)) for m in
          re.finditer(r"g\.(\d) \|  grandchild (\d+)", c.out())}
    assert all(os.getpgid(gc[i]) == ws[i]["pid"] for i in (0, 1))  # in the worker's group
    c.seen |= set(gc.values())
    # stopped on request: its group with it
    c.ok("stop", "g:0")
    wait_for(lambda: not alive(gc[0]), 10, "g.0's grandchild gone")
    assert alive(gc[1])
    # a worker that dies by itself: what it left in its group is killed too
    os.kill(ws[1]["pid"], signal.SIGKILL)
    wait_for(lambda: not alive(gc[1]), 10, "g.1's grandchild gone after g.1 was killed")


def test_one_stop_deadline_for_all(corral: Any) -> None:
    c: Corral = corral("-n", "4", "--name", "stubborn", "--stop-timeout", "1", "--",
                       *worker("--ignore-term", "--grandchild"))
    c.wait_running(4)
    wait_for(lambda: len(pids_in(c.out(), "grandchild")) == 4, 10, "4 grandchildren")
    everything = c.note_pids()
    assert len(everything) >= 8
    t0 = time.monotonic()
    c.signal(signal.SIGTERM)
    assert c.wait_exit(30) == 0
    took = time.monotonic() - t0
    # one deadline for the pool, not 4 x 1 s (generous: the machine is shared)
    assert 0.9 <= took < 3.5, took
    assert not [p for p in everything if alive(p)]
    assert c.err().count("did not stop within its grace; sending SIGKILL") == 4


def test_sigterm_with_many_workers_never_hangs(corral: Any) -> None:
    """64 workers ending at once send 64 SIGCHLDs while corral's loop is busy stopping them.
    Before the fix, a signal handler taking the loop's lock that the same (main) thread
    already held deadlocked corral here in 5 runs of 6."""
    for attempt in range(3):
        c: Corral = corral("-n", "64", "--name", "many", "--", "sleep", "600",
                           name=f"many{attempt}", stdout=subprocess.DEVNULL)
        ws = c.wait_running(64, timeout=60)
        c.signal(signal.SIGTERM)
        assert c.wait_exit(30) == 0, f"attempt {attempt}: corral did not exit on SIGTERM"
        assert not [w["pid"] for w in ws if alive(w["pid"])]


def test_exit_causes_decoded(corral: Any) -> None:
    c: Corral = corral(config=f"""
[program.code]
command = {toml_argv(worker("--exit", "3", "--after", "0.2"))}
restart = "never"

[program.segv]
command = {toml_argv(worker("--kill-self", "SEGV", "--after", "0.2"))}
restart = "never"

[program.clean]
command = {toml_argv(worker("--exit", "0", "--after", "0.2"))}
restart = "on-failure"
""")
    for prog in ("code", "segv", "clean"):
        c.wait_workers(lambda ws: ws and ws[0]["state"] == "exited", f"{prog} exited", prog)
    code = c.workers("code")[0]["last_exit"]
    assert code["code"] == 3 and code["signal"] is None and code["reason"] == "exited"
    assert "exit code 3" in code["description"]
    segv = c.workers("segv")[0]["last_exit"]
    assert segv["signal"] == "SIGSEGV" and segv["signum"] == 11
    assert segv["reason"] == "killed by signal"
    assert "SIGSEGV(-11)" in segv["description"]
    clean = c.workers("clean")[0]
    assert clean["last_exit"]["code"] == 0 and clean["restarts"] == 0
    # every worker of every program died by itself: dead, not "stopped" (LSB 1)
    assert c.cli("status").returncode == 1
    text = c.ok("events", "-n", "100")
    assert "exit code 3" in text and "SIGSEGV" in text


def test_backoff_and_budget(corral: Any) -> None:
    c: Corral = corral(config=f"""
[program.crash]
command = {toml_argv(worker("--exit", "1"))}
backoff = {{ initial = "100ms", multiplier = 2, cap = "2s", jitter = 0 }}
budget = {{ max_restarts = 4, window = "1m" }}
""")
    c.wait_workers(lambda ws: not ws or ws[0]["state"] in ("stopped",), "gave up",
                   timeout=30)
    doc = c.status()
    prog = doc["programs"][0]
    assert prog["gave_up"] and prog["state"] == "gave up"
    assert c.cli("status").returncode == 1
    evs = [e for e in (__import__("json").loads(x) for x in
                       c.ok("events", "-n", "100", "--json").splitlines())]
    delays = [e["delay"] for e in evs if e["kind"] == "restarting"]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8])
    gave_up = [e for e in evs if e["kind"] == "gave up"]
    assert gave_up and "more than 4 restarts within 60s" in gave_up[0]["message"]
    assert "gave up" in c.err()
    # corral's exit code says a program gave up
    assert c.stop() == 1


def test_orphans_and_setsid_escapees(corral: Any, tmp_path: Path) -> None:
    """corral is a child subreaper: an orphan is reaped quietly, an escapee still below it is
    killed when it exits."""
    c: Corral = corral(config=f"""
[program.esc]
command = {toml_argv(worker("--escape", "600"))}

[program.orphan]
command = {toml_argv(worker("--escape", "1"))}
restart = "never"
""")
    w_esc = c.wait_running(1, "esc")[0]["pid"]
    w_orphan = c.wait_running(1, "orphan")[0]["pid"]
    wait_for(lambda: len(pids_in(c.out(), "escapee")) == 2, 10, "2 escapees")
    escapees = {m.group(1): int(m.group(2))
                for m in re.finditer(r"(\w+)\.0\s+\|  escapee (\d+)", c.out())}
    c.seen |= set(escapees.values())
    esc, orphan = escapees["esc"], escapees["orphan"]
    assert os.getsid(esc) == esc != os.getsid(w_esc)  # out of the worker's group
    # the worker dies: its escapees are adopted by corral, not by init
    os.kill(w_orphan, signal.SIGKILL)
    os.kill(w_esc, signal.SIGKILL)
    wait_for(lambda: psutil.Process(esc).ppid() == c.pid, 10, "the escapee adopted by corral")
    # the short-lived one ends: corral reaps it, quietly
    wait_for(lambda: not psutil.pid_exists(orphan), 15, "the orphan reaped")
    assert not zombie_children(c.pid)
    assert f"pid {orphan}" not in c.err()
    assert alive(esc)
    assert c.stop() == 0
    # the first escapee and the one its restarted worker made
    later = set(pids_in(c.out(), "escapee")) - {orphan}
    assert len(later) == 2 and esc in later
    assert not [p for p in later if alive(p)]
    assert "killed 2 process(es) left below corral at exit" in c.err()


def test_nothing_left_after_corral_is_killed(corral: Any) -> None:
    """SIGKILL of corral itself: the keeper takes the workers' groups down (grandchildren
    included). A setsid() escapee is outside any group: only a cgroup holds it (README)."""
    c: Corral = corral("-n", "3", "--name", "k", "--", *worker("--grandchild"))
    c.wait_running(3)
    wait_for(lambda: len(pids_in(c.out(), "grandchild")) == 3, 10, "3 grandchildren")
    everything = c.note_pids() - {p.pid for p in psutil.Process(c.pid).children()
                                  if "corral-keeper" in " ".join(p.cmdline())}
    assert len(everything) >= 6
    c.signal(signal.SIGKILL)
    c.wait_exit(10)
    wait_for(lambda: not [p for p in everything if alive(p)], 10, "every worker and grandchild "
             "gone after corral was SIGKILLed")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare(1) for a private PID namespace")
def test_pid_1_in_a_container(tmp_path: Path) -> None:
    """corral run as PID 1 of a new PID namespace: it reaps adopted orphans quietly, and
    SIGTERM stops the pools."""
    probe = subprocess.run(["unshare", "-p", "-f", "--mount-proc", "true"],
                           capture_output=True, timeout=10)
    if probe.returncode != 0:
        pytest.skip(f"unshare -p -f --mount-proc does not work here: {probe.stderr!r}")
    c = Corral(tmp_path)
    with open(c.out_path, "wb") as out, open(c.err_path, "wb") as err:
        proc = subprocess.Popen(
            ["unshare", "-p", "-f", "--mount-proc", *CLI, "--socket", c.socket, "run", "-n",
             "2", "--name", "p", "--", *worker("--escape", "0.5")],
            stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
    corral_pid: int | None = None
    try:
        def find() -> int | None:
            for p in psutil.Process(proc.pid).children(recursive=True):
                if "run" in p.cmdline() and "--socket" in p.cmdline():
                    return p.pid
            return None

        corral_pid = wait_for(find, 20, "corral inside the namespace")
        c.wait_running(2)
        # inside, corral is PID 1
        with open(f"/proc/{corral_pid}/status") as fh:
            nspid = next(line for line in fh if line.startswith("NSpid:")).split()
        assert nspid[-1] == "1"
        # Status shows the namespace's pids: find the workers' host pids below corral.
        def host_workers() -> list[int]:
            return [p.pid for p in psutil.Process(corral_pid).children()
                    if WORKER_MARK in " ".join(p.cmdline())]

        # orphans: the workers' escapees exit after 0.5 s; kill the workers so they are
        # adopted first -> reaped by PID 1, quietly, no zombie left
        wait_for(lambda: len(pids_in(c.out(), "escapee")) >= 2, 10, "escapees")
        first = wait_for(lambda: len(host_workers()) == 2 and host_workers(), 10, "2 workers")
        for pid in first:
            os.kill(pid, signal.SIGKILL)
        c.wait_workers(lambda ws: all(w["restarts"] >= 1 for w in ws), "restarted")
        wait_for(lambda: not zombie_children(corral_pid), 10, "no zombie below PID 1")
        assert "Traceback" not in c.err()
        # SIGTERM to PID 1 (from outside the namespace: a handler is installed) stops it
        workers = wait_for(lambda: len(host_workers()) == 2 and host_workers(), 10,
                           "2 new workers")
        os.kill(corral_pid, signal.SIGTERM)
        assert proc.wait(20) == 0
        assert not [p for p in workers if alive(p)]
        assert "stopping every program (SIGTERM)" in c.err()
    finally:
        if proc.poll() is None:
            if corral_pid:
                os.kill(corral_pid, signal.SIGKILL)  # the namespace dies with its PID 1
            proc.kill()
            proc.wait(10)


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit(1)")
def test_running_out_of_fds_for_a_restart_is_a_failed_start(corral: Any) -> None:
    """A restart whose output pipes cannot be made (corral out of fds, here held by idle
    control connections) is a start that failed: logged, backed off, retried. It used to end
    the program's loop: its workers were never restarted again."""
    import socket

    limit = 64
    c: Corral = corral("-n", "2", "--set", "backoff={initial=0.2, cap=0.5}", "--", "sleep",
                       "1000", prefix=["prlimit", f"--nofile={limit}:{limit}"])
    first = c.wait_running(2)
    conns: list[socket.socket] = []
    try:
        def full() -> bool:
            if len(os.listdir(f"/proc/{c.pid}/fd")) >= limit:
                return True
            s = socket.socket(socket.AF_UNIX)
            s.connect(c.socket)  # accepted (an fd of corral's) while it has room
            conns.append(s)
            return False

        wait_for(full, 20, f"corral to hold {limit} fds", interval=0.02)
        os.kill(first[0]["pid"], signal.SIGKILL)
        c.wait_err("could not start a process", timeout=20)
    finally:
        for s in conns:
            s.close()
    ws = c.wait_workers(lambda ws: len(ws) == 2 and all(w["state"] == "running" and w["pid"]
                                                         for w in ws),
                        "worker 0 restarted once fds were free", timeout=30)
    assert ws[0]["pid"] != first[0]["pid"] and ws[1]["pid"] == first[1]["pid"]
    assert "loop failed" not in c.err()
