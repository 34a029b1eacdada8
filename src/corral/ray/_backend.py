"""RayWorker: one corral worker as a Ray actor, behind a process-like handle.

What the monitor holds instead of a WorkerProcess::

    start()  --> actor created (max_restarts=0, max_task_retries=0), run() submitted
    probe()  --> the actor's "ctl" thread answers while run() runs (Liveness reads the replies)
    send_stop() / kill() / stop(grace)
    run() ends (returned, raised, actor died, killed, OOM, node lost)
        --> Ray completes run()'s future --> the reaper thread: ray.kill, decode
        --> worker.ended set, waitable() fd readable (like a pidfd, for the reactor)
        --> on_exit(worker, ActorExit)  (exactly once, on the reaper thread)

Its pid, started, started_wall, stop_sent, send/send_group/send_stop, waitable, kill_and_reap,
kill_group_leftovers and close follow process.ProcessLike; how it ended is ``ended`` (an
ActorExit), not ``exit``/``reap()``: Ray often cannot say which signal ended a process.

Nothing polls: a death is reported by Ray completing the pending ``run()`` call (measured 6-10 ms
after a SIGKILL on this machine), and the reaper thread sleeps on a queue until then.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from corral.errors import CorralError
from corral.ray._actor import RayBoot, actor_class
from corral.ray._exit import ActorExit, DeathCause, decode
from corral.ray._liveness import ProbeFailure

__all__ = [
    "ALLOWED_OPTIONS",
    "ProbeFailed",
    "ProbeReply",
    "RayStartFailed",
    "RayWorker",
    "Spare",
    "connect",
    "validate_options",
]

log = logging.getLogger(__name__)

# Actor options a user may pass through; the rest are corral's (restarts, retries, lifetime,
# concurrency) or would break its model.
ALLOWED_OPTIONS = frozenset({
    "num_cpus", "num_gpus", "memory", "resources", "accelerator_type", "scheduling_strategy",
    "runtime_env", "label_selector", "namespace", "name",
})
_OURS = frozenset({"max_restarts", "max_task_retries", "lifetime", "max_concurrency",
                   "concurrency_groups", "max_pending_calls"})


class RayStartFailed(CorralError, RuntimeError):
    """A worker's actor could not be created, scheduled or reached within the start timeout."""


class ProbeFailed(CorralError):
    """A probe got no reply. ``kind`` is a ProbeFailure (TIMEOUT or UNAVAILABLE)."""

    def __init__(self, message: str, kind: ProbeFailure) -> None:
        super().__init__(message)
        self.kind = kind

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.kind))


@dataclass(frozen=True)
class Spare:
    """An actor created ahead of need, answering, with no target yet (see make_spare).
    Discard one with ``ray.kill(spare.actor)``."""

    actor: Any
    pid: int
    node_id: str


@dataclass(frozen=True)
class ProbeReply:
    """One answer of a worker's ``probe()``; ``received`` is our monotonic time of it."""

    seq: float
    beat_age: float | None
    ready: bool
    status: str
    pid: int
    node_id: str
    rss: int
    running: bool
    stop_requested: bool
    received: float

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], received: float) -> ProbeReply:
        return cls(float(data["seq"]), data["beat_age"], bool(data["ready"]),
                   str(data["status"]), int(data["pid"]), str(data["node_id"]),
                   int(data["rss"]), bool(data["running"]), bool(data["stop_requested"]),
                   received)


def validate_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check the actor options a user passes through (``ray_options=``) and copy them.

    Raises:
        TypeError: not a mapping, or a key is not a str.
        ValueError: an option corral sets itself, or one it does not know.
    """
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TypeError(f"ray_options must be a dict of actor options, got {options!r} "
                        f"({type(options).__name__})")
    out = {}
    for key, value in options.items():
        if not isinstance(key, str):
            raise TypeError(f"ray_options keys must be str, got {key!r}")
        if key in _OURS:
            raise ValueError(f"ray_options must not set {key!r}: corral sets it (restarts are "
                             f"corral's, with its backoff and budget), got {key}={value!r}")
        if key not in ALLOWED_OPTIONS:
            raise ValueError(f"ray_options: unknown option {key!r}; expected one of "
                             f"{', '.join(sorted(ALLOWED_OPTIONS))}")
        out[key] = value
    return out


def connect(**init_kwargs: Any) -> bool:
    """Make sure this process is a Ray driver. True if it started a local cluster.

    Uses the cluster already initialised by the caller (``ray.init(address=...)``), else the
    one ``RAY_ADDRESS`` names, else starts a local one (``include_dashboard=False`` unless
    given). ``init_kwargs`` go to ``ray.init``.
    """
    import ray

    if ray.is_initialized():
        return False
    local = not os.environ.get("RAY_ADDRESS")  # else ray.init reads RAY_ADDRESS itself
    if local:
        init_kwargs.setdefault("include_dashboard", False)
    # ray.init installs a SIGTERM handler in the main thread (and ray.shutdown leaves it): a
    # library must not change the program's signal handling, so put the old one back.
    main = threading.current_thread() is threading.main_thread()
    old = signal.getsignal(signal.SIGTERM) if main else None
    try:
        ray.init(**init_kwargs)
    finally:
        if main and signal.getsignal(signal.SIGTERM) is not old:
            signal.signal(signal.SIGTERM, old)
    return local


def _driver_node() -> str:
    import ray

    try:
        return str(ray.get_runtime_context().get_node_id())
    except Exception:
        return ""


def _is_ray_worker(pid: int) -> bool:
    """True if ``pid`` still is a Ray worker process on this machine (not a reused pid)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().startswith(b"ray::")
    except OSError:
        return False


# ------------------------------------------------------------------------------ the reaper

_reaper_lock = threading.Lock()
_reaper_queue: queue.SimpleQueue[RayWorker] = queue.SimpleQueue()
_reaper_thread: threading.Thread | None = None


def _reap_later(worker: RayWorker) -> None:
    """Hand a finished worker to the reaper thread (called on Ray's callback thread, which
    must not make Ray calls or run user callbacks)."""
    global _reaper_thread
    with _reaper_lock:
        if _reaper_thread is None or not _reaper_thread.is_alive():
            _reaper_thread = threading.Thread(target=_reaper, name="corral-ray-reaper",
                                              daemon=True)
            _reaper_thread.start()
    _reaper_queue.put(worker)


def _reaper() -> None:
    while True:
        worker = _reaper_queue.get()
        try:
            worker._finish()
        except Exception:
            log.exception("corral: finishing Ray worker %r failed", worker.name)


# ------------------------------------------------------------------------------ the handle


class RayWorker:
    """One worker process, as a Ray actor. Create with :meth:`start`.

    Attributes:
        index, name: which worker.
        pid, node_id: its process and Ray node (from the actor's first answer).
        started: our monotonic time when its actor answered.
        actor: the Ray actor handle.
        ended: how it ended, once known (then also passed to ``on_exit``).
    """

    def __init__(self, actor: Any, run_ref: Any, index: int, name: str, pid: int, node_id: str,
                 on_exit: Callable[[RayWorker, ActorExit], None] | None) -> None:
        self.actor = actor
        self.run_ref = run_ref
        self.index = index
        self.name = name
        self.pid = pid
        self.node_id = node_id
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.ended: ActorExit | None = None
        # As WorkerProcess.stop_sent: the "signal" already sent to stop it (SIGKILL = killed).
        self.stop_sent: int | None = None
        self.killed = False
        # Readable once the end is known: the monitor's reactor watches it like a pidfd.
        self._event_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._on_exit = on_exit
        self._run_future: Future[Any] = run_ref.future()
        self._done = threading.Event()
        self._lock = threading.Lock()

    @classmethod
    def start(cls, target: Callable[..., Any], index: int, args: tuple[Any, ...] = (), *,
              name: str | None = None, pool: str = "pool",
              options: Mapping[str, Any] | None = None,
              on_exit: Callable[[RayWorker, ActorExit], None] | None = None,
              ready_on_beat: bool = False, start_timeout: float = 60.0,
              spare: Spare | None = None) -> RayWorker:
        """Create the worker's actor, start ``target(index, *args)`` in it, and wait for the
        actor to say where it runs (blocking: call from a spawner thread).

        Args:
            options: actor options passed through (see :data:`ALLOWED_OPTIONS`).
            on_exit: ``on_exit(worker, ActorExit)``, called once when the worker has ended,
                on corral's reaper thread: make it thread-safe (e.g. post to the monitor).
            ready_on_beat: the first beat counts as ready() (``ready_when="beat"``).
            start_timeout: seconds for the actor to be scheduled and answer.
            spare: an actor made ahead by :meth:`make_spare` (``options`` are then its own):
                the start is then one call instead of a new process (~10 ms, not ~250 ms).

        Raises:
            RayStartFailed: the actor could not be created or did not answer in time (it is
                killed); ``__cause__`` is Ray's error.
            ValueError, TypeError: bad ``options``.
        """
        name = name if name is not None else f"{pool}-{index}"
        if spare is None:
            spare = cls.make_spare(options, start_timeout, who=f"worker {name!r} (index "
                                                               f"{index})")
        # run() only once the actor answered: a target that wrecks its process at once
        # (SIGSTOP, a native call holding the GIL) is then a hung worker the probes find, not
        # a start that times out. The extra round trip costs ~1 ms on one node.
        run_ref = spare.actor.run.remote(target, index, tuple(args),
                                         RayBoot(pool, index, name, ready_on_beat))
        worker = cls(spare.actor, run_ref, index, name, spare.pid, spare.node_id, on_exit)
        # Ray completes this future on its own thread when run() ends, however it ends.
        worker._run_future.add_done_callback(lambda _fut: _reap_later(worker))
        return worker

    @staticmethod
    def make_spare(options: Mapping[str, Any] | None = None, start_timeout: float = 60.0,
                   who: str = "a spare worker") -> Spare:
        """Create an actor and wait until it answers, with no target yet (blocking).

        Raises:
            RayStartFailed: it could not be created or did not answer within start_timeout.
        """
        import ray

        opts = validate_options(options)
        cls_ = actor_class()
        actor = cls_.options(**opts).remote() if opts else cls_.remote()
        try:
            info = ray.get(actor.hello.remote(), timeout=start_timeout)
        except Exception as exc:
            ray.kill(actor, no_restart=True)
            why = ("did not answer within the start timeout (no node with the resources "
                   "asked for? see `ray status`)"
                   if isinstance(exc, ray.exceptions.GetTimeoutError) else str(exc))
            raise RayStartFailed(f"{who}: its Ray actor could not be started: {why}") from exc
        return Spare(actor, int(info["pid"]), str(info["node_id"]))

    # ------------------------------------------------------------------------ probing

    def probe_future(self) -> Future[Any]:
        """Ask for a probe without waiting: a future of the reply dict (or Ray's error).
        The monitor times it out itself (a stopped actor never answers)."""
        return self.actor.probe.remote().future()  # type: ignore[no-any-return]

    def probe(self, timeout: float) -> ProbeReply:
        """Ask the worker how it is, and wait up to ``timeout`` seconds.

        Raises:
            ProbeFailed: no reply in time (kind TIMEOUT) or Ray calls the actor unavailable
                (kind UNAVAILABLE). Feed it to :meth:`Liveness.on_failure`.
            ray.exceptions.RayActorError: the actor is dead (its end also comes to on_exit).
        """
        import ray

        try:
            data = ray.get(self.actor.probe.remote(), timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise ProbeFailed(f"worker {self.name!r} (pid {self.pid}): no probe reply within "
                              f"{timeout:g}s", ProbeFailure.TIMEOUT) from None
        except ray.exceptions.ActorUnavailableError as exc:
            raise ProbeFailed(f"worker {self.name!r} (pid {self.pid}): {exc}",
                              ProbeFailure.UNAVAILABLE) from exc
        return ProbeReply.from_dict(data, time.monotonic())

    def stacks(self, timeout: float = 1.0) -> str:
        """Every thread's stack in the worker ("" if it cannot answer in time)."""
        import ray

        try:
            return str(ray.get(self.actor.stacks.remote(), timeout=timeout))
        except Exception:
            return ""

    # ----------------------------------------------------------------------- stopping

    def send_stop(self, sig: int = signal.SIGTERM) -> None:
        """Ask the target to stop (StopRequested in its thread), once; returns at once.

        ``sig`` is only recorded in ``stop_sent`` (as WorkerProcess does): an actor cannot
        receive a signal (see NOTES.md), whatever the pool's stop_signal is.
        """
        if self.stop_sent is not None or self.ended is not None:
            return
        self.stop_sent = sig
        self.actor.request_stop.remote()

    def send(self, sig: int) -> bool:
        """WorkerProcess's seam, mapped: SIGKILL kills the actor, SIGCONT does nothing, any
        other signal is a stop request. False if it has already ended."""
        if self.ended is not None:
            return False
        if sig == signal.SIGKILL:
            self.kill()
        elif sig != signal.SIGCONT:
            self.send_stop(sig)
        return True

    send_group = send  # an actor has no process group of corral's: the same as send()

    def kill_group_leftovers(self) -> None:
        """Nothing to do: Ray ends the actor's process (its children are Ray's business)."""

    def waitable(self) -> int:
        """An fd that becomes readable once the end is known (for the reactor)."""
        return self._event_fd

    def kill_and_reap(self, timeout: float = 5.0) -> None:
        """Kill, wait for Ray to report the end (at most ``timeout`` s), release the fd."""
        self.kill()
        self.wait(timeout)
        self.close()

    def close(self) -> None:
        """Release the waitable fd (after the end was handled)."""
        with self._lock:
            if self._event_fd >= 0:
                os.close(self._event_fd)
                self._event_fd = -1

    def kill(self) -> None:
        """End the actor's process now (``ray.kill``; skips atexit handlers). Idempotent."""
        import ray

        with self._lock:
            if self.killed:
                return
            self.killed = True
            self.stop_sent = signal.SIGKILL
        try:
            ray.kill(self.actor, no_restart=True)
        except Exception as exc:  # already gone, or the cluster went away
            log.debug("ray.kill of worker %r (pid %s): %s", self.name, self.pid, exc)
        if self.local_pid() is not None:
            # Ray reports the actor dead at once but first asks its process to exit, and
            # SIGKILLs it only ~5 s later if it does not (a SIGSTOPped or stuck one). On our
            # own machine we need not wait for that.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, signal.SIGKILL)

    def local_pid(self) -> int | None:
        """Its pid if its process runs on this machine (and still is a Ray worker), else None:
        the pid of a process on another node names nothing, or something else, here."""
        if self.node_id and self.node_id == _driver_node() and _is_ray_worker(self.pid):
            return self.pid
        return None

    def stop(self, grace: float) -> ActorExit | None:
        """Stop cooperatively, then kill at the deadline; wait for the end (blocking), and
        release the waitable fd. For callers without a reactor: the monitor uses send_stop(),
        its own deadline and kill() instead.

        Returns how it ended (None only if Ray never reported the end, e.g. the cluster is
        gone).
        """
        deadline = time.monotonic() + grace
        if grace > 0:
            self.send_stop()
            if self.wait(grace):
                self.close()
                return self.ended
        if self.ended is None:
            log.warning("worker %r (pid %s) did not stop within %.3gs; killing its actor",
                        self.name, self.pid, grace)
            self.kill()
        self.wait(max(5.0, deadline - time.monotonic()))
        if self.ended is not None:
            self.close()
        return self.ended

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the end is known (on_exit has been called). True if it is."""
        return self._done.wait(timeout)

    @property
    def alive(self) -> bool:
        return self.ended is None

    # The monitor's view of the end (ProcessLike): status, and what corral calls the reason.
    @property
    def exit(self) -> Any:
        ended = self.ended
        if ended is None:
            return None
        from corral.exitstatus import ExitStatus

        return ended.exit if ended.exit is not None else ExitStatus.unknown_status(
            "Ray does not say how the actor's process ended (see the detail)")

    def reap(self) -> Any:
        """How it ended (an ExitStatus; unknown when Ray does not say), or None if not yet."""
        return self.exit

    @property
    def exit_reason(self) -> Any:
        return None if self.ended is None else self.ended.reason

    @property
    def exit_detail(self) -> str | None:
        ended = self.ended
        if ended is None:
            return None
        text = ended.detail if ended.hint is None else f"{ended.hint}\n{ended.detail}"
        return f"{ended.cause.value}: {text.strip()}" if text.strip() else ended.cause.value

    # ---------------------------------------------------------------------- the end

    def _finish(self) -> None:
        """On the reaper thread: decode the end, make sure the process goes, tell on_exit."""
        try:
            outcome: Any = self._run_future.result(timeout=0)
        except BaseException as exc:
            outcome = exc
        exit_ = decode(outcome, stop_requested=self.stop_sent is not None)
        if exit_.cause in (DeathCause.RETURNED, DeathCause.EXITED, DeathCause.RAISED,
                           DeathCause.UNAVAILABLE, DeathCause.ERROR):
            # run() is over but the actor's process lives on (or is unreachable): end it, as a
            # local worker's process ends when its target does.
            self.kill()
        self.ended = exit_
        with self._lock:
            if self._event_fd >= 0:
                os.eventfd_write(self._event_fd, 1)
        level = logging.INFO if exit_.stop_requested or self.killed else logging.WARNING
        log.log(level, "worker %r (index %d, pid %s, node %s): %s after %.2fs", self.name,
                self.index, self.pid, self.node_id[:12], exit_.describe(),
                time.monotonic() - self.started)
        self._done.set()
        if self._on_exit is not None:
            self._on_exit(self, exit_)

    def __repr__(self) -> str:
        state = "alive" if self.ended is None else self.ended.cause.value
        return f"<RayWorker {self.name!r} index={self.index} pid={self.pid} {state}>"
