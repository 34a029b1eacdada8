"""Targets for test_start_template.py (module-level: the tests patch nothing in them)."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import corral

# Set by the test before the pool's start(): a worker must see the value of that moment.
STATE = "import"


def _dump_memfds() -> list[list[Any]]:
    out: list[list[Any]] = []
    for fd in os.listdir("/proc/self/fd"):
        try:  # (the listing's own fd is gone by now)
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith("/memfd:corral-dump"):
                out.append([link, os.stat(f"/proc/self/fd/{fd}").st_ino])
        except OSError:
            pass
    return out


def report(index: int, outdir: str, code: int = -1) -> None:
    """Writes who it is and what it inherited to outdir/worker-<index>.json, then beats (or,
    with ``code`` >= 0, exits with it once the test has read the report)."""
    from corral import _template

    libc = ctypes.CDLL(None, use_errno=True)
    sig = ctypes.c_int(0)
    libc.prctl(2, ctypes.byref(sig), 0, 0, 0)  # PR_GET_PDEATHSIG
    data = {"index": index, "pid": os.getpid(), "ppid": os.getppid(), "pgid": os.getpgid(0),
            "pdeathsig": sig.value, "state": STATE,
            # glibc's view of this thread matches the kernel's: its thread id and a robust
            # list of its own (what glibc's fork() sets up, and the clone must have too).
            "glibc": _template._probe()[0],
            "threads": threading.active_count(),
            "fds": sorted(os.listdir("/proc/self/fd")),
            # corral's stack-dump memfds held: (its name, its inode); exactly this worker's.
            "dumps": _dump_memfds(),
            "blocked": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, ())),
            # As multiprocessing leaves it in a fork child: /dev/null, open, at EOF.
            "stdin": [getattr(sys.stdin, "name", None), sys.stdin.closed,
                      os.path.realpath(f"/proc/self/fd/{sys.stdin.fileno()}"),
                      sys.stdin.read()] if sys.stdin is not None else None}
    path = Path(outdir) / f"worker-{index}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.rename(path)
    if code >= 0:
        go = Path(outdir) / "go"
        while not go.exists():  # the test reads the report first, then lets it exit
            time.sleep(0.01)
        os._exit(code)
    corral.ready()
    while True:
        corral.beat()
        time.sleep(0.05)


def hang_in_template_worker() -> None:
    """Where worker ``who`` of :func:`hangs` stops beating (named in its stack dump)."""
    while True:
        time.sleep(0.05)


def hangs(index: int, outdir: str, who: int) -> None:
    """Beats; worker ``who`` stops beating once it has written outdir/hanging-<pid>."""
    corral.ready()
    corral.beat()
    if index == who:
        (Path(outdir) / f"hanging-{os.getpid()}").write_text("")
        hang_in_template_worker()
    while True:
        corral.beat()
        time.sleep(0.05)


def inner_stdin(index: int, outdir: str) -> None:
    """The worker of a pool started inside a template's worker: its stdin."""
    std = sys.stdin
    data = ([os.path.realpath(f"/proc/self/fd/{std.fileno()}"), std.closed]
            if std is not None and not std.closed else [None, True])
    # Written whole, then renamed: the test reads it as soon as it exists.
    tmp = Path(outdir) / ".inner.json"
    tmp.write_text(json.dumps({"pid": os.getpid(), "stdin": data}))
    tmp.rename(Path(outdir) / "inner.json")
    while True:
        time.sleep(0.05)


def nested(index: int, outdir: str) -> None:
    """Worker 0 closes its stdin, then runs a pool of its own (one fork worker)."""
    if index == 0:
        sys.stdin.close()
        inner = corral.Supervisor(inner_stdin, workers=1, start_method="fork",
                                  args=lambda i: (outdir,), stop_timeout=1.0).start()
        try:
            while True:
                time.sleep(0.05)
        finally:
            inner.stop()
    while True:
        time.sleep(0.05)


def fd0(index: int, outdir: str) -> None:
    """Writes where its fd 0 points to outdir/fd0-<pid>, then sleeps."""
    tmp = Path(outdir) / f".fd0-{os.getpid()}"
    tmp.write_text(os.readlink("/proc/self/fd/0"))
    tmp.rename(Path(outdir) / f"fd0-{os.getpid()}")
    while True:
        time.sleep(0.05)


def ends(index: int, outdir: str) -> None:
    """Reports what multiprocessing says of this process, registers an atexit handler, then
    ends its own way: 0 returns, 1 ``sys.exit(7)``, 2 ``sys.exit("bye")``, 3 raises."""
    import atexit
    import multiprocessing

    out = Path(outdir)
    me, parent = multiprocessing.current_process(), multiprocessing.parent_process()
    facts = {"name": me.name, "pid": me.pid == os.getpid(),
             "parent": parent.pid if parent is not None else None,
             "parent_alive": parent.is_alive() if parent is not None else None,
             "children": len(multiprocessing.active_children())}
    (out / f"mp-{index}.json").write_text(json.dumps(facts))
    atexit.register(lambda: (out / f"atexit-{index}").write_text(""))
    # What multiprocessing writes to stderr as the process ends goes to this file.
    sys.stderr = open(out / f"stderr-{index}", "w")  # noqa: SIM115
    if index == 1:
        sys.exit(7)
    if index == 2:
        sys.exit("bye")
    if index == 3:
        raise ValueError("a worker's own error")


def exits_huge(index: int, outdir: str) -> None:
    """Records that it ran as ``index`` (one file per process); worker 1 then calls
    ``sys.exit(2**40)``, an exit code ``os._exit`` cannot take; the others sleep."""
    (Path(outdir) / f"ran-{index}-{os.getpid()}").write_text("")
    if index == 1:
        sys.exit(2**40)
    while True:
        time.sleep(0.05)
