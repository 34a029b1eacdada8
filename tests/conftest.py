"""pytest fixtures shared by every suite (the helpers they use live in support.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# Old imports of helpers from conftest keep working while tests move to `support`.
from support import (  # noqa: F401
    START_METHODS,
    descendants,
    is_zombie,
    kill_pids,
    pid_alive,
    wait_for,
    wait_for_fds,
)

# pytest-xdist's workers set COLUMNS=80 and LINES=24: the commands the suite runs then render
# for an 80-column terminal (cut cells). Every test sees the environment of a plain run.
for _var in ("COLUMNS", "LINES"):
    os.environ.pop(_var, None)


@pytest.fixture
def no_leaks() -> Iterator[set[int]]:
    """Fail if the test leaves a process or an fd behind; kill leftovers by pid either way.

    Tests add the pids of everything they started (workers, grandchildren) to the yielded set;
    those are killed at the end even when the test fails. Descendants of this process that
    appeared during the test (other than multiprocessing's helpers) count as leaks too.
    """
    before_children = set(descendants())
    before_fds = len(os.listdir("/proc/self/fd"))
    server_before = _forkserver_running()
    tracker_before = _tracker_running()
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
    # A forkserver this test started (the first under that method) keeps two fds for the rest
    # of the session: its alive pipe and the resource tracker's; the tracker alone (started by
    # the session's first spawn pool) keeps one.
    slack = 3 + (2 if _forkserver_running() and not server_before else
                 1 if _tracker_running() and not tracker_before else 0)
    assert after_fds <= before_fds + slack, f"fd leak: {before_fds} -> {after_fds}"


def _tracker_running() -> bool:
    from multiprocessing import resource_tracker

    return getattr(resource_tracker._resource_tracker, "_fd", None) is not None


def _forkserver_running() -> bool:
    from multiprocessing import forkserver

    return getattr(forkserver._forkserver, "_forkserver_pid", None) is not None


@pytest.fixture(params=["plain", "writer"])
def loop(request: pytest.FixtureRequest) -> Iterator[object]:
    """A selectors-based corral._loop.Loop, with and without the optional add_writer."""
    from selector_loop import SelectorLoop, SelectorWriterLoop

    lp = SelectorLoop() if request.param == "plain" else SelectorWriterLoop()
    yield lp
    lp.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``-n 2 --dist loadgroup``), every Ray test goes to one worker, in a
    row: the cluster is package-scoped, and one is enough for the 2 cores."""
    ray_group = pytest.mark.xdist_group("ray")
    for item in items:
        if "ray_backend" in item.nodeid.split("/"):
            item.add_marker(ray_group)
