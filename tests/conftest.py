"""Shared test helpers: waiting on conditions with a deadline, and leak checks by pid."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import psutil
import pytest

T = TypeVar("T")

START_METHODS = ("fork", "spawn", "forkserver")


def wait_for(condition: Callable[[], T], timeout: float = 10.0, what: str = "condition",
             interval: float = 0.005) -> T:
    """Return the first truthy value of ``condition()``; fail the test after ``timeout`` s.

    A generous deadline for a real condition, never a fixed sleep.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _helper_processes() -> set[int]:
    """multiprocessing's forkserver and resource tracker, and corral's keeper (one per
    supervising process, see corral._keeper): long-lived helpers, not leaks."""
    out = set()
    for child in psutil.Process().children(recursive=False):
        try:
            cmd = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "forkserver" in cmd or "resource_tracker" in cmd or "corral-keeper" in cmd:
            out.add(child.pid)
    return out


def descendants() -> dict[int, psutil.Process]:
    """Every process below this one, except multiprocessing's own helpers."""
    helpers = _helper_processes()
    return {p.pid: p for p in psutil.Process().children(recursive=True) if p.pid not in helpers}


def kill_pids(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


@pytest.fixture
def no_leaks() -> Iterator[set[int]]:
    """Fail if the test leaves a process or an fd behind; kill leftovers by pid either way.

    Tests add the pids of everything they started (workers, grandchildren) to the yielded set;
    those are killed at the end even when the test fails. Descendants of this process that
    appeared during the test (other than multiprocessing's helpers) count as leaks too.
    """
    before_children = set(descendants())
    before_fds = len(os.listdir("/proc/self/fd"))
    started: set[int] = set()
    yield started
    leaked = {pid for pid in set(descendants()) - before_children
              if pid_alive(pid)} | {pid for pid in started if pid_alive(pid)}
    kill_pids(leaked | started)
    zombies = [p for p in descendants().values()
               if p.pid not in before_children and _is_zombie(p)]
    assert not leaked, f"processes left alive: {sorted(leaked)}"
    assert not zombies, f"zombies left: {[p.pid for p in zombies]}"
    # fds may lag by a few (multiprocessing's helpers open theirs lazily): allow a small slack.
    after_fds = wait_for_fds(before_fds)
    assert after_fds <= before_fds + 3, f"fd leak: {before_fds} -> {after_fds}"


def _is_zombie(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_for_fds(baseline: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        n = len(os.listdir("/proc/self/fd"))
        if n <= baseline + 3 or time.monotonic() > deadline:
            return n
        time.sleep(0.01)


@pytest.fixture(params=["plain", "writer"])
def loop(request: pytest.FixtureRequest) -> Iterator[object]:
    """A selectors-based corral._loop.Loop, with and without the optional add_writer."""
    from selector_loop import SelectorLoop, SelectorWriterLoop

    lp = SelectorLoop() if request.param == "plain" else SelectorWriterLoop()
    yield lp
    lp.close()
