"""The Ray actor that is one corral worker: runs ``target(index, *args)`` and answers probes.

Two concurrency groups, so the supervisor can look inside while the target runs:

- the default group (one thread) runs :meth:`WorkerActor.run`, the user's target;
- the "ctl" group (one more thread) answers :meth:`~WorkerActor.hello`,
  :meth:`~WorkerActor.probe`, :meth:`~WorkerActor.request_stop` and
  :meth:`~WorkerActor.stacks`, even while ``run()`` never returns.

Inside ``run()`` the worker-side API works unchanged: ``corral.beat()``, ``ready()`` and
``set_status()`` write into a :class:`~corral.heartbeat.LocalSlot` that ``probe()`` reads.

The stop request: a Ray actor's main thread sits in Ray's task loop (native code) and never runs
a Python signal handler, and ``run()`` is not in the main thread, so a SIGTERM reaches nobody
(measured: see NOTES.md). Instead :meth:`~WorkerActor.request_stop` raises :class:`StopRequested`
(a SystemExit) inside the thread running the target, at its next Python instruction: ``finally``
blocks and ``except SystemExit`` run, as they would for a SIGTERM handler that calls
``sys.exit()``. A target blocked in native code (a long ``time.sleep``, a C loop) only sees it
when that returns: it is uncooperative, and the supervisor kills the actor at the deadline.

This module imports no Ray: :func:`actor_class` does, on first use, so the class can be tested
in-process without a cluster.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from corral import heartbeat

__all__ = ["CTL_GROUP", "RayBoot", "StopRequested", "WorkerActor", "actor_class"]

CTL_GROUP = "ctl"
_CTL_METHODS = ("hello", "probe", "request_stop", "stacks")



def _raise_in(thread: int, exc: type[BaseException] | None) -> int:
    """Raise ``exc`` in another thread at its next Python instruction (None: take back one
    raised but not delivered yet). Returns how many threads were affected."""
    arg = None if exc is None else ctypes.py_object(exc)  # None is passed as NULL
    return int(ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread), arg))


class StopRequested(SystemExit):
    """Raised in a Ray worker's target when corral stops it: the stop signal's equivalent."""


@dataclass(frozen=True)
class RayBoot:
    """What the actor needs to know about the worker it runs (picklable)."""

    pool: str
    index: int
    name: str
    ready_on_beat: bool = False


def _rss() -> int:
    """Resident set size of this process in bytes, from /proc (0 if unreadable)."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def _node_id() -> str:
    """The Ray node this process runs on ("" outside a Ray worker)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return ""
    try:
        return str(ray.get_runtime_context().get_node_id())
    except Exception:  # a Ray internal error must not break a probe
        return ""


class WorkerActor:
    """One corral worker, as the body of a Ray actor (see :func:`actor_class`)."""

    def __init__(self) -> None:
        self._slot = heartbeat.LocalSlot()
        self._lock = threading.Lock()  # guards the four fields below
        self._run_thread = 0  # ident of the thread running the target (0: not running)
        self._stop_requested = False
        self._stop_sent = False  # StopRequested was raised in the run thread
        self._runs = 0
        self._ready_on_beat = False
        self._pid = os.getpid()
        self._node = ""

    # ----------------------------------------------------------------- default group

    def run(self, target: Callable[..., Any], index: int, args: tuple[Any, ...],
            boot: RayBoot) -> dict[str, Any]:
        """Run ``target(index, *args)``; the outcome, as a process exit would tell it.

        Returns ``{"code": int, "stopped": bool}``: code 0 when the target returned, the
        SystemExit code when it exited (``sys.exit(n)``, or a stop request it let through).
        An exception from the target propagates: Ray raises it in the caller as a
        RayTaskError whose ``cause`` is the user's exception, with the remote traceback.

        Raises:
            RuntimeError: run() was called a second time (one actor runs one worker).
        """
        # A stop request may land at any instruction once _run_thread is set: everything from
        # there on is inside the try, so it always ends here and never escapes to Ray (where a
        # SystemExit would end the actor's process).
        try:
            with self._lock:
                if self._runs:
                    raise RuntimeError(f"worker {boot.name!r}: run() called twice on one actor")
                self._runs = 1
                if self._stop_requested:  # stopped before it began: the target never runs
                    return {"code": 0, "stopped": True}
                self._run_thread = threading.get_ident()
            self._ready_on_beat = boot.ready_on_beat
            self._slot.attach()
            try:
                target(index, *args)
                code = 0
            finally:
                self._leave()
        except SystemExit as exc:  # sys.exit(n), or our StopRequested
            code = _exit_code(exc.code)
        finally:
            self._slot.detach()
        return {"code": code, "stopped": self._stop_requested}

    def _leave(self) -> None:
        """The target is over: no stop request may land in this thread from now on."""
        with self._lock:
            self._run_thread = 0
            if self._stop_sent:
                # Raised but not delivered yet (the target returned first): take it back.
                _raise_in(threading.get_ident(), None)

    # --------------------------------------------------------------------- ctl group

    def hello(self) -> dict[str, Any]:
        """Where this actor runs: ``{"pid", "node_id"}`` (called once, right after creation)."""
        self._node = _node_id()
        return {"pid": self._pid, "node_id": self._node}

    def probe(self) -> dict[str, Any]:
        """A snapshot of the worker, cheap enough to ask for every fraction of a second.

        Returns:
            ``seq``: the last beat's stamp on this actor's own clock, 0 = never; it changes
            at every beat, so the supervisor compares it with the previous reply's (never
            with its own clock). ``beat_age``: seconds since that beat, on this actor's clock
            (None: never). ``ready`` (ready() was called, or it beat and ready_on_beat),
            ``status``, ``pid``, ``node_id``, ``rss`` (bytes),
            ``running`` (the target is running), ``stop_requested``.
        """
        reading = self._slot.read()
        last = reading.last_beat
        return {
            "seq": last,
            "beat_age": time.monotonic() - last if last else None,
            "ready": reading.ready_at > 0 or (self._ready_on_beat and last > 0),
            "status": reading.status,
            "pid": self._pid,
            "node_id": self._node,
            "rss": _rss(),
            "running": self._run_thread != 0,
            "stop_requested": self._stop_requested,
        }

    def request_stop(self) -> bool:
        """Ask the target to stop: StopRequested is raised in it (once). True if it was
        raised now; False if it was already asked, or is not running (then it never starts)."""
        with self._lock:
            self._stop_requested = True
            if self._run_thread == 0 or self._stop_sent:
                return False
            self._stop_sent = True
            _raise_in(self._run_thread, StopRequested)
            return True

    def stacks(self) -> str:
        """Every thread's Python stack: the evidence from a hung worker before it is killed
        (needs this thread to get the GIL: a worker stuck in native code holding it cannot
        answer, and the probe timeout finds it instead)."""
        return thread_stacks(self._run_thread, "the target")


def thread_stacks(marked: int | None, what: str) -> str:
    """The Python stack of every thread but the caller's, ``marked``'s tagged ``what``."""
    names = {t.ident: t.name for t in threading.enumerate()}
    me = threading.get_ident()
    out = []
    for ident, frame in sys._current_frames().items():
        if ident == me:
            continue
        tag = f" ({what})" if ident == marked else ""
        out.append(f"Thread {names.get(ident, ident)}{tag}:\n")
        out.extend(traceback.format_stack(frame))
    return "".join(out)


def _exit_code(code: object) -> int:
    """A SystemExit's code as the process exit code Python would use."""
    if code is None:
        return 0
    if isinstance(code, int) and not isinstance(code, bool):
        return code & 0xFF
    return 1  # sys.exit("message"): Python prints it and exits with 1


_actor_class: Any = None


def actor_class() -> Any:
    """The Ray actor class (``ray.remote(WorkerActor)`` with the ctl group), made once.

    ``max_restarts=0`` and ``max_task_retries=0``: Ray restarts and retries nothing; corral
    decides, with its own backoff and budget.
    """
    global _actor_class
    if _actor_class is None:
        import ray

        for name in _CTL_METHODS:
            ray.method(concurrency_group=CTL_GROUP)(getattr(WorkerActor, name))
        remote: Any = ray.remote  # its stubs do not know concurrency_groups
        _actor_class = remote(concurrency_groups={CTL_GROUP: 1}, max_restarts=0,
                              max_task_retries=0)(WorkerActor)
    return _actor_class
