"""A tiny implementation of corral._loop.Loop over ``selectors``, for tests and benchmarks.

The supervisor's reactor is the real one; this is just enough to drive the IO classes.
"""

from __future__ import annotations

import heapq
import itertools
import os
import selectors
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any


class Timer:
    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class SelectorLoop:
    """add_reader / remove_reader / call_later / call_soon_threadsafe (no add_writer)."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self._readers: dict[int, Callable[[], None]] = {}
        self._writers: dict[int, Callable[[], None]] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._inbox: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.sel.register(self._wake_r, selectors.EVENT_READ)
        self.thread = threading.get_ident()
        self.errors: list[BaseException] = []

    # -- the Loop protocol
    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self._readers[fd] = callback
        self._update(fd)

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            self._update(fd)

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(time.monotonic() + max(0.0, delay), callback)
        heapq.heappush(self._timers, (timer.when, next(self._seq), timer))
        return timer

    def call_soon_threadsafe(self, callback: Callable[..., None], *args: Any) -> None:
        self._inbox.append((callback, args))
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    # -- driving it
    def _update(self, fd: int) -> None:
        events = (selectors.EVENT_READ if fd in self._readers else 0) | (
            selectors.EVENT_WRITE if fd in self._writers else 0)
        try:
            self.sel.get_key(fd)
            registered = True
        except KeyError:
            registered = False
        if not events:
            if registered:
                self.sel.unregister(fd)
        elif registered:
            self.sel.modify(fd, events)
        else:
            self.sel.register(fd, events)

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except BaseException as exc:  # keep going; the test checks loop.errors
            self.errors.append(exc)
            raise

    def run_once(self, timeout: float | None = 0.1) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        if self._timers:
            wait = max(0.0, self._timers[0][0] - now)
            timeout = wait if timeout is None else min(timeout, wait)
        if self._inbox:
            timeout = 0
        for key, mask in self.sel.select(timeout):
            fd = key.fd
            if fd == self._wake_r:
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
                continue
            if mask & selectors.EVENT_READ and fd in self._readers:
                self._call(self._readers[fd])
            if mask & selectors.EVENT_WRITE and fd in self._writers:
                self._call(self._writers[fd])
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                timer.cancelled = True
                self._call(timer.callback)
        while self._inbox:
            fn, args = self._inbox.popleft()
            self._call(fn, *args)

    def run_until(self, condition: Callable[[], Any], timeout: float = 10.0,
                  what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            self.run_once(min(left, 0.05))

    def run_for(self, seconds: float) -> None:
        """Run the loop for a while (used only where nothing must happen, e.g. a pause)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.run_once(min(left, 0.05))

    @property
    def watched_readers(self) -> set[int]:
        return set(self._readers)

    def close(self) -> None:
        self.sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


class SelectorWriterLoop(SelectorLoop):
    """The same, with the optional add_writer / remove_writer (corral._loop.WriterLoop)."""

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        self._writers[fd] = callback
        self._update(fd)

    def remove_writer(self, fd: int) -> None:
        if self._writers.pop(fd, None) is not None:
            self._update(fd)
