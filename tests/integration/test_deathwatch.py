"""The death watch (corral._deathwatch): a worker's death lock tells of its death as the exit
begins. Real processes holding real robust mutexes in a real heartbeat table."""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import sys
import threading
from collections.abc import Iterator

import pytest

from corral import _robust, heartbeat
from corral._deathwatch import DeathWatch
from corral.heartbeat import HeartbeatTable
from support import wait_for

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not _robust.available(), reason="no robust mutexes or futex_waitv here"),
]


class Watched:
    """A table with death locks, its watch, the notices it gave, the children to clean up."""

    def __init__(self, capacity: int = 4) -> None:
        self.table = HeartbeatTable(capacity, death_locks=True)
        self.notices: queue.Queue[tuple[int, int, bool]] = queue.Queue()
        self.children: list[int] = []
        self.watch = DeathWatch(self.table.fd, "test", self._noticed)
        self.table.on_grow = self.watch.poke

    def _noticed(self, index: int, pid: int) -> None:
        # Checked here, on the watch's thread, before anyone reaps the child: as the monitor does.
        self.notices.put((index, pid, _robust.is_exiting(pid)))

    def start(self, index: int, then_exec: bool = False, main_exits: bool = False,
              exec_thread: bool = False, threads: int = 0) -> int:
        """A child that takes slot ``index`` (its death lock included), then sleeps (or, once
        its lock is armed, execs ``sleep``); returns once it holds the lock."""
        self.table.reset(index)
        r, w = os.pipe()
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            try:
                os.close(r)
                os.close(go_w)
                heartbeat._attach(self.table.path, index)
                ok = heartbeat._held is not None
                os.write(w, b"1" if ok else b"0")
                if then_exec:
                    os.read(go_r, 1)
                    if exec_thread:  # the kernel ends the main thread first, then execs
                        threading.Thread(target=os.execv,
                                         args=("/bin/sleep", ["sleep", "60"])).start()
                        _sleep_forever()
                    os.execv("/bin/sleep", ["sleep", "60"])
                if main_exits:
                    os.read(go_r, 1)
                    # Another thread runs on (and keeps the process alive) after the main
                    # thread ends: the process is not dying.
                    threading.Thread(target=_sleep_forever, daemon=False).start()
                    ctypes.CDLL(None).pthread_exit(None)
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
                for _ in range(threads):
                    threading.Thread(target=_sleep_forever, daemon=True).start()
                while True:
                    signal.pause()
            finally:
                os._exit(1)
        self.children.append(pid)
        os.close(w)
        os.close(go_r)
        with os.fdopen(r, "rb") as f:
            assert f.read(1) == b"1", "the child could not take its death lock"
        try:
            if then_exec or main_exits:
                wait_for(lambda: _held_words(self) == 1, 10, "the lock armed")
                os.write(go_w, b"1")
        finally:
            os.close(go_w)
        return pid

    def next_notice(self, timeout: float = 20.0) -> tuple[int, int, bool]:
        return self.notices.get(timeout=timeout)

    def close(self) -> None:
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        self.watch.close()
        self.table.close()


@pytest.fixture
def watched() -> Iterator[Watched]:
    w = Watched()
    try:
        yield w
    finally:
        w.close()


def test_a_killed_holder_is_told_while_its_exit_has_begun(watched: Watched) -> None:
    pids = [watched.start(i) for i in range(3)]
    wait_for(lambda: _held_words(watched) == 3, 10, "three locks armed")
    os.kill(pids[1], signal.SIGKILL)
    assert watched.next_notice() == (1, pids[1], True)
    assert watched.notices.empty()  # the others are alive: nothing about them


def test_a_killed_holder_with_many_threads_is_told_it_is_exiting(watched: Watched) -> None:
    """Its threads end one by one, and vanish from /proc while the check reads it: a
    thread gone counts as exiting (the early notice is not lost to the race)."""
    for _ in range(5):
        pid = watched.start(0, threads=16)
        wait_for(lambda p=pid: len(os.listdir(f"/proc/{p}/task")) == 17, 10, "its threads")
        wait_for(lambda: _held_words(watched) == 1, 10, "the lock armed")
        os.kill(pid, signal.SIGKILL)
        assert watched.next_notice() == (0, pid, True)
        os.waitpid(pid, 0)
        watched.children.remove(pid)


def test_an_exec_frees_the_lock_but_is_not_a_death(watched: Watched) -> None:
    """The kernel frees robust mutexes at exec too: the notice comes, and the check the
    monitor makes (is_exiting) says the process runs on."""
    pid = watched.start(0, then_exec=True)
    index, noticed, exiting = watched.next_notice()
    assert (index, noticed, exiting) == (0, pid, False)
    wait_for(lambda: _comm(pid) == "sleep", 10, "the exec'd program")
    assert not _robust.is_exiting(pid)


def test_an_exec_from_another_thread_is_not_a_death(watched: Watched) -> None:
    """An exec from a thread other than the main one ends the main thread first (the lock is
    freed, /proc shows the leader exiting) while the exec'ing thread runs on: not a death.
    Repeated: the check races the kernel's exec (before the fix, 9 in 10 were judged deaths)."""
    for _ in range(10):
        pid = watched.start(0, then_exec=True, exec_thread=True)
        index, noticed, exiting = watched.next_notice()
        assert (index, noticed, exiting) == (0, pid, False)
        wait_for(lambda p=pid: _comm(p) == "sleep", 10, "the exec'd program")
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        watched.children.remove(pid)


def test_a_main_thread_that_ends_while_others_run_is_not_a_death(watched: Watched) -> None:
    """The main thread's end frees the lock (and makes /proc show the leader exiting) while
    the process's other threads run on: no handover may follow."""
    pid = watched.start(0, main_exits=True)
    index, noticed, exiting = watched.next_notice()
    assert (index, noticed) == (0, pid)
    assert os.waitpid(pid, os.WNOHANG) == (0, 0)  # it runs on
    assert not exiting


def test_a_new_holder_of_a_reset_slot_is_watched_again(watched: Watched) -> None:
    first = watched.start(2)
    wait_for(lambda: _held_words(watched) == 1, 10, "the lock armed")
    os.kill(first, signal.SIGKILL)
    assert watched.next_notice()[:2] == (2, first)
    os.waitpid(first, 0)
    watched.children.remove(first)
    second = watched.start(2)  # the slot is reset; the new holder wakes the watch itself
    wait_for(lambda: _held_words(watched) == 1, 10, "the new lock armed")
    os.kill(second, signal.SIGTERM)  # blocked: it lives on
    os.kill(second, signal.SIGKILL)
    assert watched.next_notice() == (2, second, True)


def test_a_slot_added_by_growth_is_watched(watched: Watched) -> None:
    watched.table.ensure(40)  # remapped elsewhere: the watch maps the new size on the poke
    pid = watched.start(33)
    wait_for(lambda: _held_words(watched) == 1, 10, "the lock in the new slot armed")
    os.kill(pid, signal.SIGKILL)
    assert watched.next_notice() == (33, pid, True)


def test_close_ends_the_thread_and_keeps_no_fd() -> None:
    before = set(os.listdir("/proc/self/fd"))
    w = Watched()
    try:
        w.start(0)
        wait_for(lambda: _held_words(w) == 1, 10, "the lock armed")
    finally:
        w.close()
    assert not w.watch.alive
    assert not [t for t in threading.enumerate() if t.name == "corral-deathwatch[test]"]
    assert set(os.listdir("/proc/self/fd")) <= before


def test_a_table_without_death_locks_has_no_lock_to_take() -> None:
    table = HeartbeatTable(2)
    try:
        table.reset(0)
        assert not table.death_locks
        assert table.view[0 * heartbeat._DOUBLES + 5] == 0.0  # a worker takes no lock
    finally:
        table.close()


def _held_words(w: Watched) -> int:
    """Slots whose lock is held with the waiters bit set (the watch has armed them)."""
    view = memoryview(w.table._mm).cast("I") if w.table._mm is not None else None
    assert view is not None
    try:
        n = 0
        for i in range(w.table.capacity):
            word = view[(i * heartbeat._SLOT + heartbeat._LOCK_AT) // 4]
            owner = word & _robust.FUTEX_TID_MASK
            if owner and word & _robust.FUTEX_WAITERS and not word & _robust.FUTEX_OWNER_DIED:
                n += 1
        return n
    finally:
        view.release()


def _sleep_forever() -> None:
    while True:
        signal.pause()


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


if sys.platform != "linux":  # pragma: no cover
    pytest.skip("Linux only", allow_module_level=True)
