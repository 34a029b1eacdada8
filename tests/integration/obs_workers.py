"""Worker targets for the observability and asyncio tests (module level: spawn and forkserver
children import them; each takes ``index`` first, as corral calls ``target(index, *args)``)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import corral

BEAT_EVERY = 0.05


def _first_life(flagdir: str, index: int) -> bool:
    """True (and the mark left, atomically) the first time worker ``index`` gets here."""
    flag = Path(flagdir) / f"first-{index}"
    if flag.exists():
        return False
    tmp = flag.with_name(flag.name + ".tmp")
    tmp.write_text(str(os.getpid()))
    tmp.rename(flag)
    return True


def beater(index: int) -> None:
    """Beat steadily until SIGTERM (exit 0)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        corral.beat()
        time.sleep(BEAT_EVERY)


def beat_then_hang(index: int, flagdir: str) -> None:
    """Worker 0, in its first life: beat a few times, then hang in Python (a stack dump can be
    taken). Every other worker, and its replacement: beat steadily."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if index == 0 and _first_life(flagdir, index):
        for _ in range(4):
            corral.beat()
            time.sleep(BEAT_EVERY)
        while True:
            time.sleep(3600)  # the hang: no more beats
    beater(index)


def slow_both_ways(index: int, delay: float) -> None:
    """Take ``delay`` seconds to become ready and ``delay`` seconds to exit on SIGTERM: a pool
    whose start and stop take that long, so an event loop that blocked on either would show
    it."""
    def on_term(*_: object) -> None:
        time.sleep(delay)
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    time.sleep(delay)
    corral.ready()
    while True:
        time.sleep(3600)


def graceful(index: int) -> None:
    """Ready at once; exit 0 on SIGTERM."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    corral.ready()
    while True:
        time.sleep(3600)


def crash(index: int) -> None:
    """Exit 3 at once (a crash loop)."""
    os._exit(3)
