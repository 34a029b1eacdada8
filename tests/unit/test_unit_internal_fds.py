"""close_internal_fds: what a fork-started worker closes of the supervisor's own fds.

A real fork: the child closes, then reports which of the fds are still open.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from corral import process
from corral.process import close_internal_fds, disown_fd, own_fd


def _open_in_child(fds: list[int], keep: tuple[int, ...] = ()) -> list[int]:
    """Fork; the child runs close_internal_fds(keep) and reports which of ``fds`` are open."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            close_internal_fds(keep=keep)
            still = []
            for fd in fds:
                try:
                    os.fstat(fd)
                    still.append(fd)
                except OSError:
                    pass
            os.write(w, json.dumps(still).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    result: list[int] = json.loads(data)
    return result


@pytest.fixture
def registry() -> Iterator[list[int]]:
    """Fds opened by a test: disowned and closed after it, whatever happens."""
    saved = dict(process._checked_fds), bytes(process._released_fds)
    opened: list[int] = []
    yield opened
    for fd in opened:
        disown_fd(fd)
        try:
            os.close(fd)
        except OSError:
            pass
    process._checked_fds.clear()
    process._checked_fds.update(saved[0])
    process._released_fds[:] = saved[1]


@pytest.mark.timeout(30)
def test_owner_released_fds_are_closed_in_runs(registry: list[int]) -> None:
    for _ in range(20):
        a, b = os.pipe()
        registry += [a, b]
        own_fd(a, released_by_owner=True)
        own_fd(b, released_by_owner=True)
    user = os.open(os.devnull, os.O_RDONLY)  # not ours: between and after ours, kept
    registry.append(user)
    c, d = os.pipe()
    registry += [c, d]
    own_fd(c, released_by_owner=True)
    own_fd(d, released_by_owner=True)
    assert _open_in_child(registry, keep=(d,)) == [user, d]


@pytest.mark.timeout(30)
def test_a_reused_number_is_kept_when_its_identity_changed(registry: list[int]) -> None:
    a = os.open(os.devnull, os.O_RDONLY)
    registry.append(a)
    own_fd(a)  # with its identity
    os.close(a)  # closed behind the registry's back, then reused by a user's file
    r, w = os.pipe()
    registry += [r, w]
    assert a in (r, w)
    assert sorted(_open_in_child([r, w])) == sorted([r, w])


@pytest.mark.timeout(30)
def test_checked_fds_are_closed(registry: list[int]) -> None:
    a = os.open(os.devnull, os.O_RDONLY)
    registry.append(a)
    own_fd(a)
    assert _open_in_child([a]) == []


@pytest.mark.timeout(30)
def test_a_kept_fd_inside_a_run_stays_open_and_the_child_forgets_the_rest(
        registry: list[int]) -> None:
    fds = []
    for _ in range(3):
        a, b = os.pipe()
        fds += [a, b]
    registry += fds
    for fd in fds:
        own_fd(fd, released_by_owner=True)
    middle = sorted(fds)[2]
    assert _open_in_child(fds, keep=(middle,)) == [middle]
    # The parent's registry is untouched by what a child closed.
    assert all(process._released_fds[fd] == 1 for fd in fds)
    disown_fd(fds[0])
    assert process._released_fds[fds[0]] == 0
