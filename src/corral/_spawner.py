"""The one long-lived thread that starts a pool's processes.

Starting a process takes about a millisecond with fork and tens of milliseconds with forkserver or
spawn; it happens here, not on the loop thread, so a restart never delays the supervision of
the other workers (one exception: a lone fork restart that nothing would make wait is forked by
a pool's own loop thread, see ``SpawnPart._fork_here``). The thread lives as long as its pool,
which matters: Linux ties a child's parent-death signal to the *thread* that forked it.

Requests queued together (a pool's start, a scale-up) are delivered together: one hand-over to
the loop for the batch, not one per process. A lone restart is delivered at once. A pool's start
is queued as one request of many (:meth:`Spawner.request_batch`), which ``start_many`` may start
at once (under fork: from a single-threaded template, see :mod:`corral._template`).

    loop thread --request(req)--> queue --> spawner thread: start(req) -> WorkerProcess | error
                                                  |
    loop thread <--deliver([(req, result), ...]) --+   (through the reactor's inbox)
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from multiprocessing.context import BaseContext
from typing import Any, Generic, TypeVar

from corral.process import WorkerProcess

__all__ = ["BATCH_SIZE", "BATCH_TIME", "START_OVERTIME", "SpawnSkipped", "Spawner",
           "preload_for_forkserver", "stuck_start_hint"]

log = logging.getLogger(__name__)

R = TypeVar("R")  # a request: whatever the owner needs to start one process
P = TypeVar("P")  # what a start makes (a WorkerProcess, or the pool's (process, socket) pair)

BATCH_SIZE = 32
BATCH_TIME = 0.005  # seconds: a batch is delivered at the latest this long after its first start
# How long past a stop's deadline a start still under way is waited for (its process is then
# stopped as it arrives) before it is given up on: a stopped or stuck forkserver never answers,
# and a stop (a supervisor's, a process pool's close) must keep its deadline.
START_OVERTIME = 1.0


def stuck_start_hint(method: str) -> str:
    """The likely causes of a start that does not return, for log lines."""
    if method == "forkserver":
        return "is the forkserver stopped or stuck, or still importing its preload?"
    if method == "spawn":
        return ("has the new interpreter not taken its start data: stopped, or the machine "
                "overloaded?")
    return f"is the {method} start stuck?"


class _Many(Generic[R]):
    """Requests queued as one (see :meth:`Spawner.request_batch`)."""

    __slots__ = ("reqs",)

    def __init__(self, reqs: list[R]) -> None:
        self.reqs = reqs


class _Stop:
    """The end of the queue (close()), met in the middle of a batch."""


_STOP = _Stop()


class SpawnSkipped(Exception):
    """The pool began stopping before this start came up: nothing was started."""


class Spawner(Generic[R, P]):
    """Starts processes on its own thread and hands the results back in batches.

    Args:
        name: the thread's name.
        start: ``start(request) -> P``, run on the spawner thread; what it raises is delivered
            as the result.
        deliver: ``deliver(batch)`` with ``batch = [(request, P | BaseException), ...]``, run on
            the spawner thread; it hands the batch to the loop (``call_soon_threadsafe``). If
            it raises (the loop has closed), the started processes are passed to ``discard``.
        skip: ``skip() -> bool``: True once the pool is stopping; queued starts then become
            :class:`SpawnSkipped` without starting anything.
        discard: ``discard(P)``: kill and release a process nobody can take any more.
        settle: ``settle(P)``, run on the spawner thread for each process of a batch once the
            whole batch has been started, before it is delivered or discarded: what ``start``
            left for later (see :meth:`corral.process.WorkerProcess.settle`). Under fork,
            every page the supervisor writes between two forks is copied once per fork, so
            the less is done between them the faster a batch starts.
        batch_time: a batch is delivered at the latest this long (seconds) after its first
            start began (default :data:`BATCH_TIME`).
        start_many: ``start_many(requests) -> results`` for a :meth:`request_batch`, on the
            spawner thread: one result per request, None for a request it left to ``start``.
    """

    def __init__(self, name: str, start: Callable[[R], P],
                 deliver: Callable[[list[tuple[R, P | BaseException]]], None],
                 skip: Callable[[], bool], discard: Callable[[P], None],
                 settle: Callable[[P], None] | None = None,
                 batch_time: float = BATCH_TIME,
                 start_many: Callable[[list[R]], list[P | BaseException | None]] | None = None,
                 ) -> None:
        self._start = start
        self._deliver = deliver
        self._skip = skip
        self._discard = discard
        self._settle = settle
        self._batch_time = batch_time
        self._start_many = start_many
        self._queue: queue.SimpleQueue[R | _Many[R] | None] = queue.SimpleQueue()
        # The start under way and when it began (time.monotonic()), read by other threads to
        # tell a stuck start from one still queued behind others.
        self.current: tuple[R, float] | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        """Start the thread (raises what threading raises: the owner undoes its set-up)."""
        self._thread.start()

    def request(self, req: R) -> None:
        """Queue one start (any thread)."""
        self._queue.put(req)

    def request_batch(self, reqs: list[R]) -> None:
        """Queue starts that belong together (a pool's start): ``start_many`` may take them."""
        if reqs:
            self._queue.put(_Many(reqs))

    def close(self, timeout: float | None = None) -> None:
        """Let the thread finish what is queued and end; wait up to ``timeout`` for it."""
        self._queue.put(None)
        if timeout is not None and self._thread.is_alive() and (
                self._thread is not threading.current_thread()):
            self._thread.join(timeout)

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def _run(self) -> None:
        q = self._queue
        item: R | _Many[R] | _Stop | None = q.get()
        while True:
            if item is None or isinstance(item, _Stop):
                return
            if isinstance(item, _Many):
                self._run_many(item.reqs)
                item = q.get()
                continue
            began = time.monotonic()
            batch: list[tuple[R, P | BaseException]] = [(item, self._start_one(item))]
            # What follows this batch: the next request, None (close) or a request of many;
            # nothing queued (or the batch is full): wait for the next one.
            item = self._next_in_batch(len(batch), began)
            while item is not None and not isinstance(item, (_Many, _Stop)):
                batch.append((item, self._start_one(item)))
                item = self._next_in_batch(len(batch), began)
            self._hand_over(batch)
            if isinstance(item, _Stop):
                return
            if item is None:
                item = q.get()

    def _next_in_batch(self, size: int, began: float) -> R | _Many[R] | _Stop | None:
        """The next request of the batch under way; None when it is complete."""
        if size >= BATCH_SIZE or time.monotonic() - began > self._batch_time:
            return None
        try:
            item = self._queue.get_nowait()
        except queue.Empty:
            return None
        return _STOP if item is None else item

    def _start_one(self, req: R) -> P | BaseException:
        if self._skip():
            return SpawnSkipped()
        self.current = (req, time.monotonic())
        try:
            return self._start(req)
        except BaseException as exc:  # delivered as a failed start
            return exc
        finally:
            self.current = None

    def start_here(self, req: R) -> P | BaseException:
        """Start ``req`` on the calling thread, as this thread would: the process, settled, or
        the error (a process that could not be settled undone). The caller delivers it."""
        batch: list[tuple[R, P | BaseException]] = [(req, self._start_one(req))]
        if self._settle is not None:
            self._settle_batch(batch)
        return batch[0][1]

    def _run_many(self, reqs: list[R]) -> None:
        results: list[P | BaseException | None] = [None] * len(reqs)
        if self._start_many is not None and not self._skip():
            try:
                results = self._start_many(reqs)
            except BaseException as exc:  # a bug in start_many: each request fails alone
                log.exception("starting %d processes together failed", len(reqs))
                results = [exc] * len(reqs)
        # Handed over as ordinary batches are (full, or once batch_time has passed), so the
        # loop learns of slow starts (spawn, forkserver) as they come.
        batch: list[tuple[R, P | BaseException]] = []
        began = time.monotonic()
        for req, result in zip(reqs, results, strict=True):
            if not batch:
                began = time.monotonic()
            batch.append((req, self._start_one(req) if result is None else result))
            if len(batch) >= BATCH_SIZE or time.monotonic() - began > self._batch_time:
                self._hand_over(batch)
                batch = []
        self._hand_over(batch)

    def _hand_over(self, batch: list[tuple[R, P | BaseException]]) -> None:
        if self._settle is not None:
            self._settle_batch(batch)
        if batch:
            try:
                self._deliver(batch)
            except Exception:
                # Nobody will take these any more (the loop has closed): no orphans.
                for _, result in batch:
                    if not isinstance(result, BaseException):
                        with contextlib.suppress(Exception):
                            self._discard(result)

    def _settle_batch(self, batch: list[tuple[R, P | BaseException]]) -> None:
        assert self._settle is not None
        for i, (req, result) in enumerate(batch):
            if isinstance(result, BaseException):
                continue
            try:
                self._settle(result)
            except BaseException as exc:  # delivered as a failed start, the process undone
                with contextlib.suppress(Exception):
                    self._discard(result)
                batch[i] = (req, exc)


def preload_for_forkserver(ctx: BaseContext, modules: list[str]) -> None:
    """Have the forkserver import corral and the given modules once, not in every child.

    Only takes effect if the forkserver has not started yet; the list is process-wide, so we add
    to what is there rather than replace it. (CPython 3.11-3.13 never preloads ``__main__``.)
    """
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    current = list(getattr(server, "_preload_modules", None) or ["__main__"])
    wanted = ["corral._bootstrap", "corral.heartbeat",
              *(m for m in modules if isinstance(m, str) and m != "__main__")]
    missing = [m for m in wanted if m not in current]
    if missing:
        set_preload: Any = getattr(ctx, "set_forkserver_preload", None)
        if set_preload is not None:
            set_preload(current + missing)


def kill_and_reap(proc: WorkerProcess) -> None:
    """SIGKILL a process nobody wants (and its group), reap it, release it."""
    proc.kill_and_reap()
