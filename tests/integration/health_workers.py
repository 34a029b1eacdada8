"""Worker targets and health-check functions for the health integration tests.

Targets live at module level so spawn and forkserver children can import them; each takes
``index`` first, as corral calls ``target(index, *args)``. Coordination with the test goes through
files in a per-test directory (``flagdir``), written atomically, never through timing.

Most targets misbehave in their first life only: they leave a ``first-<index>`` file holding their
pid, and the replacement, finding it, behaves (beats every ``BEAT_EVERY`` s). So a test can tell
the faulty process from its replacement, and the replacement must then stay up.

Health checks run in the supervisor (the test process), on corral's check threads, so their state
is plain Python shared with the test.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import corral

BEAT_EVERY = 0.05
MiB = 2**20


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.rename(path)  # a reader never sees a half-written file


def _first_life(flagdir: str, index: int) -> bool:
    """True (and the mark left) the first time worker ``index`` gets here."""
    flag = Path(flagdir) / f"first-{index}"
    if flag.exists():
        return False
    _write_atomic(flag, str(os.getpid()))
    return True


def _faulty(flagdir: str, index: int) -> bool:
    """Worker 0 misbehaves in its first life; other workers are healthy bystanders."""
    return index == 0 and _first_life(flagdir, index)


def _wait_file(path: Path) -> None:
    while not path.exists():
        time.sleep(0.01)


def beat_forever() -> None:
    """What a healthy worker does: beat steadily, forever."""
    while True:
        corral.beat()
        time.sleep(BEAT_EVERY)


def _mark_beating(flagdir: str, index: int) -> None:
    # The test waits for this before it expects a heartbeat to be overdue.
    _write_atomic(Path(flagdir) / f"beating-{index}-{os.getpid()}", "1")


# ------------------------------------------------------------------------ hangs (first life)
# Each beats a few times, says so, then stops beating in its own way. The functions' names are
# what the tests look for in the stack dump, so each hang happens in a frame of its own.


def hang_silent(index: int, flagdir: str) -> None:
    """Keeps running Python code, but no longer beats."""
    if _faulty(flagdir, index):
        for _ in range(3):
            corral.beat()
            time.sleep(BEAT_EVERY)
        _mark_beating(flagdir, index)
        while True:
            time.sleep(0.01)
    beat_forever()


def hang_sigstop(index: int, flagdir: str) -> None:
    """Beats steadily; the test SIGSTOPs it."""
    if _faulty(flagdir, index):
        corral.beat()
        _mark_beating(flagdir, index)
        while True:
            corral.beat()
            time.sleep(BEAT_EVERY)
    beat_forever()


def hang_spin(index: int, flagdir: str) -> None:
    """A tight pure-Python loop."""
    if _faulty(flagdir, index):
        corral.beat()
        _mark_beating(flagdir, index)
        while True:
            pass
    beat_forever()


def hang_c_sleep(index: int, flagdir: str) -> None:
    """Blocked in a long C call that releases the GIL."""
    if _faulty(flagdir, index):
        corral.beat()
        _mark_beating(flagdir, index)
        time.sleep(3600)
    beat_forever()


def hang_c_gil(index: int, flagdir: str) -> None:
    """Blocked in a C call that holds the GIL, with a graceful SIGTERM handler that never runs.

    ``sum`` over a huge range loops in C without releasing the GIL or checking for signals, so
    the Python-level handler cannot run and only SIGKILL ends it. (A backtracking regex would
    not do: ``_sre`` checks for signals as it goes.)
    """
    if _faulty(flagdir, index):
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        corral.beat()
        _mark_beating(flagdir, index)
        sum(range(10**13))  # hours of C
        os._exit(3)  # unreachable in practice; if it ever returns, the test sees an exit
    beat_forever()


HANGS = {
    "silent": hang_silent,
    "sigstop": hang_sigstop,
    "spin": hang_spin,
    "c_sleep": hang_c_sleep,
    "c_gil": hang_c_gil,
}


def hang_then_slow_replacement(index: int, flagdir: str, beat_for: float,
                               replacement_delay: float) -> None:
    """First life: beat for ``beat_for`` s, then hang. Replacement: wait ``replacement_delay`` s,
    then beat. A replacement that inherited its predecessor's last beat would be judged hung (or,
    with ready_when="beat", ready) during that delay.
    """
    if _faulty(flagdir, index):
        corral.beat()
        _mark_beating(flagdir, index)
        until = time.monotonic() + beat_for
        while time.monotonic() < until:
            corral.beat()
            time.sleep(BEAT_EVERY)
        time.sleep(3600)
    time.sleep(replacement_delay)
    beat_forever()


# ----------------------------------------------------------------------------- slow starts


def slow_first_beat(index: int, delay: float) -> None:
    """Needs ``delay`` seconds (loading a model, say) before its first beat or ready()."""
    corral.set_status("loading")
    time.sleep(delay)
    corral.set_status("serving")
    corral.ready()
    beat_forever()


def beats_never_ready(index: int) -> None:
    """Beats steadily but never calls ready(): stuck in its start-up."""
    while True:
        corral.beat()
        time.sleep(BEAT_EVERY)


# ------------------------------------------------------------------------------- readiness


def ready_on_flag(index: int, flagdir: str, how: str) -> None:
    """Publish a status, wait for ``flagdir/go``, then become ready by ``how`` ("ready"/"beat")."""
    corral.set_status("loading model")
    _wait_file(Path(flagdir) / "go")
    if how == "ready":
        corral.ready()
    corral.set_status("serving")
    beat_forever()


def report_api(index: int, flagdir: str) -> None:
    """Write what the worker-side API returns inside a corral worker."""
    results = {
        "in_worker": corral.in_worker(),
        "set_status": corral.set_status("reporting"),
        "beat": corral.beat(),
        "ready": corral.ready(),
    }
    _write_atomic(Path(flagdir) / f"api-{index}", repr(results))
    beat_forever()


def report_api_plain(path: str) -> None:
    """The same, in a child process corral did not start (a plain multiprocessing target)."""
    results = {
        "in_worker": corral.in_worker(),
        "set_status": corral.set_status("x"),
        "beat": corral.beat(),
        "ready": corral.ready(),
    }
    _write_atomic(Path(path), repr(results))


# ------------------------------------------------------------------------------- memory


def _grow(limit: int, chunk: int = 8 * MiB) -> list[bytes]:
    hoard: list[bytes] = []
    while len(hoard) * chunk < limit:
        hoard.append(b"x" * chunk)  # written, so resident (a bare bytearray(n) may not be)
        time.sleep(0.01)
    return hoard


def leak_memory(index: int, flagdir: str, up_to: int) -> None:
    """First life: grow steadily up to ``up_to`` bytes, then hold it. Replacement: stays small."""
    if _faulty(flagdir, index):
        corral.beat()
        hoard = _grow(up_to)
        _write_atomic(Path(flagdir) / f"grown-{index}", str(len(hoard)))
        while True:
            time.sleep(3600)
    beat_forever()


def leak_in_child(index: int, flagdir: str, up_to: int) -> None:
    """First life: a forked child grows up to ``up_to`` bytes; the worker itself stays small."""
    if _faulty(flagdir, index):
        pid = os.fork()
        if pid == 0:
            try:
                _write_atomic(Path(flagdir) / f"child-{index}", str(os.getpid()))
                _grow(up_to)
                while True:
                    time.sleep(3600)
            finally:
                os._exit(0)
        while True:
            time.sleep(3600)
    beat_forever()


def sleeper(index: int) -> None:
    """Sleeps until stopped (default SIGTERM disposition)."""
    while True:
        time.sleep(3600)


# -------------------------------------------------------------------------- health checks


class FlakyCheck:
    """A health check that fails for the first process of worker ``bad_index`` only.

    ``mode``: "false" returns False, "raise" raises RuntimeError, "hang" blocks until
    ``release`` is set or ``hang_for`` seconds pass (the test sets it when done, so no thread is
    left blocking the interpreter's exit). Every call is recorded as ``(index, pid)``.
    """

    def __init__(self, mode: str, bad_index: int, hang_for: float = 30.0) -> None:
        if mode not in ("false", "raise", "hang"):
            raise ValueError(mode)
        self.mode = mode
        self.bad_index = bad_index
        self.hang_for = hang_for
        self.release = threading.Event()
        self.hanging = threading.Event()  # set while a call is blocked
        self.bad_pid: int | None = None
        self._lock = threading.Lock()
        self._calls: list[tuple[int, int]] = []

    def __call__(self, process: Any, index: int) -> bool:
        pid = int(process.pid)
        with self._lock:
            self._calls.append((index, pid))
            if index == self.bad_index and self.bad_pid is None:
                self.bad_pid = pid
            bad = index == self.bad_index and pid == self.bad_pid
        if not bad:
            return bool(process.is_alive())
        if self.mode == "false":
            return False
        if self.mode == "raise":
            raise RuntimeError("probe refused")
        self.hanging.set()
        try:
            self.release.wait(self.hang_for)
        finally:
            self.hanging.clear()
        return True

    def calls(self, index: int | None = None, pid: int | None = None) -> list[tuple[int, int]]:
        with self._lock:
            return [c for c in self._calls
                    if (index is None or c[0] == index) and (pid is None or c[1] == pid)]
