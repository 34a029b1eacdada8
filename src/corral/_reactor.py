"""One small event loop that every long-lived corral thread with fds and deadlines stands on.

The supervisor's monitor, the process pool's manager, and later the command's log pipes, control
socket, notify sockets and metrics endpoint all need the same things: wait on many fds and the
next deadline at once, take work handed over from other threads, and never poll. This module has
them once::

    other threads --call_soon_threadsafe(fn, *args)--> inbox --1 byte (merged)--> wake pipe --+
    add_reader(fd, cb) / add_writer(fd, cb) ----------------------------------------> epoll --+
    call_at / call_later (TimerHandle)   --+                                                  |
    set_deadline(key, when) (typed keys) --+--> one heap --> the timeout of the next poll ----+
                                                                                              v
                           get_events(timeout) -> batch -> process_events(batch) -> due timers

A round is :meth:`Reactor.run_once`: ``get_events`` blocks in ``epoll`` until an fd is ready or
the earliest deadline falls; ``process_events`` runs the callbacks of that batch (readers of a
lower ``priority`` first, so a pool reads a worker's last reply before it handles that worker's
exit in the same batch), then the inbox, then every deadline that is due. Keyed deadlines are
the owner's (``on_deadline(key, now)``): a key set again replaces its time, so a loop re-arms a
timer without piling up entries. Wake-ups from other threads are merged: a byte is written only
if none is pending.

Only the thread that runs the loop may touch it, except :meth:`call_soon_threadsafe` and
:meth:`wake`. It implements :class:`corral._loop.WriterLoop`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

from corral._deadlines import Deadlines
from corral.process import disown_fd, own_fd

__all__ = ["MAX_WAIT", "DeadlineSpace", "Reactor", "Timer"]

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)

MAX_WAIT = 86400.0  # the longest single wait (a far deadline must not overflow epoll's ms)
# How long close() waits for another thread to leave the wake pipe's section (microseconds,
# unless a signal handler runs inside it and waits for this close: see close()).
_CLOSE_WAIT = 0.5
_READ = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
_WRITE = select.EPOLLOUT | select.EPOLLERR


class Timer:
    """A callback at a time (what :meth:`Reactor.call_at` returns); ``cancel()`` it freely."""

    __slots__ = ("_reactor", "args", "callback", "when")

    def __init__(self, reactor: Reactor[Any], when: float, callback: Callable[..., None],
                 args: tuple[Any, ...]) -> None:
        self._reactor = reactor
        self.when = when
        self.callback = callback
        self.args = args

    def cancel(self) -> None:
        self._reactor._deadlines.cancel(self)

    def __repr__(self) -> str:
        return f"<Timer at {self.when:.3f} {self.callback!r}>"


class DeadlineSpace(Generic[K]):
    """One owner's keyed deadlines on a reactor it may share with other owners.

    Keys live in the reactor's one heap as ``(space, key)``; a due key is handed to this
    space's ``on_deadline(key, now)``. Several loops (say, the pools of one ``corral run``) can
    so share one reactor thread without their keys colliding.
    """

    __slots__ = ("_reactor", "on_deadline")

    def __init__(self, reactor: Reactor[Any], on_deadline: Callable[[K, float], None]) -> None:
        self._reactor = reactor
        self.on_deadline = on_deadline

    def set(self, key: K, when: float) -> None:
        self._reactor._deadlines.set((self, key), when)

    def cancel(self, key: K) -> None:
        self._reactor._deadlines.cancel((self, key))

    def get(self, key: K) -> float | None:
        return self._reactor._deadlines.get((self, key))

    def __contains__(self, key: object) -> bool:
        return (self, key) in self._reactor._deadlines

    def clear(self) -> None:
        """Forget every deadline of this space (its owner is done)."""
        self._reactor._deadlines.cancel_where(lambda k: isinstance(k, tuple) and k[0] is self)


class _Watch:
    __slots__ = ("mask", "priority", "reader", "writer")

    def __init__(self) -> None:
        self.reader: Callable[[], None] | None = None
        self.writer: Callable[[], None] | None = None
        self.priority = 0
        self.mask = 0


class Reactor(Generic[K]):
    """An epoll loop with a merged wake pipe, a thread-safe inbox and typed deadlines.

    Args:
        name: for logs.
        on_deadline: called as ``on_deadline(key, now)`` for each keyed deadline that is due.
        clock: the monotonic clock (a fake one in tests).

    Raises:
        OSError: the pipe or the epoll could not be made (nothing is left open).
    """

    def __init__(self, name: str, on_deadline: Callable[[K, float], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.clock = clock
        self._on_deadline = on_deadline
        self._deadlines: Deadlines[Any] = Deadlines()
        self._watch: dict[int, _Watch] = {}
        self._inbox: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()
        # Never write to a closed (or reused) fd. Reentrant: a Python signal handler runs on
        # the main thread between two bytecodes, maybe inside this lock's section, and may
        # hand work over too (every step under it is fine to interleave that way).
        self._wake_lock = threading.RLock()
        self._wake_pending = False
        self._closed = False
        # close() could not wait for the lock: the thread in the section closes the pipe.
        self._close_deferred = False
        self._depth = 0  # sections under the lock (nested ones: a signal handler's)
        # time.monotonic() the loop woke from epoll for the round it is in; 0.0 while it
        # waits in epoll (read from other threads by busy_for()).
        self._busy_since = 0.0
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self._epoll = select.epoll()
        except BaseException:
            os.close(self._wake_r)
            os.close(self._wake_w)
            raise
        own_fd(self._wake_r)
        own_fd(self._wake_w)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        # Called (loop thread) after a batch in which the wake pipe was readable: an owner that
        # lets its workers write to wake_fd (readiness) looks at them then.
        self._on_wake: list[Callable[[], None]] = []
        self.rounds = 0  # completed rounds (a liveness probe can watch it move)
        self.last_round = clock()

    # ------------------------------------------------------------------ from any thread

    def call_soon_threadsafe(self, callback: Callable[..., None], *args: Any) -> None:
        """Run ``callback(*args)`` on the loop thread, soon. Safe from any thread.

        Raises:
            RuntimeError: the reactor is closed.
        """
        # Under the lock a hand-over is either in the inbox before close() (and the owner's
        # drain_inbox() finds it) or refused: it is never silently lost.
        try:
            with self._wake_lock:
                self._depth += 1
                try:
                    if self._closed:
                        raise RuntimeError(f"{self.name}: the reactor is closed")
                    self._inbox.append((callback, args))
                    if self._closed:
                        # Closed meanwhile: a signal handler ran inside this section and
                        # waited for the loop's end (see close()). Refused, so the caller
                        # answers itself.
                        raise RuntimeError(f"{self.name}: the reactor is closed")
                    self._write_wake()
                finally:
                    self._depth -= 1
        finally:
            if self._close_deferred:
                self._release_deferred()

    def wake(self) -> None:
        """Make the current (or next) wait return. Merged: one byte until the loop reads it."""
        if self._wake_pending:
            return  # a byte is in the pipe, or on its way: the loop will look at the inbox
        try:
            with self._wake_lock:
                self._depth += 1
                try:
                    self._write_wake()
                finally:
                    self._depth -= 1
        finally:
            if self._close_deferred:
                self._release_deferred()

    def _write_wake(self) -> None:
        # (under the lock)
        if self._wake_w >= 0 and not self._wake_pending:
            self._wake_pending = True
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_w, b"\0")

    def _release_deferred(self) -> None:
        """After a section, if close() left the pipe to the threads in sections: close it,
        unless this thread is still inside an outer section (a signal handler's hand-over ran
        nested in it): the outer one closes it as it leaves, never writing to a closed fd."""
        if self._wake_lock.acquire(timeout=_CLOSE_WAIT):
            try:
                if self._depth == 0:
                    self._release_pipe()
            finally:
                self._wake_lock.release()

    def add_wake_callback(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (loop thread) after each batch in which the wake pipe was
        readable: an owner that lets its workers write to :attr:`wake_fd` looks at them then."""
        self._on_wake.append(callback)

    def remove_wake_callback(self, callback: Callable[[], None]) -> None:
        with contextlib.suppress(ValueError):
            self._on_wake.remove(callback)

    def deadline_space(self, on_deadline: Callable[[Any, float], None]) -> DeadlineSpace[Any]:
        """A keyed-deadline space of one owner of this reactor (see :class:`DeadlineSpace`)."""
        return DeadlineSpace(self, on_deadline)

    @property
    def wake_fd(self) -> int:
        """The write end of the wake pipe: a worker may write a byte to it to wake the loop."""
        return self._wake_w

    @property
    def closed(self) -> bool:
        return self._closed

    # --------------------------------------------------------------------- the loop thread

    def call_soon(self, callback: Callable[..., None], *args: Any) -> None:
        """Run ``callback(*args)`` at the end of this round (loop thread only)."""
        self._inbox.append((callback, args))
        self._wake_pending = False  # the inbox is looked at this round whatever the pipe says

    def run_reader(self, fd: int) -> None:
        """Run ``fd``'s reader now, if it has one (loop thread only): for an fd this thread
        has just made readable (an eventfd it wrote), which the poll would only report in the
        next round. The reader must cope with being called again by that poll (it finds
        nothing, or it has removed itself)."""
        watch = self._watch.get(fd)
        if watch is not None and watch.reader is not None:
            watch.reader()

    def add_reader(self, fd: int, callback: Callable[[], None], priority: int = 0) -> None:
        """Call ``callback()`` whenever ``fd`` is readable (or hung up). A lower ``priority``
        runs first within one batch."""
        watch = self._watch.get(fd)
        if watch is None:
            watch = self._watch[fd] = _Watch()
        watch.reader = callback
        watch.priority = priority
        self._update(fd, watch)

    def remove_reader(self, fd: int) -> None:
        watch = self._watch.get(fd)
        if watch is not None and watch.reader is not None:
            watch.reader = None
            self._update(fd, watch)

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        watch = self._watch.get(fd)
        if watch is None:
            watch = self._watch[fd] = _Watch()
        watch.writer = callback
        self._update(fd, watch)

    def remove_writer(self, fd: int) -> None:
        watch = self._watch.get(fd)
        if watch is not None and watch.writer is not None:
            watch.writer = None
            self._update(fd, watch)

    def _update(self, fd: int, watch: _Watch) -> None:
        mask = (_READ if watch.reader else 0) | (_WRITE if watch.writer else 0)
        if mask == watch.mask:
            return
        try:
            if not mask:
                # Always before the fd is closed: epoll keeps a registration alive as long as
                # the open file is (a forked child may hold a copy).
                with contextlib.suppress(OSError, ValueError):
                    self._epoll.unregister(fd)
                del self._watch[fd]
            elif watch.mask:
                self._epoll.modify(fd, mask)
            else:
                self._epoll.register(fd, mask)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
            self._epoll.register(fd, mask)  # closed and reopened under the same number
        watch.mask = mask

    def watching(self, fd: int) -> bool:
        return fd in self._watch

    # -- time

    def call_at(self, when: float, callback: Callable[..., None], *args: Any) -> Timer:
        """Call ``callback(*args)`` once at monotonic time ``when`` (loop thread only)."""
        timer = Timer(self, when, callback, args)
        self._deadlines.set(timer, when)
        return timer

    def call_later(self, delay: float, callback: Callable[..., None], *args: Any) -> Timer:
        return self.call_at(self.clock() + max(0.0, delay), callback, *args)

    def set_deadline(self, key: K, when: float) -> None:
        """(Re)arm the owner's deadline ``key`` for ``when``; it replaces an earlier time."""
        self._deadlines.set(key, when)

    def cancel_deadline(self, key: K) -> None:
        self._deadlines.cancel(key)

    def deadline(self, key: K) -> float | None:
        return self._deadlines.get(key)

    def has_deadline(self, key: K) -> bool:
        return key in self._deadlines

    def clear_deadlines(self) -> None:
        self._deadlines = Deadlines()

    # -- a round

    def timeout(self, extra: float = math.inf) -> float | None:
        """Seconds until the earliest deadline (or ``extra``, a time of the owner's), None for
        none: what the next :meth:`get_events` waits at most."""
        # The earliest live one: a cancelled one left on top (the endpoint re-arms a
        # connection's timer at every request) would wake the loop for nothing.
        due = self._deadlines.next_due()
        if due is None or extra < due:
            due = extra
        if self._inbox:
            return 0.0
        if due == math.inf:
            return None
        return min(MAX_WAIT, max(0.0, due - self.clock()))

    def get_events(self, timeout: float | None) -> list[tuple[int, int]]:
        """Wait for the next batch of ready fds (at most ``timeout`` seconds; None: forever)."""
        self._busy_since = 0.0
        batch = self._epoll.poll(-1 if timeout is None else timeout)
        self._busy_since = time.monotonic()
        return batch

    def busy_for(self) -> float:
        """Seconds the loop has spent in its current round (0.0: it waits in epoll, ready to
        answer). Any thread: a loop wedged in a callback shows here without a round trip."""
        since = self._busy_since
        return 0.0 if not since else time.monotonic() - since

    def process_events(self, batch: list[tuple[int, int]]) -> None:
        """Run the callbacks of one batch, then the inbox."""
        if len(batch) > 1:
            watch = self._watch
            # Sorted only if it matters (most batches are all of one priority).
            for fd, _ in batch:
                w = watch.get(fd)
                if w is not None and w.priority:
                    batch = sorted(batch, key=lambda e: watch[e[0]].priority
                                   if e[0] in watch else 0)
                    break
        woke = False
        for fd, events in batch:
            if fd == self._wake_r:
                woke = True
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wake_r, 4096):
                        pass
                # From here on a wake() writes a new byte: one that saw the flag set has its
                # work in the inbox already, which is drained below.
                self._wake_pending = False
                continue
            watch_ = self._watch.get(fd)
            if watch_ is None:
                continue  # removed earlier in this batch
            if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR) and watch_.reader:
                watch_.reader()
            if events & (select.EPOLLOUT | select.EPOLLERR) and watch_.writer is not None:
                writer = self._watch.get(fd)
                if writer is not None and writer.writer is not None:
                    writer.writer()
        self.run_inbox()
        if woke:
            for callback in list(self._on_wake):
                callback()

    def run_inbox(self) -> None:
        inbox = self._inbox
        while inbox:
            callback, args = inbox.popleft()
            callback(*args)

    def run_due(self, now: float) -> None:
        """Run every deadline due at ``now``: timers' callbacks and the owner's keys."""
        if (due := self._deadlines.peek()) is None or due > now:
            return
        on_deadline = self._on_deadline
        for key in self._deadlines.pop_due(now):
            if isinstance(key, Timer):
                key.callback(*key.args)
            elif type(key) is tuple and len(key) == 2 and isinstance(key[0], DeadlineSpace):
                key[0].on_deadline(key[1], now)
            elif on_deadline is not None:
                on_deadline(key, now)

    def run_once(self, extra: float = math.inf) -> float:
        """One round: wait, run what became ready, then what is due. Returns ``now``.

        Args:
            extra: a deadline of the owner's kept outside the heap (the pool's liveness look,
                which moves at every round); the owner checks it against the returned time.
        """
        batch = self.get_events(self.timeout(extra))
        if batch or self._inbox:
            self.process_events(batch)
        now = self.clock()
        self.run_due(now)
        self.rounds += 1
        self.last_round = now
        return now

    def close(self) -> None:
        """Release the epoll and the wake pipe. Later call_soon_threadsafe calls raise."""
        if self._closed:
            return
        if self._wake_lock.acquire(timeout=_CLOSE_WAIT):
            try:
                self._closed = True
                self._release_pipe()
            finally:
                self._wake_lock.release()
        else:
            # Another thread has been inside the lock's section all this time: a signal
            # handler runs there (between two bytecodes) and waits for this very close, as
            # stop() called from a SIGTERM handler waits for the monitor's end. Refuse
            # hand-overs from now on, and leave the pipe to that thread: it closes it as it
            # leaves the section (or this one does, if it has left meanwhile).
            self._closed = True
            self._close_deferred = True
            if self._wake_lock.acquire(blocking=False):
                try:
                    self._release_pipe()
                finally:
                    self._wake_lock.release()
        self._epoll.close()
        # Let go of every callback: a closed reactor must not keep its owner alive (a cycle
        # through the owner's bound methods would wait for the cyclic GC).
        self._watch.clear()
        self._deadlines = Deadlines()
        self._on_deadline = None

    def _release_pipe(self) -> None:
        """Close the wake pipe (under the lock; idempotent)."""
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                disown_fd(fd)
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = -1

    def drain_inbox(self) -> list[tuple[Callable[..., None], tuple[Any, ...]]]:
        """Take whatever is still in the inbox (after close(): hand-overs that came too late)."""
        out = list(self._inbox)
        self._inbox.clear()
        return out
