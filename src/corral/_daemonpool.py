"""A small executor of daemon threads, for calls that may never return.

``ThreadPoolExecutor``'s threads are joined when the interpreter exits, before any ``atexit``
handler runs: a user's health check that hangs (a network call without a timeout) would keep
the program alive for good after its pool stopped. Here the threads are daemons: a call that
never returns costs its thread, never the program's exit.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

__all__ = ["DaemonExecutor", "NoThread"]


class NoThread(RuntimeError):
    """A call that no thread can run: none could be started (a limit on threads or processes,
    such as a full pids cgroup) and none is running to take it later."""

T = TypeVar("T")

# (future, fn, args, kwargs), or None: a thread's signal to end.
_Item = tuple["Future[Any]", Callable[..., Any], tuple[Any, ...], dict[str, Any]] | None


def _work(items: queue.SimpleQueue[_Item], idle: threading.Semaphore) -> None:
    # The thread holds the queue, not the executor: an executor dropped without shutdown()
    # is finalized, and its threads told to end.
    while True:
        item = items.get()
        if item is None:
            return
        future, fn, args, kwargs = item
        del item
        if future.set_running_or_notify_cancel():
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                future.set_exception(exc)
                del exc
            else:
                future.set_result(result)
                del result
        del future, fn, args, kwargs
        idle.release()


def _end_threads(items: queue.SimpleQueue[_Item], n: int) -> None:
    for _ in range(n):
        items.put(None)


class DaemonExecutor(Executor):
    """Up to ``max_workers`` daemon threads, started as calls need them.

    Args:
        max_workers: the most threads at once (>= 1).
        thread_name_prefix: threads are named ``<prefix>_<n>``.
    """

    def __init__(self, max_workers: int, thread_name_prefix: str) -> None:
        if isinstance(max_workers, bool) or not isinstance(max_workers, int):
            raise TypeError(f"max_workers must be an int, got {max_workers!r}")
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers!r}")
        self._max = max_workers
        self._prefix = thread_name_prefix
        self._items: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._closed = False
        weakref.finalize(self, _end_threads, self._items, max_workers).atexit = False

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Run ``fn(*args, **kwargs)`` on one of the threads.

        Raises:
            RuntimeError: after :meth:`shutdown`.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new calls after shutdown")
            future: Future[T] = Future()
            # A thread that finished a call and waits for the next takes it; else a new one.
            if not self._idle.acquire(blocking=False) and len(self._threads) < self._max:
                thread = threading.Thread(target=_work, args=(self._items, self._idle),
                                          name=f"{self._prefix}_{len(self._threads)}",
                                          daemon=True)
                try:
                    thread.start()
                except RuntimeError as exc:  # "can't start new thread": EAGAIN from clone
                    if not self._threads:  # nobody to take it later: the call fails now
                        future.set_exception(NoThread(
                            f"no thread could be started for the call ({exc}): a limit on "
                            "threads or processes (RLIMIT_NPROC, a pids cgroup) is reached"))
                        return future
                else:
                    self._threads.append(thread)
            self._items.put((future, fn, args, kwargs))
            return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new calls; idle threads end. With ``cancel_futures``, calls not yet begun are
        cancelled; with ``wait``, waits for the running ones (a hung one: forever)."""
        with self._lock:
            self._closed = True
            if cancel_futures:
                while True:
                    try:
                        item = self._items.get_nowait()
                    except queue.Empty:
                        break
                    if item is not None:
                        item[0].cancel()
            _end_threads(self._items, len(self._threads))
            threads = list(self._threads)
        if wait:
            for thread in threads:
                thread.join()
