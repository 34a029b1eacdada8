"""Targets and warm-up hooks for the hot standby tests (module level for every start method)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import corral

MODEL: str | None = None  # what the warm-up builds (inherited by the worker's target)


def warm() -> None:
    global MODEL
    MODEL = f"loaded by {os.getpid()}"


def warm_slowly() -> None:
    time.sleep(2.0)  # a model that takes seconds to load
    warm()


def warm_fails() -> None:
    raise ValueError("the model file is missing")


def report(index: int, flagdir: str) -> None:
    """Write what a worker looks like from inside, then beat until stopped."""
    with open("/proc/self/cmdline", "rb") as fh:
        title = fh.read().replace(b"\0", b" ").decode().strip()
    facts = {
        "pid": os.getpid(), "pgid": os.getpgid(0), "ppid": os.getppid(), "title": title,
        "sigterm": str(signal.getsignal(signal.SIGTERM)),
        "sigint": str(signal.getsignal(signal.SIGINT)),
        "mask": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
        "stdin": os.readlink("/proc/self/fd/0"), "model": MODEL,
        "in_worker": corral.in_worker(),
    }
    path = Path(flagdir) / f"report-{index}-{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(facts))
    tmp.rename(path)
    corral.ready()
    while True:
        corral.beat()
        time.sleep(0.05)


def first_line(index: int, path: str) -> None:
    """The benchmark's shape: stamp the first line of user code, then sleep."""
    stamp = time.monotonic()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    os.write(fd, f"{index} {os.getpid()} {stamp}\n".encode())
    os.close(fd)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit("not a script")


def warm_own_wait() -> object:
    """A warm-up that waits for the handover itself (what a server's standby does)."""
    from corral._bootstrap import OwnWait

    def wait(conn: object, take: object) -> None:
        global MODEL
        try:
            data = conn.recv_bytes()  # type: ignore[attr-defined]
        except (EOFError, OSError):
            data = b""
        hand = take(data)  # type: ignore[operator]
        if hand is None:
            return  # told to go
        MODEL = f"waited for by {os.getpid()}"
        report(hand.index, *hand.args)

    return OwnWait(wait)


def heavy(index: int, mib: int) -> None:
    """Hold ``mib`` MiB of touched memory (the kernel's exit takes a while to free it), then
    beat until killed."""
    ballast = bytearray(mib << 20)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    corral.ready()
    while True:
        corral.beat()
        time.sleep(0.2)
