"""Worker targets for the hardening tests (issue 9): module level, so every start method can
import them. Coordination with the test goes through files in a per-test directory."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import corral


def _forever() -> None:
    while True:
        time.sleep(3600)


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.rename(path)


MARKER = Path(__file__).resolve().parent / "_term_marker.py"


def _start_marker(index: int, flagdir: str, block: bool = False) -> None:
    """Start a grandchild in the worker's group (as a view starting a subprocess would); report
    its pid once it is set up (with ``block``: once it blocks SIGTERM)."""
    child = subprocess.Popen([sys.executable, str(MARKER), flagdir, *(["block"] if block else [])])
    ready = Path(flagdir) / f"ready-{child.pid}"
    while not ready.exists():
        time.sleep(0.005)  # the grandchild is booting; bounded by the test's timeout
    _write(Path(flagdir) / f"gc-{index}-{os.getpid()}", str(child.pid))


def with_sleep_child(index: int, flagdir: str, block: bool = False) -> None:
    _start_marker(index, flagdir, block)
    corral.ready()
    _forever()


def kills_its_supervisor_at_once(index: int, flagdir: str) -> None:
    """Worker 1 starts a grandchild in its group first thing, reports it, and SIGKILLs the
    supervisor: its start (a fork, its report) may not have been taken in yet."""
    if index == 1:
        child = subprocess.Popen(["sleep", "600"])
        _write(Path(flagdir) / f"gc-{index}-{os.getpid()}", f"{child.pid} {os.getpid()}")
        os.kill(os.getppid(), signal.SIGKILL)
    _forever()


def kills_its_supervisor_holding_the_gil(index: int, flagdir: str, supervisor: int) -> None:
    """Start a grandchild in our group, report it, SIGKILL the supervisor, then run native code
    that holds the GIL: our watch thread (which kills the group when the supervisor dies)
    cannot run, and the parent-death signal ends this worker alone."""
    child = subprocess.Popen(["sleep", "600"])
    _write(Path(flagdir) / f"gc-{index}-{os.getpid()}", f"{child.pid} {os.getpid()}")
    os.kill(supervisor, signal.SIGKILL)
    sum(range(10**10))
    _forever()


def takes_every_pid(index: int, flagdir: str) -> None:
    """Worker 0 forks until the pids limit refuses (its children hold their pids 3 s), reports
    it, then ends (a restart once the pids are free); the others beat, ready only once the
    pids are full (ready_when="ready"): the pool's first health check, and the first thread
    it needs, come while no thread can be started, however fast the start was."""
    here = Path(flagdir)
    if index == 0:
        while not (here / "up-1").exists():  # worker 1 has its process (and its pid) first
            time.sleep(0.01)
        n = 0
        with contextlib.suppress(OSError):
            while True:
                if os.fork() == 0:
                    time.sleep(3)
                    os._exit(0)
                n += 1
        _write(Path(flagdir) / f"full-{os.getpid()}", str(n))
        time.sleep(3)
        sys.exit(0)
    _write(here / f"up-{index}", str(os.getpid()))
    while not any(p.name.startswith("full-") and not p.name.endswith(".tmp")
                  for p in here.iterdir()):
        time.sleep(0.01)
    corral.ready()
    while True:
        corral.beat()
        time.sleep(0.1)


def ready_unless_broken(index: int, flagdir: str) -> None:
    """A new deploy gone wrong: once ``flagdir/broken`` exists, a new process exits with 1
    0.2 s after its start, never ready; before, ready at once."""
    if (Path(flagdir) / "broken").exists():
        time.sleep(0.2)
        sys.exit(1)
    corral.ready()
    _forever()


def duck_with_sleep_child(idx: int, flagdir: str) -> None:
    """The same for WorkerProcessManager (worker_fn(idx, *args))."""
    _start_marker(idx, flagdir)
    _forever()


def blocks_sigterm(index: int, flagdir: str) -> None:
    """Block SIGTERM in the main thread (a sigwait-style drain would); report once blocked."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    _write(Path(flagdir) / f"blocked-{index}-{os.getpid()}", "1")
    corral.ready()
    _forever()


def reports_fds(index: int, flagdir: str) -> None:
    """Report how many fds this worker holds, then wait."""
    names = os.listdir("/proc/self/fd")
    _write(Path(flagdir) / f"fds-{index}", str(len(names)))
    targets = []
    for name in names:
        with contextlib.suppress(OSError):  # the listing's own fd is gone already
            targets.append(os.readlink(f"/proc/self/fd/{name}"))
    _write(Path(flagdir) / f"fdnames-{index}", "\n".join(targets))
    corral.ready()
    _forever()


def hijacks_dump_fd(index: int, flagdir: str) -> None:
    """Put a file of its own on corral's dump fd number, then stop beating (hung)."""
    dump_fd = -1
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("/memfd:corral-dump"):
                dump_fd = int(name)
        except OSError:
            continue
    user_file = Path(flagdir) / f"user-{index}.txt"
    user_file.write_text("user data\n")
    fd = os.open(user_file, os.O_RDWR | os.O_APPEND)
    if dump_fd >= 0:
        os.dup2(fd, dump_fd)
    _write(Path(flagdir) / f"hijacked-{index}-{os.getpid()}", str(dump_fd))
    corral.beat()
    _forever()  # no more beats: hung


def swaps_files_in_during_the_dump(index: int, flagdir: str) -> None:
    """Beat once, then hang; a thread waits for the dump to begin (its memfd grows), then
    closes every fd and opens a file of its own again and again: the dump's number now names
    the user's file while the supervisor is still collecting."""
    dump_fd = -1
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("/memfd:corral-dump"):
                dump_fd = int(name)
        except OSError:
            continue
    user_file = Path(flagdir) / f"user-{index}.txt"
    user_file.write_text("USERDATA secret\n")

    def swap() -> None:
        while os.fstat(dump_fd).st_size == 0:
            pass
        os.closerange(3, dump_fd + 8)
        for _ in range(dump_fd + 8):
            os.open(user_file, os.O_RDONLY)

    threading.Thread(target=swap, daemon=True).start()
    _write(Path(flagdir) / f"armed-{index}-{os.getpid()}", str(dump_fd))
    corral.beat()
    _forever()  # no more beats: hung


def ignores_sigterm_and_leaks(index: int, flagdir: str, chunk: int) -> None:
    """Ignore SIGTERM and grow by ``chunk`` bytes every 50 ms, without bound."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    hoard: list[bytes] = []
    _write(Path(flagdir) / f"leaker-{index}-{os.getpid()}", "1")
    corral.ready()
    while True:
        hoard.append(os.urandom(16) * (chunk // 16))
        time.sleep(0.05)


def ignores_sigterm_and_jumps(index: int, flagdir: str, size: int) -> None:
    """Ignore SIGTERM, be ready, then take ``size`` bytes at once and hold them (the first
    worker only, the one that creates the flag file: its replacements stay small)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    corral.ready()
    try:
        os.close(os.open(Path(flagdir) / "jumped", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        _forever()
    hoard = os.urandom(16) * (size // 16)
    while hoard:
        time.sleep(3600)


def exits_on_sigterm(index: int) -> None:
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    corral.ready()
    _forever()


def crash_at_once_duck(idx: int, *args: Any) -> None:
    os._exit(3)


def sleep_duck(idx: int, *args: Any) -> None:
    _forever()


def ignores_sigterm_duck(idx: int, *args: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _forever()


def prints_then_sleeps_duck(idx: int, flagdir: str) -> None:
    """Print a line (through whatever the program made of sys.stdout), then say so."""
    print(f"worker {idx} (pid {os.getpid()}) serving", flush=True)
    _write(Path(flagdir) / f"printed-{os.getpid()}", "1")
    _forever()


def task_with_sleep_child(flagdir: str) -> None:
    """A pool task that starts a grandchild in its worker's group, reports it, then runs on."""
    _start_marker(os.getpid(), flagdir)
    _forever()


def task_fd_count(hold: float) -> int:
    """How many fds this pool worker holds (after keeping it busy for ``hold`` s)."""
    time.sleep(hold)  # so that every worker of the pool takes one of these tasks
    return len(os.listdir("/proc/self/fd"))


def task_hijacks_dump_fd(flagdir: str) -> None:
    """Put a file of its own on corral's dump fd number, then run past the task's timeout."""
    dump_fd = -1
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("/memfd:corral-dump"):
                dump_fd = int(name)
        except OSError:
            continue
    user_file = Path(flagdir) / "user-task.txt"
    user_file.write_text("user data\n")
    fd = os.open(user_file, os.O_RDWR | os.O_APPEND)
    if dump_fd >= 0:
        os.dup2(fd, dump_fd)
    _forever()


def reports_signals(index: int, flagdir: str) -> None:
    """Write what the target starts with: the blocked signals and SIGTERM's handler."""
    blocked = sorted(int(sig) for sig in signal.pthread_sigmask(signal.SIG_BLOCK, []))
    default = signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    _write(Path(flagdir) / f"target-{os.getpid()}",
           json.dumps({"blocked": blocked, "sigterm_default": default}))
    corral.ready()
    _forever()
