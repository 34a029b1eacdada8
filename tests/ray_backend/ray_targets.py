"""Targets run inside Ray actors by the tests (sent by value: actors cannot import this file)."""

from __future__ import annotations

import os
import time

import corral


def beating(index: int, marker: str = "", interval: float = 0.02) -> None:
    """A cooperative worker: ready, then beats until stopped; its finally block leaves a mark."""
    corral.set_status(f"worker {index} beating")
    corral.ready()
    try:
        while True:
            corral.beat()
            time.sleep(interval)
    finally:
        if marker:
            with open(marker, "w") as fh:
                fh.write(f"cleaned up {os.getpid()}")


def sleeper(index: int) -> None:
    """Uncooperative: ready, then blocked in one long native sleep (a stop request waits)."""
    corral.ready()
    corral.beat()
    time.sleep(600)


def stops_beating(index: int, beats: int = 5) -> None:
    """Beats a few times, then keeps running Python code without beating (a hung loop)."""
    corral.ready()
    for _ in range(beats):
        corral.beat()
        time.sleep(0.02)
    while True:
        time.sleep(0.05)  # short sleeps: a stop request lands here


def raises(index: int) -> None:
    def inner() -> None:
        raise ValueError(f"worker {index} failed on purpose")

    corral.ready()
    inner()


def exits(index: int, code: int) -> None:
    raise SystemExit(code)


def returns(index: int) -> None:
    corral.beat()


def env_status(index: int, name: str) -> None:
    corral.set_status(os.environ.get(name, "<unset>"))
    corral.ready()
    while True:
        corral.beat()
        time.sleep(0.05)



def crashes(index: int, log: str) -> None:
    """Ready at once, then exits with code 1 a moment later; logs its pid, start and end."""
    start = time.time()
    corral.ready()
    time.sleep(0.05)
    with open(log, "a") as fh:
        fh.write(f"{os.getpid()} {start!r} {time.time()!r}\n")
    os._exit(1)


def stops_itself(index: int) -> None:
    """Ready and beating, then SIGSTOPs its own process: no beat, no probe answer."""
    import signal

    corral.ready()
    corral.beat()
    time.sleep(0.2)
    # Stopped for good: once in a full `make test` something outside corral (which sends Ray
    # actors no SIGCONT) continued it 5 ms after the stop, and it returned. Stop again if so.
    while True:
        os.kill(os.getpid(), signal.SIGSTOP)


def grows_once(index: int, flags: str, size: int) -> None:
    """Ready and beating; the first process of each index also holds ``size`` bytes (written,
    so resident) until it is stopped. Its replacements stay small."""
    corral.ready()
    mark = os.path.join(flags, f"grew-{index}")
    hoard: list[bytes] = []  # held by this frame until the process ends
    if not os.path.exists(mark):
        # Whole or not at all: the test reads the pid as soon as the file exists.
        with open(mark + ".tmp", "w") as fh:
            fh.write(str(os.getpid()))
        os.replace(mark + ".tmp", mark)
        hoard.append(b"\x01" * size)
    while True:
        corral.beat()
        time.sleep(0.05)
