"""The bench process's side of the measurements: the FIFO probe, CPU clocks, process clean-up."""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import shutil
import signal
import tempfile
import time
from collections import deque
from dataclasses import dataclass

from bench_workers import RECORD


@dataclass(frozen=True)
class Record:
    kind: int
    index: int
    pid: int
    value: float
    received: float  # the bench process's monotonic clock when it read the record


class Probe:
    """A FIFO every worker writes fixed-size records to; read here with a timeout.

    The bench keeps a write end open too, so the FIFO never reports EOF between workers.
    """

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="corral-bench-")
        self.path = os.path.join(self._dir, "probe")
        os.mkfifo(self.path)
        self._r = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self._w = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        self._buf = b""
        self._pending: deque[Record] = deque()
        self.pids: set[int] = set()  # every pid that reported: cleaned up at the end
        self.grandchildren: set[int] = set()
        self.started = time.time()

    def _fill(self, timeout: float) -> None:
        ready, _, _ = select.select([self._r], [], [], max(0.0, timeout))
        if not ready:
            return
        now = time.monotonic()
        try:
            data = os.read(self._r, 65536)
        except BlockingIOError:
            return
        self._buf += data
        size = RECORD.size
        while len(self._buf) >= size:
            kind, index, pid, value = RECORD.unpack_from(self._buf)
            self._buf = self._buf[size:]
            rec = Record(kind, index, pid, value, now)
            if kind == 1:
                self.pids.add(pid)
            elif kind == 4:
                self.grandchildren.add(int(value))
            self._pending.append(rec)

    def next(self, timeout: float, kind: int | None = None, what: str = "a record") -> Record:
        """The next record (of ``kind``; others are dropped). TimeoutError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            while self._pending:
                rec = self._pending.popleft()
                if kind is None or rec.kind == kind:
                    return rec
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {what} within {timeout}s")
            self._fill(left)

    def drain(self, seconds: float = 0.0) -> list[Record]:
        """Everything that arrives within ``seconds`` (at least what is there now)."""
        deadline = time.monotonic() + seconds
        while True:
            self._fill(max(0.0, deadline - time.monotonic()))
            if time.monotonic() >= deadline:
                break
        out = list(self._pending)
        self._pending.clear()
        return out

    def close(self) -> None:
        for fd in (self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)
        shutil.rmtree(self._dir, ignore_errors=True)


# ---------------------------------------------------------------------------------- CPU clocks

_libc = ctypes.CDLL(None, use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def process_cpu(pid: int) -> float | None:
    """CPU seconds used by every thread of ``pid`` so far, ns resolution (None if it is gone).

    /proc's figures are in 10 ms ticks: far too coarse for "2 ms per 10 s". The kernel's
    per-process CPU clock (clock_getcpuclockid) is exact.
    """
    if pid == os.getpid():
        return time.process_time()
    clock = ctypes.c_int()
    if _libc.clock_getcpuclockid(pid, ctypes.byref(clock)) != 0:
        return None
    ts = _Timespec()
    if _libc.clock_gettime(clock.value, ctypes.byref(ts)) != 0:
        return None
    return ts.tv_sec + ts.tv_nsec / 1e9


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------------------------- clean-up


def alive(pid: int) -> bool:
    """Running (not a zombie, not gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def kill_pids(pids: set[int], not_before: float) -> int:
    """SIGKILL each pid still alive that was started after ``not_before`` (wall time).

    The start-time check keeps a reused pid from being hit. Returns how many were killed.
    """
    import psutil

    killed = 0
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            proc = psutil.Process(pid)
            if proc.create_time() + 1 < not_before or not alive(pid):
                continue
            proc.send_signal(signal.SIGKILL)
            killed += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return killed
