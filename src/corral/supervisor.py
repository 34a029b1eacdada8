"""The public face of a pool: :class:`Supervisor`."""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any

from corral._monitor import Monitor
from corral.errors import SupervisorStateError
from corral.events import Event, EventKind, ExitRecord
from corral.spec import PoolSpec
from corral.status import WorkerStatus

__all__ = ["Supervisor"]

log = logging.getLogger("corral.supervisor")

_running: weakref.WeakSet[Supervisor] = weakref.WeakSet()


@atexit.register
def _stop_all_at_exit() -> None:
    # A program that forgets stop() must not leave workers behind (or hang in multiprocessing's
    # own exit handler, which would join non-daemon workers forever).
    for sup in list(_running):
        try:
            sup.stop()
        except Exception:
            log.exception("stopping pool %r at exit failed", sup.spec.name)


class Supervisor:
    """Starts N workers running ``target(index, *args)`` and keeps them alive.

    Either pass the options of :class:`~corral.PoolSpec` as keywords, or a ready ``spec``::

        with Supervisor(serve, workers=4, heartbeat_timeout=5) as sup:
            sup.wait()

    Raises:
        TypeError, ValueError: an invalid option, naming it (at construction).
        NotPicklable: the target cannot be sent to a spawn/forkserver child.
    """

    def __init__(self, target: Callable[..., Any] | None = None, workers: int | None = None, *,
                 spec: PoolSpec | None = None, **options: Any) -> None:
        if spec is not None:
            if target is not None or workers is not None or options:
                raise TypeError("pass either spec= or target/workers/options, not both")
            if not isinstance(spec, PoolSpec):
                raise TypeError(f"spec must be a corral.PoolSpec, got {spec!r}")
            self.spec = spec
        else:
            if target is None:
                raise TypeError("Supervisor() needs a target (or spec=)")
            if workers is not None:
                options["workers"] = workers
            self.spec = PoolSpec(target, **options)
        self._monitor: Monitor | None = None
        self._subscribers: list[Callable[[Event], None]] = []
        self._events: queue.SimpleQueue[Event | None] = queue.SimpleQueue()
        self._dispatcher: threading.Thread | None = None
        self._prepared: dict[int, tuple[str, tuple[Any, ...]]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------ lifecycle

    def start(self) -> Supervisor:
        """Start every worker and the monitor; returns at once (see :meth:`wait_ready`).

        Raises:
            SupervisorStateError: ``start()`` was already called.
            TypeError, NotPicklable: ``names``/``args`` returned something unusable. Nothing
                has been started when this is raised.
        """
        with self._lock:
            if self._monitor is not None:
                raise SupervisorStateError(
                    f"pool {self.spec.name!r} was already started; make a new Supervisor")
            initial = self._prepare(self.spec.workers)
            self._dispatcher = threading.Thread(target=self._dispatch_events,
                                                name=f"corral-events[{self.spec.name}]",
                                                daemon=True)
            self._dispatcher.start()
            self._monitor = Monitor(self.spec, self._events.put)
            self._monitor.start([initial[i] for i in range(self.spec.workers)])
            _running.add(self)
        log.info("pool %r: starting %d worker(s) (start method %s)", self.spec.name,
                 self.spec.workers, self.spec.start_method)
        return self

    def _prepare(self, n: int) -> dict[int, tuple[str, tuple[Any, ...]]]:
        """Names and args for indexes < n, computed in the caller's thread so errors surface."""
        out = {}
        for index in range(n):
            if index not in self._prepared:
                out[index] = (self.spec.worker_name(index), self.spec.worker_args(index))
            else:
                out[index] = self._prepared[index]
        self._prepared.update(out)
        return out

    def stop(self, timeout: float | None = None, wait: bool = True) -> None:
        """Stop every worker: the stop signal to all at once, one deadline, then SIGKILL.

        Idempotent and callable from any thread.

        Args:
            timeout: seconds for the whole pool (default: the spec's ``stop_timeout``);
                0 kills at once.
            wait: block until every worker has been reaped.
        """
        if timeout is not None and (isinstance(timeout, bool)
                                    or not isinstance(timeout, int | float) or timeout < 0):
            raise ValueError(f"timeout must be None or a number >= 0, got {timeout!r}")
        with self._lock:  # a start() in progress finishes first, then is stopped
            monitor = self._monitor
        if monitor is None:
            return
        if not monitor.finished.is_set():
            monitor.call("stop", timeout, wait=False)
        if wait:
            monitor.finished.wait()
            monitor.join()
            dispatcher = self._dispatcher
            if dispatcher is not None and dispatcher is not threading.current_thread():
                dispatcher.join(timeout=5)
        _running.discard(self)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the pool has stopped. True if it has, False on timeout.

        Raises:
            GaveUp: the pool used up its restart budget (carries the last exits).
        """
        monitor = self._require_started()
        if not monitor.finished.wait(timeout):
            return False
        monitor.join()
        _running.discard(self)
        if monitor.gave_up is not None:
            raise monitor.gave_up
        return True

    def __enter__(self) -> Supervisor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------ control

    def scale(self, n: int) -> None:
        """Run ``n`` workers: start new ones, or stop the highest-numbered gracefully."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        monitor = self._require_started()
        prepared = self._prepare(n)
        monitor.call("scale", n, prepared)

    def restart(self, index: int) -> None:
        """Restart one worker now (gracefully; no backoff, not counted in the budget)."""
        self._require_started().call("restart", index)

    def restart_all(self, timeout: float | None = None) -> None:
        """Rolling restart: one worker at a time, each replacement ready before the next.

        Raises:
            TimeoutError: not finished within ``timeout`` (it carries on in the background).
        """
        self._require_started().call("restart_all", timeout=timeout)

    def wait_ready(self, n: int | None = None, timeout: float | None = None) -> int:
        """Block until ``n`` workers (default: all) are RUNNING; return how many are.

        Raises:
            TimeoutError: fewer were ready within ``timeout``.
        """
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ValueError(f"n must be None or an int >= 0, got {n!r}")
        monitor = self._require_started()
        cmd = monitor.submit("wait_ready", n)
        if not cmd.done.wait(timeout):
            monitor.call("cancel", cmd, wait=False)
            raise TimeoutError(
                f"pool {self.spec.name!r}: fewer than {n if n is not None else 'all'} workers "
                f"ready within {timeout}s")
        if cmd.error is not None:
            raise cmd.error
        return int(cmd.result or 0)

    # ------------------------------------------------------------------------------ inspection

    def status(self) -> tuple[WorkerStatus, ...]:
        """An immutable snapshot of every worker."""
        monitor = self._monitor
        if monitor is None:
            return ()
        result: tuple[WorkerStatus, ...] = monitor.call("status")
        return result

    def pids(self) -> list[int]:
        """Pids of the worker processes alive now."""
        return [s.pid for s in self.status() if s.pid is not None and s.alive]

    def history(self) -> tuple[ExitRecord, ...]:
        """The most recent exits, oldest first."""
        return self._monitor.history() if self._monitor else ()

    @property
    def running(self) -> bool:
        return self._monitor is not None and not self._monitor.finished.is_set()

    # ------------------------------------------------------------------------------- events

    def subscribe(self, callback: Callable[[Event], None]) -> None:
        """Call ``callback(event)`` for every lifecycle event, on a separate thread."""
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {callback!r}")
        self._subscribers.append(callback)

    def unsubscribe(self, callback: Callable[[Event], None]) -> None:
        self._subscribers.remove(callback)

    def _dispatch_events(self) -> None:
        while True:
            event = self._events.get()
            if event is None:
                return
            for callback in list(self._subscribers):
                try:
                    callback(event)
                except Exception:
                    log.exception("event subscriber %r failed on %s", callback, event.kind.value)
            if event.kind is EventKind.STOPPED:
                return

    def _require_started(self) -> Monitor:
        if self._monitor is None:
            raise SupervisorStateError(f"pool {self.spec.name!r} has not been started")
        return self._monitor

    def __repr__(self) -> str:
        state = "running" if self.running else ("stopped" if self._monitor else "new")
        return f"<Supervisor {self.spec.name!r} {state} workers={self.spec.workers}>"


