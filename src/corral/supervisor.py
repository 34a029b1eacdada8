"""The public face of a pool: :class:`Supervisor`."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import math
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from corral import _validate as v
from corral._eventqueue import DRAIN, EventQueue
from corral._fdlimit import ensure_fd_room
from corral._identity import worker_settings
from corral._keeper import keeper
from corral._monitor import Monitor
from corral._reactor import Reactor
from corral._workerio import WorkerIO
from corral.errors import SupervisorStateError
from corral.events import Event, EventKind, ExitRecord
from corral.spec import PoolSpec
from corral.status import WorkerStatus

if TYPE_CHECKING:
    from corral._reply import Reply
    from corral._stats import StatsSnapshot
    from corral.endpoint import Endpoint

__all__ = ["Supervisor"]

log = logging.getLogger("corral.supervisor")

_running: weakref.WeakSet[Supervisor] = weakref.WeakSet()
# How long stop() waits for the subscribers' thread to deliver the last events: what is left
# of its deadline, at least _EVENTS_WAIT_MIN and at most the queue's drain time.
_EVENTS_WAIT_MIN = 0.1
# How long a wait_ready() whose time is up waits for the monitor to take the wait back (and
# answer it, if it can): microseconds unless the loop is wedged.
_CANCEL_WAIT = 0.25
# How long past its deadline stop() waits for the monitor (which kills at the deadline) before
# it kills the workers itself, and again after that.
_STOP_MARGIN = 2.0


@atexit.register
def _stop_all_at_exit() -> None:
    # A program that forgets stop() must not leave workers behind (or hang in multiprocessing's
    # own exit handler, which would join non-daemon workers forever).
    for sup in list(_running):
        if sup._owner_pid != os.getpid():
            continue  # a forked child: not ours to stop (and no monitor here to wait for)
        try:
            sup.stop()
        except Exception:
            log.exception("stopping pool %r at exit failed", sup.spec.name)


def _after_fork_in_child() -> None:
    # The child of os.fork() in a supervising program has no monitor thread: its copies of the
    # parent's supervisors refuse to work (RuntimeError) and exit must not wait for them.
    _running.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Supervisor:
    """Starts N workers running ``target(index, *args)`` and keeps them alive.

    Either pass the options of :class:`~corral.PoolSpec` as keywords, or a ready ``spec``::

        with Supervisor(serve, workers=4, heartbeat_timeout=5) as sup:
            sup.wait()

    Args:
        http: serve /metrics, /livez, /readyz and /status at this "HOST:PORT" while the pool
            runs (``"127.0.0.1:9100"``; port 0: any free port, see :attr:`http_address`).
            None: no endpoint. See :mod:`corral.endpoint`.
        min_ready: workers that must be RUNNING and ready for /readyz to answer 200 (default
            None: every worker meant to run); at most ``workers``.

    Raises:
        TypeError, ValueError: an invalid option, naming it (at construction).
        NotPicklable: the target cannot be sent to a spawn/forkserver child.
    """

    def __init__(self, target: Callable[..., Any] | None = None, workers: int | None = None, *,
                 spec: PoolSpec | None = None, http: str | None = None,
                 min_ready: int | None = None, _host: Reactor[Any] | None = None,
                 _io: WorkerIO | None = None,
                 _start_process: Callable[[Any], Any] | None = None, **options: Any) -> None:
        if spec is not None:
            if target is not None or workers is not None or options:
                raise TypeError("pass either spec= or target/workers/options, not both")
            if not isinstance(spec, PoolSpec):
                raise TypeError(f"spec must be a corral.PoolSpec, got {spec!r}")
            self.spec = spec
        else:
            if target is None and options.get("command") is None:
                raise TypeError("Supervisor() needs a target, a command= or a spec=")
            if workers is not None:
                options["workers"] = workers
            self.spec = PoolSpec(target, **options)
        worker_settings(self.spec)  # an unknown user, a missing cwd: refused here, not at start
        if self.spec.start_method == "fork" and self.spec.command is None:
            # What start() will fork its first workers with, loaded now (ctypes, platform:
            # ~4 ms) so that start() does not wait for an import; `import corral` skips it.
            from corral import _template  # noqa: F401
        # Internal (the corral command): run the monitor on the caller's reactor, with log
        # pipes and notify sockets.
        self._host = _host
        self._io = _io
        # Internal (corral serve): how each worker process is started (a zygote's fork).
        self._start_process = _start_process
        self._monitor: Monitor | None = None
        self._subscribers: list[Callable[[Event], None]] = []
        self._events = EventQueue(self.spec.name)
        self._dispatcher: threading.Thread | None = None
        self._prepared: dict[int, tuple[str, tuple[Any, ...]]] = {}
        self._lock = threading.Lock()
        self._owner_pid = os.getpid()
        if http is not None:
            from corral._observe import parse_address

            parse_address(http, "http")
        if min_ready is not None:
            v.integer("min_ready", min_ready)
            if min_ready > self.spec.workers:
                # /readyz could never pass (scale() up first, then ask for more).
                raise ValueError(f"min_ready must be <= workers ({self.spec.workers}), got "
                                 f"{min_ready}")
        self._http = http
        self.min_ready = min_ready
        self._endpoint: Endpoint | None = None
        self._started_at: float | None = None

    # ------------------------------------------------------------------------------ lifecycle

    def start(self) -> Supervisor:
        """Start every worker and the monitor; returns at once (see :meth:`wait_ready`).

        Raises:
            SupervisorStateError: ``start()`` was already called.
            TypeError, NotPicklable: ``names``/``args`` returned something unusable. Nothing
                has been started when this is raised.
        """
        self._check_owner()
        with self._lock:
            if self._monitor is not None:
                raise SupervisorStateError(
                    f"pool {self.spec.name!r} was already started; make a new Supervisor")
            initial = self._prepare(self.spec.workers)
            ensure_fd_room(self.spec.workers)
            # The endpoint first: an address in use fails start() before any process exists.
            endpoint = self._start_endpoint()
            try:
                # Gated: its Python starts once the first workers are forked (the monitor
                # opens the gate), not beside them.
                keeper.start(gated=True)
            except BaseException:
                self._close_endpoint(endpoint)
                raise
            # The monitor's resources first (they can fail: no shared memory, no fds), then the
            # threads, each undone if a later one cannot start: nothing is left behind.
            try:
                monitor = Monitor(self.spec, self._emit, host=self._host, io=self._io,
                                  start_process=self._start_process)
            except BaseException:
                keeper.open_gate()  # no pool to open it
                self._close_endpoint(endpoint)
                raise
            if self._subscribers:  # else it starts with the first subscribe()
                try:
                    self._start_dispatcher()
                except BaseException:
                    monitor.discard()
                    self._close_endpoint(endpoint)
                    raise
            try:
                monitor.start([initial[i] for i in range(self.spec.workers)])
            except BaseException:
                monitor.discard()
                self._close_endpoint(endpoint)
                self._events.put(Event(EventKind.STOPPED, self.spec.name, None, None, None,
                                       time.time(), message="failed to start"))
                raise
            self._started_at = time.time()
            self._monitor = monitor
            _running.add(self)
        log.info("pool %r: starting %d worker(s) (start method %s)", self.spec.name,
                 self.spec.workers, self.spec.start_method)
        return self

    def _start_endpoint(self) -> Endpoint | None:
        if self._http is None:
            return None
        from corral.endpoint import Endpoint

        self._endpoint = Endpoint(self._http, pools=[self]).start()
        return self._endpoint

    def _close_endpoint(self, endpoint: Endpoint | None, wait: bool = True) -> None:
        if endpoint is not None:
            endpoint.close(wait=wait)
            self._endpoint = None

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

        The stop signal reaches every live worker's process group before this returns, sent
        from the calling thread, even with ``wait=False``: a program that exits right after
        still stops its workers' children. Idempotent and callable from any thread.

        Args:
            timeout: seconds for the whole pool (default None: the spec's ``stop_timeout``);
                0 kills at once; ``math.inf``: no SIGKILL, wait for the workers to exit.
            wait: block until every worker has been reaped (if the monitor thread is held
                up past the deadline, say by a lock the calling thread holds, the workers are
                killed from this thread and stop() returns at most 4 s past the deadline;
                the monitor reaps them once it can). Subscribers get what is left of
                the deadline (at least 0.1 s, at most 1 s) to take the last events; one that
                blocks does not hold stop() up, and a second after the pool's STOPPED event
                what they have not taken is dropped (the STOPPED event itself is delivered).

        Raises:
            TypeError, ValueError: ``timeout`` is not None or a number >= 0 (nan included).
        """
        grace = self.spec.stop_timeout if timeout is None else v.timeout("timeout", timeout)
        if grace is None:
            grace = math.inf
        v.boolean("wait", wait)
        called = time.monotonic()
        self._check_owner()
        with self._lock:  # a start() in progress finishes first, then is stopped
            monitor = self._monitor
        if monitor is None:
            return
        if not monitor.finished.is_set():
            with contextlib.suppress(RuntimeError):  # it finished meanwhile
                monitor.request_stop(grace, signal_for(self.spec, grace))
        if wait and self._wait_for_monitor(monitor, called, grace):
            # Its last line is logged after it finished: bounded, as above.
            monitor.join(_STOP_MARGIN)
            dispatcher = self._dispatcher
            if dispatcher is not None and dispatcher is not threading.current_thread():
                left = called + grace - time.monotonic()
                dispatcher.join(timeout=min(DRAIN, max(_EVENTS_WAIT_MIN, left)))
        # The endpoint answers 503 on /readyz while the pool stops; it goes with the pool.
        self._close_endpoint(self._endpoint, wait=wait)
        _running.discard(self)

    def _wait_for_monitor(self, monitor: Monitor, called: float, grace: float) -> bool:
        """Wait for the monitor to finish a stop: True once it has. It kills at the deadline
        and reaps at once; if it has not finished :data:`_STOP_MARGIN` past it, something holds
        it up (a lock this very thread holds: stop() called from a signal handler that
        interrupted a log write through a handler the monitor needs), and the workers' groups
        are sent SIGKILL from this thread; False if it still has not finished by then."""
        if math.isinf(grace):
            monitor.finished.wait()
            return True
        left = called + grace + _STOP_MARGIN - time.monotonic()
        if monitor.finished.wait(min(max(0.0, left), threading.TIMEOUT_MAX)):
            return True
        with contextlib.suppress(RuntimeError):  # it finished meanwhile
            monitor.request_stop(0.0, signal.SIGKILL)
        if monitor.finished.wait(_STOP_MARGIN):
            return True
        # Logged from a thread of its own: this thread may be inside a handler's emit (a
        # signal handler), where a record of ours would be a reentrant write.
        threading.Thread(target=log.warning, name="corral-stop-warning", daemon=True, args=(
            "pool %r: its monitor thread did not finish within %.1f s of the stop deadline; "
            "every worker's process group was sent SIGKILL from the thread that called stop(). "
            "Likely cause: stop() called from a signal handler that interrupted a log write the "
            "monitor waits for, or a logging handler that blocks. The monitor reaps the "
            "workers once it can go on.", self.spec.name, 2 * _STOP_MARGIN)).start()
        return False

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the pool has stopped. True if it has, False on timeout.

        Raises:
            GaveUp: the pool used up its restart budget (carries the last exits).
        """
        timeout = v.timeout("timeout", timeout)
        monitor = self._require_started()
        if not monitor.finished.wait(timeout):
            return False
        monitor.join(_STOP_MARGIN)  # (its last line, logged after it finished: see stop())
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
        """Run ``n`` workers: start new ones, or stop the highest-numbered gracefully.

        Raises:
            TypeError, ValueError: ``n`` is not an int >= 0.
            OSError: no room for the heartbeats of ``n`` workers (shared memory) or their fds.
        """
        v.count("n", n)
        monitor = self._require_started()
        prepared = self._prepare(n)
        ensure_fd_room(n)
        monitor.call(monitor.do_scale, n, prepared)

    def restart(self, index: int) -> None:
        """Restart one worker now (gracefully; no backoff, not counted in the budget).

        Raises:
            TypeError, ValueError: ``index`` is not an int >= 0 (a bool is refused).
            IndexError: there is no worker with that index.
        """
        v.index("index", index)
        monitor = self._require_started()
        monitor.call(monitor.do_restart, index)

    def restart_all(self, timeout: float | None = None) -> None:
        """Rolling restart: one worker at a time, each replacement ready before the next.

        Raises:
            TimeoutError: not finished within ``timeout`` (it carries on in the background).
            RestartFailed: a replacement ended (or could not be started) before it was ready:
                the restart stopped there, and the workers not yet restarted keep running.
        """
        timeout = v.timeout("timeout", timeout)
        monitor = self._require_started()
        monitor.call(monitor.do_restart_all, timeout=timeout)

    def wait_ready(self, n: int | None = None, timeout: float | None = None) -> int:
        """Block until ``n`` workers (default: every worker meant to run) are RUNNING.

        Returns:
            How many workers are RUNNING and ready.

        Raises:
            TimeoutError: fewer were ready within ``timeout``.
            ValueError: ``n`` is more than the workers the pool means to run (at the call, or
                after a scale-down while waiting): it could never be reached.
            GaveUp: the pool used up its restart budget (now or before the call).
            SupervisorStateError: the pool stopped before enough workers were ready.
        """
        if n is not None:
            v.integer("n", n)
        timeout = v.timeout("timeout", timeout)
        monitor = self._require_started()
        cmd = monitor.submit(monitor.do_wait_ready, n)
        if not cmd.done.wait(timeout) and not self._cancel_wait(monitor, cmd):
            raise TimeoutError(
                f"pool {self.spec.name!r}: fewer than {n if n is not None else 'all'} workers "
                f"ready within {timeout}s")
        if cmd.error is not None:
            raise cmd.error
        return int(cmd.result or 0)

    @staticmethod
    def _cancel_wait(monitor: Monitor, cmd: Reply) -> bool:
        """Withdraw a wait whose time is up. True if the monitor had answered it first: the
        question reaches the monitor thread, so even ``timeout=0`` gets the answer as of now
        (an idle monitor takes microseconds; a wedged one is given up on after
        :data:`_CANCEL_WAIT`)."""
        with contextlib.suppress(TimeoutError, RuntimeError):
            monitor.call(monitor.do_cancel, cmd, timeout=_CANCEL_WAIT)
        return cmd.done.is_set()

    # ------------------------------------------------------------------------------ inspection

    def status(self, timeout: float | None = None) -> tuple[WorkerStatus, ...]:
        """An immutable snapshot of every worker.

        Raises:
            TimeoutError: the monitor did not answer within ``timeout`` seconds (None: no
                limit; it answers within microseconds unless it is wedged).
        """
        timeout = v.timeout("timeout", timeout, positive=True)
        self._check_owner()
        monitor = self._monitor
        if monitor is None:
            return ()
        try:
            result: tuple[WorkerStatus, ...] = monitor.call(monitor.do_status, timeout=timeout)
        except TimeoutError:
            raise TimeoutError(f"pool {self.spec.name!r}: its monitor thread did not answer "
                               f"status() within {timeout:g}s (busy, or its loop is wedged: "
                               "see ping())") from None
        return result

    def ping(self, timeout: float | None = 1.0) -> bool:
        """True if the pool's monitor thread answers within ``timeout`` seconds (a liveness
        probe: False once the pool has stopped, or if its loop is wedged).

        Raises:
            TypeError, ValueError: ``timeout`` is not None or a number > 0 (an answer takes
                some time: 0 could only ever say False).
        """
        limit = v.timeout("timeout", timeout, positive=True)
        monitor = self._monitor
        return (monitor is not None and os.getpid() == self._owner_pid
                and monitor.ping(limit))

    def stats_snapshot(self) -> StatsSnapshot | None:
        """The pool's counters (restarts by reason, exits by cause, restart latency, budget),
        None before start(). For metrics; see :mod:`corral.metrics`."""
        monitor = self._monitor
        if monitor is None:
            return None
        snap = monitor.stats.snapshot()
        # The snapshot is shared with later readers while nothing changes: the caller gets
        # dicts of its own.
        return dataclasses.replace(snap, restarts=dict(snap.restarts), exits=dict(snap.exits))

    @property
    def http_address(self) -> tuple[str, int] | None:
        """(host, port) the ``http=`` endpoint is bound to while the pool runs, else None."""
        endpoint = self._endpoint
        return None if endpoint is None else endpoint.address

    def pids(self) -> list[int]:
        """Pids of the worker processes alive now (hot standbys not included)."""
        return [s.pid for s in self.status() if s.pid is not None and s.alive and not s.standby]

    def history(self) -> tuple[ExitRecord, ...]:
        """The most recent exits, oldest first."""
        self._check_owner()
        return self._monitor.history() if self._monitor else ()

    @property
    def running(self) -> bool:
        """True from start() until the pool has stopped; False in a forked child (the pool
        runs in the parent)."""
        return (self._monitor is not None and not self._monitor.finished.is_set()
                and os.getpid() == self._owner_pid)

    # ------------------------------------------------------------------------------- events

    def subscribe(self, callback: Callable[[Event], None]) -> None:
        """Call ``callback(event)`` for every lifecycle event, on a separate thread."""
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {callback!r}")
        with self._lock:
            self._subscribers.append(callback)
            if self._monitor is not None:
                self._start_dispatcher()

    def _start_dispatcher(self) -> None:
        """The subscribers' thread, started with the first subscriber (under ``_lock``)."""
        if self._dispatcher is not None:
            return
        dispatcher = threading.Thread(target=self._dispatch_events,
                                      name=f"corral-events[{self.spec.name}]", daemon=True)
        dispatcher.start()
        self._dispatcher = dispatcher

    def unsubscribe(self, callback: Callable[[Event], None]) -> None:
        """Stop calling ``callback``.

        Raises:
            ValueError: ``callback`` is not subscribed.
        """
        try:
            self._subscribers.remove(callback)
        except ValueError:
            raise ValueError(f"callback {callback!r} is not subscribed to pool "
                             f"{self.spec.name!r}") from None

    def _emit(self, event: Event) -> None:
        # With nobody subscribed an event costs nothing (no events thread at all); STOPPED
        # always goes through, it ends that thread.
        if self._subscribers or event.kind is EventKind.STOPPED:
            self._events.put(event)

    def _dispatch_events(self) -> None:
        while True:
            event = self._events.get()
            for callback in list(self._subscribers):
                try:
                    callback(event)
                except Exception:
                    log.exception("event subscriber %r failed on %s", callback, event.kind.value)
            if event.kind is EventKind.STOPPED:
                return

    def _check_owner(self) -> None:
        if os.getpid() != self._owner_pid:
            raise RuntimeError(
                f"pool {self.spec.name!r} belongs to process {self._owner_pid}; this is a forked "
                f"child (pid {os.getpid()}), which has no monitor. Make a new Supervisor here.")

    def _require_started(self) -> Monitor:
        self._check_owner()
        if self._monitor is None:
            raise SupervisorStateError(f"pool {self.spec.name!r} has not been started")
        return self._monitor

    def __repr__(self) -> str:
        state = "running" if self.running else ("stopped" if self._monitor else "new")
        return f"<Supervisor {self.spec.name!r} {state} workers={self.spec.workers}>"




def signal_for(spec: PoolSpec, grace: float) -> int:
    """The signal a stop with ``grace`` seconds sends first: SIGKILL for no grace at all."""
    return signal.SIGKILL if grace <= 0 else int(spec.stop_signal)
