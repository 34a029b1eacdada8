"""asyncio faces of corral: :class:`AsyncSupervisor`, :func:`run`, :class:`AsyncPool`.

A separate class, not awaitable methods on :class:`corral.Supervisor`, as the stdlib does it
(``asyncio.subprocess.Process`` beside ``subprocess.Popen``, ``asyncio.Queue`` beside
``queue.Queue``): ``sup.stop()`` and ``sup.wait()`` keep one meaning each, a type checker
tells ``await sup.stop()`` from ``sup.stop()``, and the synchronous class stays free of
asyncio. ``AsyncSupervisor.supervisor`` is the synchronous one underneath.

Nothing here blocks the event loop:

- waits on the pool's loop (``wait_ready``, ``status``...) are answered through a reply that
  wakes the event loop with ``call_soon_threadsafe``, never a blocked thread;
- events come from the supervisor's events thread, handed over in batches (one wake-up per
  batch) into a bounded inbox;
- what must block a thread (``start()``: a first process start may take tens of ms; the last
  join of ``stop()``) runs in the loop's default executor.

Slow consumers of :meth:`AsyncSupervisor.events`: each stream keeps at most ``maxsize`` events;
past that the oldest waiting one is dropped (the newest say what is happening now), counted in
:attr:`EventStream.dropped` and logged once per run of drops. The pool's final STOPPED event
is never dropped, and ends the stream. corral never waits for a consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from corral import _validate as v
from corral._reply import Reply
from corral.events import Event, EventKind
from corral.status import WorkerStatus
from corral.supervisor import _CANCEL_WAIT, Supervisor

if TYPE_CHECKING:
    from corral._monitor import Monitor
    from corral.pool import ProcessPool
    from corral.spec import PoolSpec

__all__ = ["AsyncPool", "AsyncSupervisor", "EventStream", "run", "run_task"]

log = logging.getLogger("corral.aio")

_T = TypeVar("_T")
_P = ParamSpec("_P")
_INBOX = 10_000  # events waiting for the event loop, at most (drop-oldest past it)


class _LoopReply(Reply):
    """A command's answer that also settles an asyncio future on its loop."""

    __slots__ = ("_fut", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any]) -> None:
        super().__init__()
        self._loop = loop
        self._fut = fut

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        if self.done.is_set():
            return
        super().finish(result, error)
        try:
            self._loop.call_soon_threadsafe(self._settle)
        except RuntimeError:
            pass  # the event loop is closed: nobody waits any more

    def _settle(self) -> None:
        if self._fut.done():
            return  # cancelled or timed out meanwhile
        if self.error is not None:
            self._fut.set_exception(self.error)
        else:
            self._fut.set_result(self.result)


class EventStream:
    """Events of one :class:`AsyncSupervisor`, from when the stream was made, as an async
    iterator that ends after the pool's STOPPED event.

    Attributes:
        dropped: events dropped because this consumer was too slow (see the module doc).
    """

    def __init__(self, owner: AsyncSupervisor, maxsize: int, since: int) -> None:
        self._owner = owner
        self._since = since  # the ordinal of the last event before this stream was made
        self._maxsize = maxsize
        self._items: deque[Event] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False
        self._closed = False
        self._dropping = 0
        self.dropped = 0

    def _put(self, event: Event) -> None:
        if self._closed:
            return
        if len(self._items) >= self._maxsize:  # the newest stays, STOPPED included
            self._items.popleft()
            self.dropped += 1
            self._dropping += 1
            if self._dropping == 1:
                log.warning("pool %r: an event stream is read too slowly; dropping its oldest "
                            "events (it keeps the newest %d)", self._owner.spec.name,
                            self._maxsize)
        self._items.append(event)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _end(self) -> None:
        """The pool had stopped before this stream was made: it ends at once."""
        self._ended = True

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        while not self._items:
            if self._ended or self._closed:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        event = self._items.popleft()
        if not self._items and self._dropping:
            log.warning("pool %r: %d event(s) were dropped for a slow event stream",
                        self._owner.spec.name, self._dropping)
            self._dropping = 0
        if event.kind is EventKind.STOPPED:
            self._ended = True
            self.close()
        return event

    def close(self) -> None:
        """Stop receiving events (a waiting ``__anext__`` ends the iteration)."""
        if self._closed:
            return
        self._closed = True
        self._owner._streams.discard(self)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class AsyncSupervisor:
    """A :class:`corral.Supervisor` for asyncio programs (the same arguments)::

        async with corral.AsyncSupervisor(serve, workers=4, http="127.0.0.1:9100") as sup:
            await sup.wait_ready(timeout=30)
            async for event in sup.events():
                print(event.to_json())

    Raises:
        TypeError, ValueError, NotPicklable: as :class:`corral.Supervisor`.
    """

    def __init__(self, target: Callable[..., Any] | None = None, workers: int | None = None,
                 *, spec: PoolSpec | None = None, **options: Any) -> None:
        self.supervisor = Supervisor(target, workers, spec=spec, **options)
        self._loop: asyncio.AbstractEventLoop | None = None
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            pass  # made outside the event loop: start() takes the loop it runs on
        self._streams: set[EventStream] = set()
        self._stopped = False  # the STOPPED event reached the loop
        self._stopped_waiters: list[asyncio.Future[None]] = []
        self._inbox: deque[tuple[int, Event]] = deque()  # (its ordinal in the queue, event)
        self._inbox_lock = threading.Lock()
        self._inbox_scheduled = False
        self.supervisor.subscribe(self._from_events_thread)

    @property
    def spec(self) -> PoolSpec:
        return self.supervisor.spec

    @property
    def http_address(self) -> tuple[str, int] | None:
        return self.supervisor.http_address

    # -------------------------------------------------------------------- lifecycle

    async def start(self) -> AsyncSupervisor:
        """Start every worker and the monitor (see :meth:`corral.Supervisor.start`).

        Raises:
            SupervisorStateError, TypeError, NotPicklable: as ``Supervisor.start``.
        """
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.supervisor.start)
        return self

    async def wait_ready(self, n: int | None = None, timeout: float | None = None) -> int:
        """Until ``n`` workers (default: every worker meant to run) are RUNNING and ready.

        Returns:
            How many workers are RUNNING and ready.

        Raises:
            TimeoutError: fewer were ready within ``timeout`` seconds.
            ValueError: ``n`` is more than the workers the pool means to run.
            GaveUp: the pool used up its restart budget.
            SupervisorStateError: not started, or stopped before enough workers were ready.
        """
        if n is not None:
            v.integer("n", n)
        timeout = v.timeout("timeout", timeout)
        monitor = self.supervisor._require_started()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        reply = _LoopReply(loop, fut)
        monitor.submit(monitor.do_wait_ready, n, reply=reply)
        try:
            result = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            if await self._cancel_wait(monitor, reply):  # answered before the cancel
                if reply.error is not None:
                    raise reply.error from None
                return int(reply.result or 0)
            raise TimeoutError(
                f"pool {self.spec.name!r}: fewer than {n if n is not None else 'all'} workers "
                f"ready within {timeout}s") from None
        except asyncio.CancelledError:
            monitor.call(monitor.do_cancel, reply, wait=False)
            raise
        return int(result or 0)

    @staticmethod
    async def _cancel_wait(monitor: Monitor, reply: Reply) -> bool:
        """As :meth:`corral.Supervisor._cancel_wait`, awaited: True if the monitor answered
        the wait before it took it back (even ``timeout=0`` gets the answer as of now)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        monitor.submit(monitor.do_cancel, reply, reply=_LoopReply(loop, done))
        with contextlib.suppress(TimeoutError, RuntimeError):
            await asyncio.wait_for(done, _CANCEL_WAIT)
        return reply.done.is_set()

    async def wait(self, timeout: float | None = None) -> bool:
        """Until the pool has stopped. True if it has, False on timeout.

        Raises:
            GaveUp: the pool used up its restart budget.
            SupervisorStateError: not started.
        """
        timeout = v.timeout("timeout", timeout)
        self.supervisor._require_started()
        try:
            await asyncio.wait_for(self._wait_stopped(), timeout)
        except TimeoutError:
            return False
        # The monitor thread is ending: its last join, and GaveUp if it gave up.
        return await asyncio.to_thread(self.supervisor.wait)

    async def stop(self, timeout: float | None = None) -> None:
        """Stop every worker within one deadline (see :meth:`corral.Supervisor.stop`).

        The stop signals are sent before the first await returns; if the awaiting task is
        cancelled, the stop goes on in the background.
        """
        sup = self.supervisor
        await asyncio.to_thread(sup.stop, timeout, False)
        if sup._monitor is None:
            return
        await self._wait_stopped()
        await asyncio.to_thread(sup.stop, timeout)

    async def __aenter__(self) -> AsyncSupervisor:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---------------------------------------------------------------------- control

    async def status(self) -> tuple[WorkerStatus, ...]:
        """An immutable snapshot of every worker."""
        monitor = self.supervisor._monitor
        if monitor is None:
            return ()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        monitor.submit(monitor.do_status, reply=_LoopReply(loop, fut))
        result: tuple[WorkerStatus, ...] = await fut
        return result

    async def scale(self, n: int) -> None:
        """Run ``n`` workers (see :meth:`corral.Supervisor.scale`)."""
        await asyncio.to_thread(self.supervisor.scale, n)

    async def restart(self, index: int) -> None:
        """Restart one worker now (see :meth:`corral.Supervisor.restart`)."""
        await asyncio.to_thread(self.supervisor.restart, index)

    async def restart_all(self, timeout: float | None = None) -> None:
        """Rolling restart (see :meth:`corral.Supervisor.restart_all`)."""
        await asyncio.to_thread(self.supervisor.restart_all, timeout)

    # ----------------------------------------------------------------------- events

    def events(self, maxsize: int = 1000) -> EventStream:
        """Events from now on, as an async iterator that ends after the pool's STOPPED event.

        Args:
            maxsize: events kept for a slow consumer; past it the oldest are dropped.

        Raises:
            TypeError, ValueError: ``maxsize`` is not an int >= 1.
        """
        v.integer("maxsize", maxsize, minimum=1)
        # An event the monitor emitted before this call may still be on its way (events
        # thread, inbox): the stream starts after the last one queued, not the last received.
        stream = EventStream(self, maxsize, self.supervisor._events.queued)
        if self._stopped:
            stream._end()
        else:
            self._streams.add(stream)
        return stream

    def _from_events_thread(self, event: Event) -> None:
        # The supervisor's events thread: hand over in batches, one wake-up per batch, into a
        # bounded inbox (a blocked event loop must not grow memory without bound).
        loop = self._loop
        if loop is None:
            return
        ordinal = self.supervisor._events.last_ordinal  # this event's (on the events thread)
        with self._inbox_lock:
            if len(self._inbox) >= _INBOX and event.kind is not EventKind.STOPPED:
                self._inbox.popleft()
            self._inbox.append((ordinal, event))
            if self._inbox_scheduled:
                return
            self._inbox_scheduled = True
        try:
            loop.call_soon_threadsafe(self._drain)
        except RuntimeError:
            pass  # the event loop is closed

    def _drain(self) -> None:
        with self._inbox_lock:
            batch = list(self._inbox)
            self._inbox.clear()
            self._inbox_scheduled = False
        for ordinal, event in batch:
            for stream in list(self._streams):
                if ordinal > stream._since:
                    stream._put(event)
            if event.kind is EventKind.STOPPED:
                self._stopped = True
                for fut in self._stopped_waiters:
                    if not fut.done():
                        fut.set_result(None)
                self._stopped_waiters.clear()

    async def _wait_stopped(self) -> None:
        if self._stopped:
            return
        fut = asyncio.get_running_loop().create_future()
        self._stopped_waiters.append(fut)
        try:
            await fut
        finally:
            if fut in self._stopped_waiters:
                self._stopped_waiters.remove(fut)

    def __repr__(self) -> str:
        return f"<Async{self.supervisor!r}>"


# -------------------------------------------------------------------------- process pools


async def run(pool: Executor, fn: Callable[_P, _T], /, *args: _P.args,
              **kwargs: _P.kwargs) -> _T:
    """``await fn(*args, **kwargs)`` run in ``pool`` (a :class:`corral.ProcessPool`, or any
    ``concurrent.futures.Executor``), like ``loop.run_in_executor`` but with keywords.

    Cancelling the awaiting task cancels the task: a ProcessPool kills the worker running it.
    Arguments are pickled on the calling thread (as ``run_in_executor`` does): a huge argument
    takes the event loop that long.

    Raises:
        whatever the task raised, or what the pool's futures raise (WorkerLost, TaskTimeout,
        ...); NotPicklable, PoolBroken, RuntimeError from ``submit``.
    """
    return await asyncio.wrap_future(pool.submit(fn, *args, **kwargs))


_DEFAULT: Any = object()


async def run_task(pool: ProcessPool, fn: Callable[..., _T], args: Iterable[Any] = (),
                   kwargs: dict[str, Any] | None = None, *, timeout: float | None = _DEFAULT,
                   retries: int = _DEFAULT) -> _T:
    """:meth:`corral.ProcessPool.submit_task`, awaited (per-task ``timeout``/``retries``)."""
    options: dict[str, Any] = {}
    if timeout is not _DEFAULT:
        options["timeout"] = timeout
    if retries is not _DEFAULT:
        options["retries"] = retries
    return await asyncio.wrap_future(pool.submit_task(fn, args, kwargs, **options))


class AsyncPool:
    """A :class:`corral.ProcessPool` for asyncio programs (the same arguments)::

        async with corral.aio.AsyncPool(4, task_timeout=60) as pool:
            results = await asyncio.gather(*(pool.run(work, x) for x in items))

    :meth:`of` wraps a pool that exists already.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from corral.pool import ProcessPool

        self.pool: Executor = ProcessPool(*args, **kwargs)

    @classmethod
    def of(cls, pool: Executor) -> AsyncPool:
        """Wrap an existing ProcessPool (or any Executor); shutting this down shuts it down."""
        if not isinstance(pool, Executor):
            raise TypeError(f"pool must be a corral.ProcessPool (an Executor), got {pool!r}")
        self = cls.__new__(cls)
        self.pool = pool
        return self

    async def run(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """``await fn(*args, **kwargs)`` in a worker (see :func:`run`)."""
        return await run(self.pool, fn, *args, **kwargs)

    async def run_task(self, fn: Callable[..., _T], args: Iterable[Any] = (),
                       kwargs: dict[str, Any] | None = None, *,
                       timeout: float | None = _DEFAULT, retries: int = _DEFAULT) -> _T:
        """A task with its own ``timeout``/``retries`` (see :func:`run_task`)."""
        return await run_task(self.pool, fn, args, kwargs,  # type: ignore[arg-type]
                              timeout=timeout, retries=retries)

    async def map(self, fn: Callable[..., _T], *iterables: Iterable[Any]) -> list[_T]:
        """Every ``fn(*args)`` concurrently; the results in order (the first error raises,
        and the tasks not finished yet are cancelled)."""
        futures = [asyncio.ensure_future(self.run(fn, *args))
                   for args in zip(*iterables, strict=False)]
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    async def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """``pool.shutdown`` without blocking the event loop."""
        await asyncio.to_thread(self.pool.shutdown, wait, cancel_futures=cancel_futures)

    async def __aenter__(self) -> AsyncPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    def __repr__(self) -> str:
        return f"<AsyncPool {self.pool!r}>"
