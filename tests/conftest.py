"""Fixtures shared by every test: leak checks by pid, an event loop for the IO building blocks.

The helpers themselves live in ``helpers.py`` (import that module, not this one).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# Re-exported for the test modules that still import them from here.
from helpers import (  # noqa: F401
    START_METHODS,
    descendants,
    is_zombie,
    kill_pids,
    pid_alive,
    wait_for,
    wait_for_fds,
)


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
               if p.pid not in before_children and is_zombie(p)]
    assert not leaked, f"processes left alive: {sorted(leaked)}"
    assert not zombies, f"zombies left: {[p.pid for p in zombies]}"
    # fds may lag by a few (multiprocessing's helpers open theirs lazily): allow a small slack.
    after_fds = wait_for_fds(before_fds)
    assert after_fds <= before_fds + 3, f"fd leak: {before_fds} -> {after_fds}"


@pytest.fixture(params=["plain", "writer"])
def loop(request: pytest.FixtureRequest) -> Iterator[object]:
    """A selectors-based corral._loop.Loop, with and without the optional add_writer."""
    from selector_loop import SelectorLoop, SelectorWriterLoop

    lp = SelectorLoop() if request.param == "plain" else SelectorWriterLoop()
    yield lp
    lp.close()
