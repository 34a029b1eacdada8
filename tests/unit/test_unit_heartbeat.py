"""The heartbeat table and the worker-side calls, in one process (the table is just an mmap)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

import corral
from corral import heartbeat as hb
from corral.heartbeat import HeartbeatTable, SlotReading

pytestmark = pytest.mark.timeout(10)


class FakeClock:
    """Stands in for time.monotonic in the worker-side calls."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def table() -> Iterator[HeartbeatTable]:
    t = HeartbeatTable(4)
    try:
        yield t
    finally:
        t.close()


@pytest.fixture
def worker(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeClock]:
    """Lets a test attach this process as a worker; restores heartbeat's globals afterwards."""
    saved = (hb._view, hb._base, hb._wake_fd, hb._first_beat_pending)
    assert saved[0] is None, "another test left the heartbeat module attached"
    clock = FakeClock()
    monkeypatch.setattr(hb, "_monotonic", clock)
    try:
        yield clock
    finally:
        view, wake_fd = hb._view, hb._wake_fd
        hb._view, hb._base, hb._wake_fd, hb._first_beat_pending = saved
        if view is not None and view is not saved[0]:
            mm = view.obj
            view.release()
            mm.close()
        if wake_fd >= 0 and wake_fd != saved[2]:
            os.close(wake_fd)


def _pipe() -> tuple[int, int, str]:
    r, w = os.pipe()
    os.set_blocking(r, False)
    return r, w, f"/proc/self/fd/{w}"


def _drain(fd: int) -> bytes:
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


# --- outside a worker ---------------------------------------------------------------------------


def test_worker_calls_do_nothing_outside_a_worker() -> None:
    assert hb._view is None
    assert hb.beat() is False
    assert hb.ready() is False
    assert hb.set_status("loading") is False
    assert hb.in_worker() is False
    # The public re-exports are the same functions.
    assert corral.beat() is False
    assert corral.ready() is False
    assert corral.set_status("x") is False
    assert corral.in_worker() is False


# --- the table ----------------------------------------------------------------------------------


def test_new_table_is_empty_and_unlinked(table: HeartbeatTable) -> None:
    for i in range(8):  # at least 8 slots, whatever the capacity asked for
        r = table.read(i)
        assert (r.last_beat, r.ready_at, r.pid, r.status) == (0.0, 0.0, 0, "")
        assert table.last_beat(i) == 0.0
        assert table.ready_at(i) == 0.0
    assert os.path.exists(table.path)
    assert os.stat(table.path).st_nlink == 0  # nothing to clean up in /dev/shm
    assert os.stat(table.path).st_size >= 8 * hb._SLOT


def test_reset_clears_a_slot(table: HeartbeatTable, worker: FakeClock) -> None:
    hb._attach(table.path, 2, dump_fd=9)
    hb.ready()
    hb.set_status("busy")
    before = table.read(2)
    assert before.last_beat == 100.0 and before.ready_at == 100.0
    assert before.pid == os.getpid() and before.dump_fd == 9 and before.status == "busy"
    table.reset(2)
    assert table.read(2) == SlotReading(last_beat=0.0, ready_at=0.0, pid=0, dump_fd=-1, status="")


def test_reset_touches_only_its_slot(table: HeartbeatTable, worker: FakeClock) -> None:
    hb._attach(table.path, 1)
    hb.ready()
    hb.set_status("one")
    table.reset(0)
    table.reset(2)
    r = table.read(1)
    assert (r.last_beat, r.ready_at, r.status) == (100.0, 100.0, "one")


def test_reset_beyond_capacity_grows(table: HeartbeatTable) -> None:
    table.reset(40)
    assert table.read(40) == SlotReading(0.0, 0.0, 0, -1, "")
    assert os.stat(table.path).st_size >= 41 * hb._SLOT


def test_ensure_grows_and_keeps_old_slots(table: HeartbeatTable, worker: FakeClock) -> None:
    size = os.stat(table.path).st_size
    table.ensure(1)  # smaller: nothing happens
    table.ensure(8)
    assert os.stat(table.path).st_size == size
    hb._attach(table.path, 3)
    worker.now = 123.5
    hb.ready()
    hb.set_status("kept")
    table.ensure(9)
    assert os.stat(table.path).st_size >= 16 * hb._SLOT  # grows at least twofold
    table.ensure(1000)
    r = table.read(3)
    assert (r.last_beat, r.ready_at, r.pid, r.status) == (123.5, 123.5, os.getpid(), "kept")
    assert table.read(999).last_beat == 0.0
    # The worker's older, smaller mapping still writes into the same file.
    worker.now = 130.0
    assert hb.beat()
    hb.set_status("after grow")
    assert table.last_beat(3) == 130.0
    assert table.read(3).status == "after grow"


def test_close_releases_the_fd() -> None:
    t = HeartbeatTable(1)
    path = t.path
    assert os.path.exists(path)
    t.close()
    assert not os.path.exists(path)
    t.close()  # twice is fine


# --- worker side --------------------------------------------------------------------------------


def test_attach_marks_slot_and_in_worker(table: HeartbeatTable, worker: FakeClock) -> None:
    table.reset(5)
    hb._attach(table.path, 5, dump_fd=17)
    assert hb.in_worker()
    r = table.read(5)
    assert r.pid == os.getpid()
    assert r.dump_fd == 17
    assert r.last_beat == 0.0 and r.ready_at == 0.0  # attaching is not a beat


def test_beat_writes_the_clock(table: HeartbeatTable, worker: FakeClock) -> None:
    hb._attach(table.path, 0)
    assert hb.beat() is True
    assert table.last_beat(0) == 100.0
    worker.now = 250.25
    assert hb.beat() is True
    assert table.last_beat(0) == 250.25
    assert table.ready_at(0) == 0.0  # a beat alone is not readiness
    assert table.last_beat(1) == 0.0


def test_ready_sets_ready_at_once_and_beats(table: HeartbeatTable, worker: FakeClock) -> None:
    hb._attach(table.path, 1)
    assert hb.ready() is True
    assert table.ready_at(1) == 100.0
    assert table.last_beat(1) == 100.0
    worker.now = 200.0
    assert hb.ready() is True
    assert table.ready_at(1) == 100.0  # the first readiness is kept
    assert table.last_beat(1) == 200.0


def test_set_status_round_trip(table: HeartbeatTable, worker: FakeClock) -> None:
    hb._attach(table.path, 2)
    assert hb.set_status("loading model") is True
    assert table.read(2).status == "loading model"
    assert hb.set_status("ok") is True  # shorter text replaces, no leftovers
    assert table.read(2).status == "ok"
    assert hb.set_status("") is True
    assert table.read(2).status == ""
    assert hb.set_status("naïve ✓ 模型") is True
    assert table.read(2).status == "naïve ✓ 模型"
    assert table.read(1).status == "" and table.read(3).status == ""
    # The sequence number is even once a write is complete.
    assert int(hb._view[hb._base + 3]) % 2 == 0
    assert table.read(2).last_beat == 0.0  # a status is not a beat


def test_set_status_truncates_long_text(table: HeartbeatTable, worker: FakeClock) -> None:
    table.reset(1)
    hb._attach(table.path, 0)
    hb.set_status("x" * 1000)
    assert table.read(0).status == "x" * hb._TEXT_MAX
    hb.set_status("y" * hb._TEXT_MAX)
    assert table.read(0).status == "y" * hb._TEXT_MAX
    # The text area must not spill into the next slot.
    assert table.read(1) == SlotReading(0.0, 0.0, 0, -1, "")


def test_set_status_truncates_at_a_character_boundary(table: HeartbeatTable,
                                                      worker: FakeClock) -> None:
    hb._attach(table.path, 0)
    text = "a" + "é" * 200  # 1 + 400 bytes: the byte limit falls inside an "é"
    hb.set_status(text)
    assert table.read(0).status == "a" + "é" * ((hb._TEXT_MAX - 1) // 2)


def test_read_gives_up_on_a_status_being_written(table: HeartbeatTable,
                                                 worker: FakeClock) -> None:
    hb._attach(table.path, 0)
    hb.set_status("stable")
    view: Any = hb._view
    view[hb._base + 3] += 1  # odd: a writer is mid-way
    assert table.read(0).status == ""  # never a torn text
    view[hb._base + 3] += 1
    assert table.read(0).status == "stable"


def test_ready_wakes_the_supervisor_once(table: HeartbeatTable, worker: FakeClock) -> None:
    r, w, path = _pipe()
    try:
        hb._attach(table.path, 0, wake_path=path)
        assert hb._wake_fd >= 0
        hb.beat()
        assert _drain(r) == b""  # ready_when != "beat": a beat wakes nobody
        hb.ready()
        assert _drain(r) == b"r"
        hb.ready()
        hb.beat()
        assert _drain(r) == b""
    finally:
        os.close(r)
        os.close(w)


def test_first_beat_wakes_when_ready_on_beat(table: HeartbeatTable, worker: FakeClock) -> None:
    r, w, path = _pipe()
    try:
        hb._attach(table.path, 0, wake_path=path, ready_on_beat=True)
        assert hb._first_beat_pending
        assert _drain(r) == b""
        hb.beat()
        assert _drain(r) == b"r"
        assert not hb._first_beat_pending
        worker.now = 101.0
        hb.beat()
        hb.beat()
        assert _drain(r) == b""
        assert table.last_beat(0) == 101.0
    finally:
        os.close(r)
        os.close(w)


def test_full_wake_pipe_is_not_an_error(table: HeartbeatTable, worker: FakeClock) -> None:
    r, w, path = _pipe()
    try:
        os.set_blocking(w, False)
        with pytest.raises(BlockingIOError):
            while True:
                os.write(w, b"x" * 65536)
        hb._attach(table.path, 0, wake_path=path)
        assert hb.ready() is True  # the supervisor is awake anyway
        assert table.ready_at(0) == 100.0
    finally:
        os.close(r)
        os.close(w)


def test_missing_wake_path_is_tolerated(table: HeartbeatTable, worker: FakeClock,
                                        tmp_path: Any) -> None:
    hb._attach(table.path, 0, wake_path=str(tmp_path / "does-not-exist"))
    assert hb._wake_fd == -1
    assert hb.ready() is True
    assert table.ready_at(0) == 100.0


def test_all_beats_matches_last_beat(table: HeartbeatTable, worker: FakeClock) -> None:
    table.ensure(20)
    hb._attach(table.path, 13)
    worker.now = 321.0
    hb.beat()
    beats = table.all_beats()
    assert len(beats) * hb._SLOT == os.stat(table.path).st_size  # one per slot
    assert beats == [table.last_beat(i) for i in range(len(beats))]
    assert beats[13] == 321.0
    assert sum(1 for b in beats if b) == 1


def test_beats_from_any_thread_copies_and_survives_close() -> None:
    from corral.heartbeat import HeartbeatTable

    table = HeartbeatTable(4)
    try:
        table.mark(2, 123.5)
        assert table.beats_from_any_thread() == table.all_beats()
        assert table.beats_from_any_thread()[2] == 123.5  # type: ignore[index]
        table.ensure(64)  # resized by its owner: a reader still gets a consistent copy
        assert table.beats_from_any_thread()[2] == 123.5  # type: ignore[index]
    finally:
        table.close()
    assert table.beats_from_any_thread() is None
