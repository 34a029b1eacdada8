"""Hundreds of crash/restart cycles leave nothing behind: no process, zombie, fd or thread."""

from __future__ import annotations

import os
import threading
import time

import psutil
import pytest
import workers
from _helpers import pool

import corral
from corral import EventKind, StopReason
from support import descendants, pid_alive, wait_for

# No delay between restarts, no budget: as many cycles per second as the machine allows.
NO_DELAY = corral.Backoff(initial=0.0, cap=0.0, jitter=0.0, reset_after=0.0)
NO_LIMIT = corral.RestartBudget(max_restarts=None)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _fewest_fds(samples: int = 100) -> int:
    """The fewest fds seen over a fraction of a second: a crash loop has a varying number of
    processes in flight (3 fds each), a leak shows in the fewest as well."""
    fewest = _fds()
    for _ in range(samples):
        time.sleep(0.001)  # spread the samples over the loop's churn
        fewest = min(fewest, _fds())
    return fewest


def _restarts(sup: corral.Supervisor) -> int:
    return sum(s.restarts for s in sup.status())


def _zombies() -> list[int]:
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                out.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _cycle(started: set[int], method: str, cycles: int) -> corral.Supervisor:
    with pool(started, workers.crash_at_once, workers=2, start_method=method, backoff=NO_DELAY,
              budget=NO_LIMIT) as (sup, log):
        # fds while it runs must not grow with the number of cycles (only the few processes
        # in flight hold any).
        wait_for(lambda: _restarts(sup) >= cycles // 4, 60, f"{cycles // 4} restarts")
        early = _fewest_fds()
        wait_for(lambda: _restarts(sup) >= cycles, 120, f"{cycles} restarts")
        late = _fewest_fds()
        # A few processes may be in flight at every sample on a loaded machine (3 fds each);
        # a leak per cycle, or per ten, would add tens to hundreds over these cycles.
        assert late <= early + 12, f"fds grew while cycling: {early} -> {late}"
    exits = log.of(EventKind.EXITED)
    assert len(exits) >= cycles
    for event in exits:
        assert event.exit is not None
        if event.exit.reason is not StopReason.SHUTDOWN:  # the last ones may be stopped
            assert event.exit.reason is StopReason.EXITED
            assert event.exit.exit is not None and event.exit.exit.code == 1
    return sup


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("method", "cycles"), [("fork", 200), ("forkserver", 60)])
def test_crash_cycles_leave_nothing(method: str, cycles: int, no_leaks: set[int]) -> None:
    # Warm up: multiprocessing opens some things lazily on first use (forkserver, its pipes);
    # those belong to the baseline, not to the cycles.
    _cycle(no_leaks, method, 4)
    wait_for(lambda: not _zombies(), 10, "no zombie after the warm-up")
    fds, threads = _fds(), threading.active_count()
    children = set(descendants())

    sup = _cycle(no_leaks, method, cycles)

    assert not sup.running
    assert not _zombies(), "zombies after stop()"
    assert not [p for p in set(descendants()) - children if pid_alive(p)]
    wait_for(lambda: threading.active_count() <= threads, 10,
             f"the thread count back at {threads} (is {threading.active_count()})")
    wait_for(lambda: _fds() <= fds, 5, f"the fd count back at {fds} (is {_fds()})")
