"""Heartbeats and readiness through shared memory: no IPC, no lock, no extra process.

The supervisor owns one shared file (created in /dev/shm and unlinked at once, so nothing is left
behind even if the supervisor is SIGKILLed); a worker maps it through ``/proc/<supervisor>/fd/<n>``
and writes ``time.monotonic()`` stamps into its own slot. CLOCK_MONOTONIC is the same clock in every
process, so the supervisor compares the stamps with its own clock.

Worker side: :func:`beat`, :func:`ready`, :func:`set_status`. Outside a corral worker they do
nothing and return False, so code that calls them also runs unsupervised.
"""

from __future__ import annotations

import errno
import mmap
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

__all__ = ["HeartbeatTable", "LocalSlot", "SlotReading", "beat", "in_worker", "ready", "set_status"]

# One slot per worker index: 8 doubles, the status text, then the death lock.
#   [0] last beat (monotonic), 0 = never   [1] ready at (monotonic), 0 = not yet
#   [2] pid of the writer                  [3] status sequence (odd while writing)
#   [4] fd of the worker's stack-dump memfd, -1 = none
#   [5] 1.0: the worker takes the death lock (a robust mutex, see corral._robust)
_SLOT = 320
_DOUBLES = _SLOT // 8
_TEXT_AT = 64
_LOCK_AT = 256
_TEXT_MAX = _LOCK_AT - _TEXT_AT - 2

# Python 3.13+ can map without keeping its own dup of the fd: a dup the supervisor's fork
# workers would inherit and a worker's own mapping would hold beside the user's fds (on 3.11 and
# 3.12 the dup stays; README "File descriptors" counts it).
UNTRACKED: dict[str, Any] = {"trackfd": False} if sys.version_info >= (3, 13) else {}

_monotonic = time.monotonic
_view: Any = None  # the whole table as a memoryview of doubles, in a worker
_base = 0  # this worker's first double
_wake_fd = -1  # the supervisor's wakeup pipe: readiness is worth one write
_first_beat_pending = False  # ready_when="beat": the first beat also signals readiness
_held: Any = None  # the death lock this worker holds (kept alive: it pins the mapping)


def beat() -> bool:
    """Tell the supervisor this worker is making progress. ~100 ns; no system call, no lock."""
    view = _view
    if view is None:
        return False
    view[_base] = _monotonic()
    if _first_beat_pending:
        _notify_ready()
    return True


def ready() -> bool:
    """Tell the supervisor this worker can take work (STARTING -> RUNNING). Also a beat."""
    view = _view
    if view is None:
        return False
    now = _monotonic()
    view[_base] = now
    if view[_base + 1] == 0.0:
        view[_base + 1] = now
        _notify_ready()
    return True


def _notify_ready() -> None:
    global _first_beat_pending
    _first_beat_pending = False
    if _wake_fd >= 0:
        try:
            os.write(_wake_fd, b"r")
        except OSError:
            pass  # full (the supervisor is awake anyway) or gone (we are about to be killed)


def set_status(text: str) -> bool:
    """Publish a short status text (e.g. "loading model"); shown in ``status()``."""
    view = _view
    if view is None:
        return False
    # Cut on a character boundary, not in the middle of a multi-byte one.
    data = text.encode("utf-8", "replace")[:_TEXT_MAX].decode("utf-8", "ignore").encode("utf-8")
    raw = view.obj  # the mmap
    assert isinstance(raw, mmap.mmap)
    at = _base * 8 + _TEXT_AT
    seq = view[_base + 3]
    view[_base + 3] = seq + 1  # odd: a reader retries
    raw[at : at + 2] = len(data).to_bytes(2, "little")
    raw[at + 2 : at + 2 + len(data)] = data
    view[_base + 3] = seq + 2
    return True


def in_worker() -> bool:
    """True inside a process started by corral (after its bootstrap ran)."""
    return _view is not None


def _open_table(path: str, wake_path: str | None) -> tuple[Any, int]:
    """Map the supervisor's table (and open its wake fd, -1 without one) in a worker."""
    wake_fd = -1
    if wake_path is not None:
        try:
            wake_fd = os.open(wake_path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            wake_fd = -1
    try:
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            mm = mmap.mmap(fd, size, **UNTRACKED)
        finally:
            os.close(fd)
    except BaseException:
        if wake_fd >= 0:
            os.close(wake_fd)
        raise
    return memoryview(mm).cast("d"), wake_fd


def _slots_in(view: Any) -> int:
    """How many workers' slots a mapped table holds."""
    return len(view) // _DOUBLES


def _attach(path: str, index: int, dump_fd: int = -1, wake_path: str | None = None,
            ready_on_beat: bool = False) -> None:
    """Map the supervisor's table in a worker (called by the bootstrap)."""
    view, wake_fd = _open_table(path, wake_path)
    _attach_view(view, index, dump_fd, wake_fd, ready_on_beat)


def _attach_view(view: Any, index: int, dump_fd: int, wake_fd: int,
                 ready_on_beat: bool) -> None:
    """Use an already mapped table (a fork child shares the supervisor's mapping)."""
    global _view, _base, _wake_fd, _first_beat_pending, _held
    _wake_fd = wake_fd
    _first_beat_pending = ready_on_beat
    base = index * _DOUBLES
    # A process this worker forks is not the worker: its beats must not hide a hung worker.
    os.register_at_fork(after_in_child=_detach)
    view[base + 2] = float(os.getpid())
    view[base + 4] = float(dump_fd)
    if view[base + 5] == 1.0:
        # The supervisor watches this lock: its release by the kernel is our death's first
        # sign. Taken by this (the main) thread, which lives as long as the process.
        from corral import _robust

        try:
            _held = _robust.hold(view.obj, index * _SLOT + _LOCK_AT)
        except (OSError, AttributeError, ValueError, TypeError):
            _held = None  # the pidfd still tells the supervisor, a moment later
    _view, _base = view, base


def _detach() -> None:
    global _view, _wake_fd, _first_beat_pending, _held
    _view, _wake_fd, _first_beat_pending, _held = None, -1, False, None


def _read_slot(view: Any, mm: mmap.mmap, index: int) -> SlotReading:
    """One slot of a table, the status text read consistently (retried while being written)."""
    base = index * _DOUBLES
    status = ""
    for _ in range(10):
        seq = view[base + 3]
        if int(seq) % 2:
            continue
        at = index * _SLOT + _TEXT_AT
        n = min(int.from_bytes(mm[at : at + 2], "little"), _TEXT_MAX)
        raw = mm[at + 2 : at + 2 + n]
        if view[base + 3] == seq:
            status = raw.decode("utf-8", "replace")
            break
    return SlotReading(view[base], view[base + 1], int(view[base + 2]), int(view[base + 4]),
                       status)


@dataclass(frozen=True)
class SlotReading:
    last_beat: float  # monotonic, 0 = never
    ready_at: float  # monotonic, 0 = not ready
    pid: int
    dump_fd: int
    status: str


# Where the table may live, in order: an anonymous memfd (no filesystem, so a full or read-only
# /dev/shm does not matter), then /dev/shm, then the temporary directory. CORRAL_SHM_DIR names
# the one directory to use instead.
SHM_DIR_ENV = "CORRAL_SHM_DIR"


def _reserve(fd: int, size: int) -> None:
    """Allocate ``size`` bytes of the file now: no space is an OSError here, never a SIGBUS later.

    A sparse file on a full tmpfs maps fine, and the first write to a page it cannot back kills
    the process with SIGBUS; posix_fallocate allocates every page up front instead.
    """
    os.ftruncate(fd, size)
    os.posix_fallocate(fd, 0, size)


def _open_backing(size: int) -> tuple[int, str]:
    """An fd of ``size`` reserved bytes of shared memory, and where it lives.

    Raises:
        OSError: no place could reserve it; the message lists every place tried and why.
    """
    override = os.environ.get(SHM_DIR_ENV)
    places: list[str | None] = [override] if override else [None, "/dev/shm",
                                                              tempfile.gettempdir()]
    failures = []
    last_errno = errno.ENOSPC
    for directory in places:
        fd = -1
        try:
            if directory is None:
                if not hasattr(os, "memfd_create"):
                    continue
                fd = os.memfd_create("corral-heartbeats", os.MFD_CLOEXEC)
                where = "memfd"
            else:
                fd, path = tempfile.mkstemp(prefix="corral-hb-", dir=directory)
                os.unlink(path)  # reachable only through our fd from now on: nothing to clean up
                where = directory
            _reserve(fd, size)
            return fd, where
        except OSError as exc:
            failures.append(f"{directory or 'memfd'}: {exc.strerror or exc}")
            last_errno = exc.errno or last_errno
            if fd >= 0:
                os.close(fd)
    raise OSError(
        last_errno,
        f"corral could not reserve {size} bytes of shared memory for the heartbeat table "
        f"({'; '.join(failures) or 'no place to try'}). Free space in /dev/shm (in Docker: "
        f"--shm-size), or set {SHM_DIR_ENV} to a writable directory with free space.")


def _robust_init() -> bytes | None:
    from corral import _robust

    return _robust.mutex_init_bytes() if _robust.available() else None


class HeartbeatTable:
    """The supervisor's side: one slot per worker index; grows with ``ensure``.

    Raises:
        OSError: the shared memory could not be reserved (see :func:`_open_backing`).
    """

    def __init__(self, capacity: int, death_locks: bool = False) -> None:
        self._capacity = max(capacity, 8)
        # With death locks, each reset slot holds a fresh robust mutex for its next process.
        self._lock_init = _robust_init() if death_locks else None
        self.on_grow: Callable[[], None] | None = None  # told after the table grew
        # A slot may be reset from the death watch's thread (a standby sent in on the notice):
        # never while the mapping is replaced.
        self._map_lock = threading.Lock()
        self._fd, self.where = _open_backing(self._capacity * _SLOT)
        self._mm: mmap.mmap | None = None
        self._view: Any = None  # memoryview of doubles (typeshed only knows int items)
        try:
            self._map()
        except BaseException:
            os.close(self._fd)
            raise

    @property
    def path(self) -> str:
        """What a worker opens: our fd, through /proc (works for every start method)."""
        return f"/proc/{os.getpid()}/fd/{self._fd}"

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def view(self) -> Any:
        """The mapped table; a fork child uses it as is (the mapping is shared)."""
        return self._view

    @property
    def capacity(self) -> int:
        return self._capacity

    def _map(self) -> None:
        if self._view is not None:
            self._view.release()
        if self._mm is not None:
            self._mm.close()
        self._mm = mmap.mmap(self._fd, self._capacity * _SLOT, **UNTRACKED)
        self._view = memoryview(self._mm).cast("d")


    def ensure(self, capacity: int) -> None:
        """Make room for ``capacity`` slots (at least doubling).

        Raises:
            OSError: the larger table could not be reserved; the table is unchanged.
        """
        if capacity <= self._capacity:
            return
        capacity = max(capacity, self._capacity * 2)
        try:
            os.posix_fallocate(self._fd, 0, capacity * _SLOT)
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"corral could not grow the heartbeat table to {capacity} workers "
                f"({capacity * _SLOT} bytes in {self.where}): {exc.strerror}. Free space "
                f"there (in Docker: --shm-size), or set {SHM_DIR_ENV}.") from exc
        with self._map_lock:
            self._capacity = capacity
            self._map()
        if self.on_grow is not None:
            self.on_grow()

    def reset(self, index: int) -> None:
        """Clear a slot before a new process takes it: no inherited beat or readiness."""
        self.ensure(index + 1)
        with self._map_lock:
            assert self._mm is not None
            self._mm[index * _SLOT : (index + 1) * _SLOT] = bytes(_SLOT)
            assert self._view is not None
            self._view[index * _DOUBLES + 4] = -1.0
            if self._lock_init is not None:
                at = index * _SLOT + _LOCK_AT
                self._mm[at : at + len(self._lock_init)] = self._lock_init
                self._view[index * _DOUBLES + 5] = 1.0

    @property
    def death_locks(self) -> bool:
        """Whether workers take a death lock in their slot (see :mod:`corral._robust`)."""
        return self._lock_init is not None

    def last_beat(self, index: int) -> float:
        assert self._view is not None
        return float(self._view[index * _DOUBLES])

    def all_beats(self) -> list[float]:
        """Every slot's last beat at once (one strided copy, cheap for 512 workers)."""
        assert self._view is not None
        beats: list[float] = self._view[0::_DOUBLES].tolist()
        return beats

    def beats_from_any_thread(self) -> list[float] | None:
        """:meth:`all_beats` for a reader on another thread than the owner's; None if the
        table was closed meanwhile (the reader then asks the owner).

        One copy of the mapping's bytes (a single C call: atomic against close() and ensure()
        on the owner's thread), then the strided read of that private copy: no buffer of the
        shared mapping is ever exported to this thread (that would make the owner's release
        fail).
        """
        mm = self._mm
        if mm is None:
            return None
        try:
            data = mm[:]
        except ValueError:  # closed by the owner meanwhile
            return None
        beats = memoryview(data).cast("d")[0::_DOUBLES].tolist()
        return cast("list[float]", beats)

    def mark(self, index: int, now: float, ready: bool = False) -> None:
        """A beat (and readiness) for ``index`` from the supervisor's side: a command worker
        speaks sd_notify (WATCHDOG=1, READY=1), and corral writes its slot for it."""
        assert self._view is not None
        base = index * _DOUBLES
        self._view[base] = now
        if ready and self._view[base + 1] == 0.0:
            self._view[base + 1] = now

    def set_status_text(self, index: int, text: str) -> None:
        """The status text of ``index`` (sd_notify STATUS=...), as ``set_status`` writes it."""
        assert self._view is not None and self._mm is not None
        data = text.encode("utf-8", "replace")[:_TEXT_MAX].decode("utf-8", "ignore").encode()
        base = index * _DOUBLES
        at = index * _SLOT + _TEXT_AT
        seq = self._view[base + 3]
        self._view[base + 3] = seq + 1
        self._mm[at : at + 2] = len(data).to_bytes(2, "little")
        self._mm[at + 2 : at + 2 + len(data)] = data
        self._view[base + 3] = seq + 2

    def oldest_beat(self, n: int) -> float:
        """The earliest last beat of slots 0..n-1 (0 if one has never beaten)."""
        assert self._view is not None
        return float(min(self._view[0 : n * _DOUBLES : _DOUBLES]))

    def ready_at(self, index: int) -> float:
        assert self._view is not None
        return float(self._view[index * _DOUBLES + 1])

    def read(self, index: int) -> SlotReading:
        assert self._view is not None and self._mm is not None
        return _read_slot(self._view, self._mm, index)

    def close(self) -> None:
        with self._map_lock:
            if self._view is not None:
                self._view.release()
                self._view = None
            if self._mm is not None:
                self._mm.close()
                self._mm = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class LocalSlot:
    """One heartbeat slot in this process's own memory, for a supervisor that cannot map a table.

    A worker whose supervisor is not its parent, possibly on another machine (a Ray actor), has
    no shared table to write into. It attaches a LocalSlot instead: :func:`beat`, :func:`ready`
    and :func:`set_status` then write here exactly as they would into a supervisor's table (same
    code, same cost), and whatever answers the supervisor's probes reads it with :meth:`read`.
    The stamps are this process's ``time.monotonic()``: compare them with each other (did the
    worker beat since the last look?), never with another machine's clock.
    """

    def __init__(self) -> None:
        self._mm = mmap.mmap(-1, _SLOT)  # anonymous, private to this process and its forks
        self._view: Any = memoryview(self._mm).cast("d")
        self._view[4] = -1.0  # no stack-dump fd

    def attach(self, ready_on_beat: bool = False) -> None:
        """Make this slot the one this process's beat()/ready()/set_status() write to.

        Args:
            ready_on_beat: the first beat also counts as ready() (``ready_when="beat"``).
        """
        _attach_view(self._view, 0, -1, -1, ready_on_beat)

    def detach(self) -> None:
        """Stop writing here: beat() and friends do nothing again (if this slot was attached)."""
        if _view is self._view:
            _detach()

    def read(self) -> SlotReading:
        return _read_slot(self._view, self._mm, 0)
