"""Fakes for the loops' unit tests: processes and a clock the test controls.

A :class:`FakeProcess` has what the monitor and the pool use of a process (``ProcessLike``):
a pid, a waitable fd (a pipe the test makes readable when the "process" exits), signals that are
recorded (SIGKILL, and SIGTERM unless told to ignore it, end it), reap and close. Nothing is
started: these tests need no process at all.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from typing import Any

from corral.exitstatus import ExitStatus

_pids = itertools.count(4_000_000)  # above any real pid_max default: never a real process


class FakeClock:
    """A monotonic clock that moves only when told."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


class FakeProcess:
    def __init__(self, clock: FakeClock, index: int, ignore_term: bool = False) -> None:
        self.pid = next(_pids)
        self.index = index
        self.started = clock()
        self.started_wall = time.time()
        self.exit: ExitStatus | None = None
        self.stop_sent: int | None = None
        self.signals: list[int] = []
        self.ignore_term = ignore_term
        self._status: ExitStatus | None = None
        self._r, self._w = os.pipe()
        self.closed = False

    # what the test does
    def die(self, code: int | None = None, sig: int | None = None) -> None:
        if self._status is None:
            self._status = ExitStatus(code=code) if sig is None else ExitStatus(signal=sig)
            os.write(self._w, b"x")

    @property
    def alive(self) -> bool:
        return self._status is None

    # ProcessLike
    def waitable(self) -> int:
        return self._r

    def send(self, sig: int) -> bool:
        if self._status is not None:
            return False
        self.signals.append(sig)
        if sig == signal.SIGKILL or (sig == signal.SIGTERM and not self.ignore_term):
            self.die(sig=sig)
        return True

    def send_group(self, sig: int) -> bool:
        return self.send(sig)

    def send_stop(self, sig: int) -> None:
        if self.stop_sent == sig or self.stop_sent == signal.SIGKILL:
            return
        self.stop_sent = sig
        self.send(sig)

    def kill_group_leftovers(self) -> None:
        pass

    def kill_and_reap(self, timeout: float = 5.0) -> None:
        self.send(signal.SIGKILL)
        self.reap()
        self.close()

    def reap(self) -> ExitStatus | None:
        if self._status is not None:
            self.exit = self._status
        return self.exit

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self._r)
            os.close(self._w)


class FakeStarter:
    """``start_process`` for the monitor: makes FakeProcesses (or fails, when told)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.started: list[FakeProcess] = []
        self.fail_next: list[BaseException] = []
        self.ignore_term = False
        self.hold: threading.Event | None = None  # set: starts wait for it (stay PENDING)

    def __call__(self, request: Any) -> FakeProcess:
        if self.hold is not None:
            self.hold.wait(30)
        if self.fail_next:
            raise self.fail_next.pop(0)
        proc = FakeProcess(self.clock, request.index, self.ignore_term)
        self.started.append(proc)
        return proc

    def current(self, index: int) -> FakeProcess:
        """The latest process started for slot ``index``."""
        return [p for p in self.started if p.index == index][-1]

    def close_all(self) -> None:
        for p in self.started:
            p.close()
