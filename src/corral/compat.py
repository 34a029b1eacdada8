"""The ``WorkerProcessManager`` API of the Duck web framework, running on corral.

Code written for ``duck.utils.multiprocessing.process_manager`` runs here by changing only the
import line::

    from corral import WorkerProcessManager, HeartbeatHealthCheck, HeartbeatUpdateNeverCalled

    manager = WorkerProcessManager(worker_fn=serve, num_workers=4,
                                   health_check_fn=HeartbeatHealthCheck(heartbeat_timeout=3),
                                   restart_timeout=2, process_stop_timeout=3)
    manager.start()
    ...
    manager.stop()

Each ``start()`` builds one :class:`corral.Supervisor` from the manager's attributes, so it gets
corral's event-driven monitor: a dead worker is noticed at once and restarted ``restart_timeout``
seconds later without delaying the others, one stop deadline for the whole pool, SIGKILL for
workers that ignore SIGTERM, process groups, no orphans, and every start method.

Where the original's behaviour was a defect, the fixed behaviour is documented on the method;
README.md ("Coming from Duck's WorkerProcessManager") lists every difference.
"""

from __future__ import annotations

import functools
import logging
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from corral import _validate as v
from corral.errors import CorralError, SupervisorStateError
from corral.events import Event, EventKind, StopReason
from corral.heartbeat import beat
from corral.policy import Backoff, RestartBudget
from corral.process import pid_running, wait_exit
from corral.spec import START_METHODS, check_picklable
from corral.status import WorkerStatus
from corral.supervisor import Supervisor

__all__ = [
    "HeartbeatHealthCheck",
    "HeartbeatUpdateNeverCalled",
    "WorkerProcessInfo",
    "WorkerProcessManager",
]

# process_stop_timeout=None meant "join forever" in the original, so one worker that ignores
# SIGTERM hung stop() for good. Here it means "as long as a graceful stop reasonably takes".
STOP_TIMEOUT_CEILING = 60.0
# A worker must beat within max(STARTUP_GRACE_FACTOR * heartbeat_timeout, STARTUP_GRACE_MIN)
# of its start, unless HeartbeatHealthCheck(startup_grace=...) says otherwise.
STARTUP_GRACE_FACTOR = 10.0
STARTUP_GRACE_MIN = 30.0
# start() returns once every worker has a process, as the original did, but never waits longer.
SPAWN_WAIT = 60.0

_pool_numbers = iter(range(1, 2**62))
_pool_numbers_lock = threading.Lock()


class HeartbeatUpdateNeverCalled(CorralError):
    """Raised by :meth:`HeartbeatHealthCheck.check_health` if no worker has ever beaten."""


class HeartbeatHealthCheck:
    """Health check by heartbeat: each worker calls ``update_heartbeat(idx)`` from its work loop.

    Pass it as ``health_check_fn``; the manager then hands it to every worker as its second
    argument::

        healthcheck = HeartbeatHealthCheck(heartbeat_timeout=3)

        def worker_fn(idx, healthcheck, *args):
            while True:
                healthcheck.update_heartbeat(idx)
                ...  # some work

    Under the hood a beat is :func:`corral.beat`: a monotonic stamp in shared memory (~100 ns, no
    Manager process, no lock), and it pickles to spawn and forkserver children. The manager
    watches the beats itself (corral's heartbeat liveness, not a polled check): a worker silent
    for ``heartbeat_timeout`` seconds is hung; its stack is dumped to the log and it is killed and
    restarted. Before its first beat a worker is in its startup grace instead, so a worker that
    boots slowly is not killed in a loop.

    Args:
        heartbeat_timeout: seconds without a beat after which a worker is hung.
        startup_grace: seconds a new worker may take to beat for the first time (new; default
            ``max(10 * heartbeat_timeout, 30)``).

    Raises:
        TypeError, ValueError: a timeout that is not a positive number.
    """

    def __init__(self, heartbeat_timeout: float, startup_grace: float | None = None) -> None:
        self.heartbeat_timeout = v.number("heartbeat_timeout", heartbeat_timeout, strict=True)
        if startup_grace is None:
            # (capped: ten times a huge timeout would overflow to inf, which is refused)
            startup_grace = min(max(STARTUP_GRACE_FACTOR * self.heartbeat_timeout,
                                    STARTUP_GRACE_MIN), sys.float_info.max)
        self.startup_grace = v.number("startup_grace", startup_grace, strict=True)
        # The manager whose workers this check watches: set by the manager, never pickled.
        self._manager: weakref.ref[WorkerProcessManager] | None = None
        self._ever_beat = False

    def __getstate__(self) -> dict[str, Any]:
        # A worker only needs the numbers; the manager link and flags stay in the supervisor.
        return {"heartbeat_timeout": self.heartbeat_timeout, "startup_grace": self.startup_grace}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.heartbeat_timeout = state["heartbeat_timeout"]
        self.startup_grace = state["startup_grace"]
        self._manager = None
        self._ever_beat = False

    def update_heartbeat(self, idx: int) -> None:
        """Record a beat of this worker (call it from the work loop, in the worker).

        ``idx`` is accepted for compatibility: a worker always beats in its own slot. Outside
        a corral worker (a process this manager did not start) it does nothing.

        Raises:
            RuntimeError: called in the main process rather than in a worker.
        """
        if multiprocessing.parent_process() is None:
            raise RuntimeError("This method must be used in a child process, not main process.")
        beat()

    def check_health(self, process: Any, idx: int) -> bool:
        """True if worker ``idx`` beat within ``heartbeat_timeout`` seconds, else False.

        Call it in the process that runs the manager. ``process`` is accepted for compatibility
        and not used.

        Raises:
            TypeError, ValueError: ``idx`` is not a worker index (an int >= 0).
            HeartbeatUpdateNeverCalled: no worker of the manager has ever called
                ``update_heartbeat`` (or this check is not the ``health_check_fn`` of a running
                manager): the heartbeat is probably not wired up.
        """
        v.index("idx", idx)
        manager = self._manager() if self._manager is not None else None
        ages = manager._heartbeat_ages() if manager is not None else {}
        if any(age is not None for age in ages.values()):
            self._ever_beat = True
        if not self._ever_beat:
            raise HeartbeatUpdateNeverCalled(
                "Heartbeats are empty, meaning you may not be calling `update_heartbeat` in your "
                "child process.")
        age = ages.get(idx)
        return age is not None and age <= self.heartbeat_timeout

    def __call__(self, process: Any, idx: int) -> bool:
        """Same as :meth:`check_health`."""
        return self.check_health(process, idx)

    def _attach(self, manager: WorkerProcessManager) -> None:
        self._manager = weakref.ref(manager)

    def _is_native(self) -> bool:
        """True unless a subclass overrides the check, which then must be polled."""
        cls = type(self)
        return (cls.check_health is HeartbeatHealthCheck.check_health
                and cls.__call__ is HeartbeatHealthCheck.__call__)

    def __repr__(self) -> str:
        return (f"HeartbeatHealthCheck(heartbeat_timeout={self.heartbeat_timeout:g}, "
                f"startup_grace={self.startup_grace:g})")


class _Target:
    """The process target: set the process title to the worker's name, as the original did,
    then ``worker_fn(idx, *args)``. A module-level class, so it pickles by reference."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        # Lets corral preload the worker's module in the forkserver, as for a plain function.
        inner = fn.func if isinstance(fn, functools.partial) else fn
        self.__module__ = getattr(inner, "__module__", None) or __name__

    def __call__(self, idx: int, *args: Any) -> None:
        try:
            import setproctitle

            setproctitle.setproctitle(multiprocessing.current_process().name)
        except Exception:  # a title is a nicety, never a reason for a worker to fail
            pass
        self.fn(idx, *args)

    def __repr__(self) -> str:
        return repr(self.fn)


def _compat_restart(delay: float) -> dict[str, Any]:
    """The Supervisor options that ``restart_timeout`` stands for.

    The original restarted a dead worker as soon as its poll saw it, then slept
    ``restart_timeout`` as a cool-down. Here a dead worker is restarted at once, and
    ``restart_timeout`` is the least time between two starts of the same worker (a timer of its
    own, never delaying the others): a crash loop restarts once per ``restart_timeout``.
    ``restart_timeout=0`` restarts a worker that ran for half a second or more at once, but one
    that dies at once every time is slowed down, to at most one start per 2 s (the original's
    poll), instead of hundreds a second. No jitter, never giving up (as the original).
    """
    if delay > 0:
        return {"backoff": Backoff(initial=0.0, multiplier=1.0, cap=0.0, jitter=0.0,
                                   reset_after=math.inf),
                "restart_cooldown": delay}
    return {"backoff": Backoff(initial=0.01, multiplier=2.0, cap=2.0, jitter=0.1,
                               reset_after=0.5)}


def _default_args(idx: int) -> tuple[Any, ...]:
    return ()


def _default_name(idx: int) -> str:
    return f"worker-{idx}"


def _default_start_method() -> str:
    """multiprocessing's default without fixing it (get_start_method() would set it for good)."""
    method = multiprocessing.get_start_method(allow_none=True)
    return method if method is not None else multiprocessing.get_all_start_methods()[0]


def _spread(result: Any) -> tuple[Any, ...]:
    """args_fn's result as extra arguments: a tuple is spread, None is none, anything else
    (a string, a list, True) is one argument."""
    if result is None:
        return ()
    if isinstance(result, tuple):
        return result
    return (result,)


class WorkerProcessInfo:
    """One worker process of a :class:`WorkerProcessManager`, shaped like
    ``multiprocessing.Process``: ``pid``, ``name``, ``daemon``, ``is_alive()``, ``exitcode``,
    ``join()``, ``terminate()``, ``kill()``.

    It names one process: once corral has replaced it, ``is_alive()`` is False for good (read
    :attr:`WorkerProcessManager.worker_processes` again for the replacement). Only corral reaps
    workers, so this object never steals an exit status.
    """

    def __init__(self, manager: WorkerProcessManager, status: WorkerStatus, daemon: bool) -> None:
        self._manager = manager
        self.index = status.index
        self.name = status.name
        self.daemon = daemon
        last = status.last_exit
        self.pid: int | None = status.pid if status.pid is not None else (
            last.pid if last is not None else None)

    def _current(self) -> WorkerStatus | None:
        for s in self._manager._statuses():
            if s.index == self.index:
                return s
        return None

    def is_alive(self) -> bool:
        s = self._current()
        return (s is not None and self.pid is not None and s.pid == self.pid and s.alive
                and pid_running(self.pid))

    @property
    def exitcode(self) -> int | None:
        """None while the process runs (or never ran), else its returncode (-N: signal N)."""
        if self.pid is None or self.is_alive():
            return None
        sup = self._manager.supervisor
        for record in reversed(sup.history() if sup is not None else ()):
            if record.pid == self.pid and record.exit is not None:
                return record.exit.returncode
        return None

    def join(self, timeout: float | None = None) -> None:
        """Wait until the process has exited (at most ``timeout`` seconds; None, ``math.inf``
        or a larger number than a wait can take: no limit).

        Raises:
            TypeError, ValueError: ``timeout`` is not None or a number >= 0.
        """
        limit = v.timeout("timeout", timeout)
        if self.pid is not None and self.is_alive():
            wait_exit(self.pid, limit)

    def _send(self, sig: int) -> None:
        if self.pid is not None and self.is_alive():
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        """SIGTERM; the manager restarts the worker (if monitoring is on)."""
        self._send(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL; the manager restarts the worker (if monitoring is on)."""
        self._send(signal.SIGKILL)

    def __repr__(self) -> str:
        return f"<WorkerProcessInfo name={self.name!r} index={self.index} pid={self.pid}>"


# Exits after which the original said "Detected unhealthy/dead worker ..., restarting...".
_DUCK_RESTARTS = frozenset({StopReason.EXITED, StopReason.KILLED, StopReason.HUNG,
                            StopReason.STARTUP_TIMEOUT, StopReason.UNHEALTHY})


def _configured_above(logger: logging.Logger) -> bool:
    """True if the application has put a handler on this logger's way up (basicConfig, or a
    handler on "corral"): then its configuration, not ours, decides what is shown."""
    node: logging.Logger | None = logger.parent
    while node is not None:
        if node.handlers:
            return True
        if not node.propagate:
            return False
        node = node.parent
    return False


class _DefaultConsole(logging.StreamHandler):  # type: ignore[type-arg]
    """Shows a manager's log lines on stderr, as Duck's console logger did, until the
    application configures logging itself; from then on it is silent."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(message)s"))

    def handle(self, record: logging.LogRecord) -> bool:
        logger = logging.getLogger(record.name)
        if _configured_above(logger):
            return False
        self.stream = sys.stderr  # whatever stderr is now (a test's capture, a redirect)
        return bool(super().handle(record))


class _LogFilter(logging.Filter):
    """Applies enable_logs, verbose_logs and stop(no_logging=True) to one manager's pool logger.

    Reads the manager's attributes at each record, so changing them takes effect at once.
    """

    def __init__(self, manager: WorkerProcessManager) -> None:
        super().__init__()
        self._manager = weakref.ref(manager)

    def filter(self, record: logging.LogRecord) -> bool:
        manager = self._manager()
        if manager is None:
            return True
        if not manager.enable_logs or manager._quiet:
            return False
        logger = manager._logger
        if (manager._own_level and _configured_above(logger)
                and logger.parent is not None
                and record.levelno < logger.parent.getEffectiveLevel()):
            # We lowered this logger to INFO for our console; an application that configured
            # logging gets only what its own levels let through.
            return False
        if not manager.verbose_logs:
            if isinstance(record.msg, str) and record.msg.startswith("stack of hung worker"):
                return False
            record.exc_info = None
            record.exc_text = None
            record.stack_info = None
        return True


class WorkerProcessManager:
    """Manages and monitors a pool of worker processes (Duck's API, on corral).

    Args:
        worker_fn: runs in each worker as ``worker_fn(idx, *args)`` (``worker_fn(idx, hc,
            *args)`` with a :class:`HeartbeatHealthCheck`). Under spawn/forkserver it must be a
            module-level function.
        num_workers: how many workers, >= 0.
        args_fn: ``args_fn(idx)``: a tuple of extra arguments (spread), None (none) or any other
            single value (passed as one argument, a string included). Called once per worker in
            ``start()``; a restarted worker gets the same arguments.
        worker_name_fn: ``worker_name_fn(idx) -> str``, the worker's name and process title
            (default ``"worker-<idx>"``). Called once per worker in ``start()``.
        health_check_fn: ``fn(process, idx) -> bool`` (``process`` is shaped like
            ``multiprocessing.Process``), or a :class:`HeartbeatHealthCheck`. A function is
            called off the monitor thread every :attr:`health_check_interval` seconds; False,
            an exception or taking longer than :attr:`health_check_timeout` means unhealthy.
        restart_timeout: seconds between a worker's death and its restart; other workers are
            supervised meanwhile.
        enable_logs: False: nothing is logged by this manager's pool (logger
            ``corral.pool.<pool name>``, see :attr:`pool_name`).
        verbose_logs: include tracebacks and hung workers' stack dumps in the logs.
        enable_monitoring: False: workers are started but never restarted or health-checked.
        process_stop_timeout: seconds the whole pool gets to stop gracefully before SIGKILL
            (None: up to ``STOP_TIMEOUT_CEILING`` = 60 s).
        daemon: multiprocessing's daemon flag for every worker process.
        start_method: "fork", "spawn", "forkserver", or None for multiprocessing's default
            (new in corral).

    Raises:
        TypeError, ValueError: an invalid argument, naming it.
        corral.NotPicklable: ``worker_fn`` cannot be sent to a spawn/forkserver child (a lambda,
            closure or nested function); the message says so and what to do.
    """

    #: Seconds between calls of a ``health_check_fn`` function, per worker (the original's loop
    #: ran every ~2 s). Set on the instance before ``start()`` to change it.
    health_check_interval: float = 2.0
    #: Seconds a ``health_check_fn`` call may take before it counts as failed.
    health_check_timeout: float = 5.0
    #: Failed checks in a row that make a worker unhealthy (the original restarted at once).
    failure_threshold: int = 1

    def __init__(
        self,
        worker_fn: Callable[..., Any],
        num_workers: int,
        args_fn: Callable[[int], Any] | None = None,
        worker_name_fn: Callable[[int], str] | None = None,
        health_check_fn: Callable[[Any, int], bool] | HeartbeatHealthCheck | None = None,
        restart_timeout: float = 5,
        enable_logs: bool = True,
        verbose_logs: bool = True,
        enable_monitoring: bool = True,
        process_stop_timeout: float | None = 5.0,
        daemon: bool = False,
        start_method: str | None = None,
    ) -> None:
        self.worker_fn = worker_fn
        self.num_workers = num_workers
        self.args_fn: Callable[[int], Any] = args_fn if args_fn is not None else _default_args
        self.worker_name_fn: Callable[[int], str] = (
            worker_name_fn if worker_name_fn is not None else _default_name)
        self.health_check_fn = health_check_fn
        self.restart_timeout = restart_timeout
        # Flags are taken for their truth, as the original did (Duck passes settings values).
        self.enable_logs = bool(enable_logs)
        self.verbose_logs = bool(verbose_logs)
        self.enable_monitoring = bool(enable_monitoring)
        self.process_stop_timeout = process_stop_timeout
        self.daemon = bool(daemon)
        self.start_method = start_method
        self._validate()
        check_picklable("worker_fn", worker_fn, self._resolved_start_method())
        with _pool_numbers_lock:
            number = next(_pool_numbers)
        fn = worker_fn.func if isinstance(worker_fn, functools.partial) else worker_fn
        name = getattr(fn, "__name__", None) or type(fn).__name__
        #: The name of this manager's corral pool; its logs go to ``corral.pool.<pool_name>``.
        self.pool_name = f"{name}[{number}]".replace(".", "_")
        self._logger = logging.getLogger(f"corral.pool.{self.pool_name}")
        self._quiet = False
        log_filter = _LogFilter(self)
        self._logger.addFilter(log_filter)
        # Not at exit: the pool is stopped at exit after weakref's own hook has run (atexit
        # order), and its last lines must still be filtered (enable_logs=False) and formatted.
        weakref.finalize(self, self._logger.removeFilter, log_filter).atexit = False
        # Duck printed its lines (info included) without any set-up: do the same until the
        # application configures logging (see _DefaultConsole and _LogFilter).
        self._own_level = self._logger.level == logging.NOTSET
        if self._own_level:
            self._logger.setLevel(logging.INFO)
        console = _DefaultConsole()
        self._logger.addHandler(console)
        weakref.finalize(self, self._logger.removeHandler, console).atexit = False
        self._spawned: set[int] = set()
        self._lock = threading.RLock()
        self._sup: Supervisor | None = None
        self._stopped = True
        self._spawn_cond = threading.Condition()
        self._unspawned: set[int] = set()
        self._owner_pid = os.getpid()
        if isinstance(health_check_fn, HeartbeatHealthCheck):
            health_check_fn._attach(self)

    # ------------------------------------------------------------------------------ checks

    def _validate(self) -> None:
        v.callable_("worker_fn", self.worker_fn)
        v.count("num_workers", self.num_workers)
        v.callable_("args_fn", self.args_fn)
        v.callable_("worker_name_fn", self.worker_name_fn)
        v.callable_("health_check_fn", self.health_check_fn, optional=True)
        v.number("restart_timeout", self.restart_timeout)
        v.optional_number("process_stop_timeout", self.process_stop_timeout)
        if self.start_method is not None:
            v.choice("start_method", self.start_method, START_METHODS)
        v.number("health_check_interval", self.health_check_interval, strict=True)
        v.number("health_check_timeout", self.health_check_timeout, strict=True)
        v.integer("failure_threshold", self.failure_threshold, minimum=1)

    def _resolved_start_method(self) -> str:
        return self.start_method if self.start_method is not None else _default_start_method()

    def _check_owner(self) -> None:
        if os.getpid() != self._owner_pid:
            # A forked copy has no monitor thread: waiting on it would hang forever.
            raise RuntimeError(
                "a WorkerProcessManager can only be used in the process that created it "
                f"(pid {self._owner_pid}), not in pid {os.getpid()}, a forked child, which has "
                "no monitor")

    # ------------------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the worker processes and their supervision.

        Returns once every worker process has been started (as the original), without waiting
        for them to be ready.

        ``args_fn`` and ``worker_name_fn`` are called for every worker before any process is
        started: if one raises, nothing is left running and the error propagates.

        Raises:
            RuntimeError: the manager is running already (``corral.SupervisorStateError``); no
                second pool is started.
            TypeError, ValueError: an attribute was set to an invalid value since construction,
                or ``worker_name_fn`` returned something other than a str.
            corral.NotPicklable: ``worker_fn`` or an ``args_fn`` result cannot be sent to a
                spawn/forkserver child.
        """
        with self._lock:
            self._check_owner()
            if self.running:
                raise SupervisorStateError(
                    "WorkerProcessManager is running already; call stop() before start()")
            self._validate()
            method = self._resolved_start_method()
            check_picklable("worker_fn", self.worker_fn, method)
            sup = Supervisor(spec=None, **self._options(method))
            sup.subscribe(self._on_event)
            self._quiet = False
            self._spawned.clear()
            with self._spawn_cond:
                self._unspawned = set(range(self.num_workers))
            sup.start()  # raises before starting anything if args_fn/worker_name_fn fail
            self._sup = sup
            self._stopped = False
            # The original started every process inside start(): callers read pids right after.
            # Events wake this wait; the 1 s re-check only matters if the monitor itself died.
            deadline = time.monotonic() + SPAWN_WAIT
            with self._spawn_cond:
                while self._unspawned and sup.running and time.monotonic() < deadline:
                    self._spawn_cond.wait(1.0)
                if self._unspawned and sup.running:
                    self._logger.warning("start(): %d worker(s) not started after %gs; they "
                                         "start in the background", len(self._unspawned),
                                         SPAWN_WAIT)
        self._logger.debug(
            "Spawned %d worker %s; Monitoring: %s", self.num_workers,
            "processes" if self.num_workers != 1 else "process",
            "ON" if self.enable_monitoring else "OFF")

    def _options(self, method: str) -> dict[str, Any]:
        """The corral.Supervisor options this manager's attributes stand for."""
        hc = self.health_check_fn
        heartbeat = isinstance(hc, HeartbeatHealthCheck)
        if isinstance(hc, HeartbeatHealthCheck):
            hc._attach(self)
        user_args, name_fn = self.args_fn, self.worker_name_fn

        def args(idx: int) -> tuple[Any, ...]:
            extra = _spread(user_args(idx))
            check_picklable(f"args_fn({idx}) result", extra, method)
            return (hc, *extra) if heartbeat else extra

        def names(idx: int) -> str:
            name = name_fn(idx)
            if not isinstance(name, str):
                raise TypeError(f"worker_name_fn({idx}) must return a str, got {name!r} "
                                f"({type(name).__name__})")
            return name

        delay = float(self.restart_timeout)
        stop_timeout = (STOP_TIMEOUT_CEILING if self.process_stop_timeout is None
                        else float(self.process_stop_timeout))
        options: dict[str, Any] = dict(
            target=_Target(self.worker_fn), workers=self.num_workers, args=args, names=names,
            name=self.pool_name, start_method=method, daemon=self.daemon,
            stop_timeout=stop_timeout,
            **_compat_restart(delay),
            budget=RestartBudget(max_restarts=None),
            restart="always" if self.enable_monitoring else "never",
            # With a heartbeat check, the first beat is what makes a worker ready: until then
            # it is in its startup grace, and the heartbeat timeout does not apply.
            ready_when="beat" if heartbeat else "started",
        )
        if not self.enable_monitoring or hc is None:
            return options
        if isinstance(hc, HeartbeatHealthCheck):
            # Its first beat makes a worker ready; it gets the startup grace to get there.
            options.update(startup_timeout=hc.startup_grace)
        if isinstance(hc, HeartbeatHealthCheck) and hc._is_native():
            options.update(heartbeat_timeout=hc.heartbeat_timeout)
        else:
            options.update(health_check=self._checker(hc),
                           health_check_interval=self.health_check_interval,
                           health_check_timeout=self.health_check_timeout,
                           failure_threshold=self.failure_threshold)
        return options

    def _checker(self, fn: Callable[[Any, int], Any]) -> Callable[[Any, int], bool]:
        logger = self._logger

        def check(process: Any, idx: int) -> bool:
            try:
                # Truthy is healthy, as the original's `if not healthy` had it.
                return bool(fn(process, idx))
            except HeartbeatUpdateNeverCalled as exc:
                # A subclassed heartbeat check before any beat: the original did not restart
                # for this either, it warned.
                logger.warning("Exception during health_check_fn: %s", exc)
                return True
            except Exception as exc:
                # corral logs the failure in one line; this adds where it came from.
                logger.warning("Exception during health_check_fn for worker %r (index %d): %s",
                               getattr(process, "name", None), idx, exc, exc_info=True)
                raise

        return check

    def _on_event(self, event: Event) -> None:
        """Runs on the pool's event thread."""
        self._log_like_duck(event)
        if event.kind in (EventKind.SPAWNED, EventKind.EXITED, EventKind.STOPPED):
            with self._spawn_cond:
                if event.kind is EventKind.STOPPED:
                    self._unspawned.clear()
                else:
                    self._unspawned.discard(event.index)
                self._spawn_cond.notify_all()
        hc = self.health_check_fn
        if not isinstance(hc, HeartbeatHealthCheck):
            return
        if event.kind is EventKind.READY:
            hc._ever_beat = True  # ready_when="beat": READY is the first beat
        elif (event.kind is EventKind.EXITED and event.exit is not None
              and event.exit.reason is StopReason.STARTUP_TIMEOUT):
            self._logger.warning(
                "worker %r never called update_heartbeat(idx) within its startup grace of "
                "%gs (HeartbeatHealthCheck(startup_grace=...)); it is restarted. Call "
                "update_heartbeat before handling any task.", event.name, hc.startup_grace)

    def _log_like_duck(self, event: Event) -> None:
        """The original's familiar lines, beside corral's own (cause, stack dump)."""
        log = self._logger
        record = event.exit
        if event.kind is EventKind.SPAWNED and event.index is not None:
            if event.index in self._spawned:
                log.warning("Restarted worker process %s (pid=%s)", event.name, event.pid)
            self._spawned.add(event.index)
        elif event.kind is EventKind.EXITED and record is not None:
            if record.reason in _DUCK_RESTARTS and self.enable_monitoring:
                log.warning("Detected unhealthy/dead worker (%s, pid=%s), restarting...",
                            record.name, record.pid)
            elif (record.reason is StopReason.SHUTDOWN and record.exit is not None
                  and record.exit.signal == signal.SIGKILL):
                log.warning("Worker process %s (pid=%s) did not shut down gracefully.",
                            record.name, record.pid)

    def stop(self, graceful: bool = True, wait: bool = True, monitor_stop_timeout: float = 0.5,
             no_logging: bool = False) -> None:
        """Stop every worker and the supervision.

        All workers get SIGTERM at once and share one deadline of ``process_stop_timeout``
        seconds; those still running then get SIGKILL, with their process groups. Idempotent.

        Args:
            graceful: False: SIGKILL at once.
            wait: block until every worker has been reaped. False returns at once; the
                deadline and the SIGKILL still apply, in the background.
            monitor_stop_timeout: accepted for compatibility; the monitor ends with the pool.
            no_logging: log nothing about this stop.
        """
        v.number("monitor_stop_timeout", monitor_stop_timeout)
        with self._lock:
            self._check_owner()
            sup = self._sup
            self._stopped = True
            if sup is None:
                return
            if no_logging:
                self._quiet = True
            sup.stop(timeout=None if graceful else 0.0, wait=bool(wait))
        self._logger.info("All workers and monitor stopped." if wait
                          else "Stopped worker process manager.")

    # ------------------------------------------------------------------------------ inspection

    @property
    def running(self) -> bool:
        """True from ``start()`` until ``stop()`` (or until every worker of a pool without
        monitoring has exited); False in a forked child, where the pool does not run."""
        sup = self._sup
        return not self._stopped and sup is not None and sup.running

    @property
    def supervisor(self) -> Supervisor | None:
        """The corral.Supervisor of the current (or last) start, for what this API cannot say:
        ``history()``, ``subscribe()``, ``scale()``, ``restart_all()``..."""
        return self._sup

    def _statuses(self) -> tuple[WorkerStatus, ...]:
        self._check_owner()
        sup = self._sup
        return tuple(s for s in sup.status() if not s.standby) if sup is not None else ()

    def _heartbeat_ages(self) -> dict[int, float | None]:
        return {s.index: s.heartbeat_age for s in self._statuses()}

    @property
    def worker_processes(self) -> list[WorkerProcessInfo]:
        """One process-like object per worker: its current process, or its last one."""
        return [WorkerProcessInfo(self, s, self.daemon) for s in self._statuses()]

    def running_pids(self) -> list[int]:
        """The pids of the worker processes alive now."""
        self._check_owner()
        sup = self._sup
        return sup.pids() if sup is not None else []

    def status(self) -> list[dict[str, Any]]:
        """One dict per worker: ``name``, ``pid``, ``alive`` (as the original), and ``index``,
        ``state``, ``ready``, ``restarts``, ``heartbeat_age`` (seconds, or None) and
        ``last_exit`` (how its previous process ended, e.g. ``"exited: exit code 1"``, or None).

        A worker between processes shows its last pid, not alive.
        """
        out = []
        for s in self._statuses():
            last = s.last_exit
            pid = s.pid if s.pid is not None else (last.pid if last is not None else None)
            last_text = None
            if last is not None:
                how = last.exit.describe() if last.exit is not None else "no process"
                last_text = f"{last.reason.value}: {how}"
            out.append({
                "name": s.name, "pid": pid, "alive": s.alive, "index": s.index,
                "state": s.state.value, "ready": s.ready, "restarts": s.restarts,
                "heartbeat_age": s.heartbeat_age, "last_exit": last_text,
            })
        return out

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return (f"<WorkerProcessManager {self.pool_name!r} {state} "
                f"num_workers={self.num_workers}>")
