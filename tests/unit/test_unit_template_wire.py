"""The start template's pieces that need no fork: closing its pipes made ahead, reading its
reports (real socketpairs and pipes), and the signal handlers a fork child must reset."""

from __future__ import annotations

import os
import signal
import socket
import struct
from collections.abc import Iterator

import pytest

from corral import _template
from corral._bootstrap import _RESET_TO_DEFAULT, signals_to_reset

pytestmark = pytest.mark.timeout(30)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_runs_close_every_fd_of_the_set_but_those_kept() -> None:
    fds = [fd for _ in range(6) for fd in os.pipe()]
    outsider = os.dup(0)  # not in the set: never closed, even if numbered in between
    try:
        keep = (fds[3], fds[8])
        _template._Runs(fds).close_all(keep=keep)
        assert [fd for fd in fds if _is_open(fd)] == sorted(keep)
        assert _is_open(outsider)
        _template._Runs(keep).close_all()
        assert not any(_is_open(fd) for fd in fds)
    finally:
        os.close(outsider)
        for fd in fds:
            if _is_open(fd):
                os.close(fd)


def test_runs_with_gaps_in_the_numbers_leave_the_gaps_alone() -> None:
    a = os.pipe()
    gap = os.pipe()
    b = os.pipe()
    try:
        _template._Runs([*a, *b]).close_all()
        assert not any(_is_open(fd) for fd in (*a, *b))
        assert all(_is_open(fd) for fd in gap)
    finally:
        for fd in gap:
            os.close(fd)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        yield ours, theirs


def _report(sock: socket.socket, chunk: int, workers: list[tuple[int, int]],
            fds: list[int]) -> None:
    socket.send_fds(sock, [_template._MSG.pack(_template._WORKERS, chunk, len(workers)),
                           struct.pack(f"={2 * len(workers)}i",
                                       *(v for w in workers for v in w))], fds)


def _open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def test_receive_takes_the_reports_of_every_chunk(
        pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    pipes = [os.pipe() for _ in range(3)]
    try:
        _report(theirs, 0, [(1, 101), (2, 102)], [*pipes[0], *pipes[1]])
        theirs.send(_template._MSG.pack(_template._END, 0, 0))
        _report(theirs, 1, [(3, 103)], list(pipes[2]))
        theirs.send(_template._MSG.pack(_template._END, 1, 11))  # EAGAIN after one fork
        started: dict[int, tuple[int, int, int]] = {}
        ended: dict[int, int] = {}
        assert _template._receive(ours, 4, 2, started, ended) is None
        assert sorted((i, pid) for i, (pid, _, _) in started.items()) == [
            (1, 101), (2, 102), (3, 103)]
        assert ended == {0: 0, 1: 11}
        for _, r, w in started.values():
            os.close(r)
            os.close(w)
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


@pytest.mark.parametrize("bad", ["index 0 (the template's own)", "index out of range",
                                 "the same index twice", "fds missing", "unknown chunk"])
def test_receive_rejects_a_malformed_report_and_closes_its_fds(
        pair: tuple[socket.socket, socket.socket], bad: str) -> None:
    ours, theirs = pair
    pipes = [os.pipe() for _ in range(2)]
    workers = [(1, 101), (2, 102)]
    fds = [*pipes[0], *pipes[1]]
    chunk = 0
    if bad.startswith("index 0"):
        workers[0] = (0, 101)
    elif bad == "index out of range":
        workers[1] = (9, 102)
    elif bad == "the same index twice":
        workers[1] = (1, 102)
    elif bad == "fds missing":
        fds = fds[:2]
    else:
        chunk = 5
    try:
        before = _open_fds()
        _report(theirs, chunk, workers, fds)
        started: dict[int, tuple[int, int, int]] = {}
        assert _template._receive(ours, 4, 1, started, {}) == (
            "a malformed message from the template")
        assert started == {}
        assert _open_fds() == before  # the received copies were closed
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


def test_receive_says_when_the_template_ends_early(
        pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    theirs.close()
    assert _template._receive(ours, 4, 1, {}, {}) == "the template ended early"


def test_signals_to_reset_names_every_handler_that_is_not_the_default() -> None:
    # Every signal it looks at, from the defaults (a shell's background job starts with SIGINT
    # and SIGQUIT ignored, say), and put back as found.
    saved = {sig: signal.getsignal(sig) for sig in (*_RESET_TO_DEFAULT, signal.SIGINT)}
    try:
        for sig in saved:
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        assert signals_to_reset() == ()
        signal.signal(signal.SIGTERM, lambda *_: None)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        assert signals_to_reset() == (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
