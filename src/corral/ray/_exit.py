"""How a Ray worker ended, decoded from what its ``run()`` call returned or raised.

Ray reports an actor's end as the outcome of a pending call. :func:`decode` turns that outcome
into an :class:`ActorExit` in corral's vocabulary (:class:`~corral.ExitStatus`,
:class:`~corral.StopReason`), keeping Ray's finer cause and its message as evidence:

=====================================  ============  =====================  ==================
Ray's outcome                          cause         exit                   reason
=====================================  ============  =====================  ==================
run() returned                         RETURNED      exit code 0            EXITED
run() returned after SystemExit(n)     EXITED        exit code n            EXITED
RayTaskError (the target raised)       RAISED        exit code 1            EXITED
ActorDiedError, "killed by ray.kill"   KILLED        unknown                KILLED
ActorDiedError, "its node has died"    NODE_LOST     unknown                KILLED
ActorDiedError, other (SIGKILL, crash  DIED          code if Ray says one   KILLED / EXITED
  kernel OOM killer, os._exit)
OutOfMemoryError (Ray's OOM killer)    OOM           unknown                KILLED
NodeDiedError                          NODE_LOST     unknown                KILLED
ActorDiedError(actor_init_failed),     START_FAILED  unknown                SPAWN_FAILED
  unschedulable, runtime_env failed
ActorUnavailableError                  UNAVAILABLE   unknown                KILLED
=====================================  ============  =====================  ==================

Ray does not say which signal killed a process, so ``exit`` is None ("unknown") where the table
says so; the monitor replaces ``reason`` with its own when it had decided the stop.
"""

from __future__ import annotations

import enum
import re
import time
from dataclasses import dataclass
from typing import Any

from corral.events import ExitRecord, StopReason
from corral.exitstatus import ExitStatus

__all__ = ["ActorExit", "DeathCause", "decode"]


class DeathCause(enum.Enum):
    RETURNED = "returned"  # the target returned
    EXITED = "exited"  # SystemExit in the target (sys.exit, or a stop request let through)
    RAISED = "raised"  # the target raised an exception
    DIED = "actor died"  # its process died: SIGKILL, a crash, the kernel's OOM killer, _exit
    KILLED = "ray.kill"  # ray.kill() (corral's at a stop deadline, or someone else's)
    OOM = "out of memory"  # Ray's memory monitor killed it
    NODE_LOST = "node lost"  # its node died or stopped answering Ray's health checks
    START_FAILED = "start failed"  # never ran: creation failed, unschedulable, runtime_env
    UNAVAILABLE = "unavailable"  # Ray could not reach it (counted only after N probes)
    ERROR = "ray error"  # any other Ray error about the call (the driver's cluster went away)


_HINTS = {
    DeathCause.DIED: "killed by a signal (SIGKILL? the kernel OOM killer?) or crashed in "
                     "native code; Ray does not say which",
    DeathCause.OOM: "Ray's memory monitor killed it: the node ran low on memory",
    DeathCause.NODE_LOST: "its node died or missed Ray's health checks",
    DeathCause.START_FAILED: "the actor could not be created or scheduled",
    DeathCause.UNAVAILABLE: "Ray could not reach the actor (network partition, overloaded node)",
}

_EXIT_CODE = re.compile(r"exits? with an exit code (-?\d+)")


@dataclass(frozen=True)
class ActorExit:
    """One ended Ray worker.

    Attributes:
        cause: Ray's finer reason.
        exit: the exit code when known (the target returned, exited or raised, or Ray saw the
            process exit with a code); None when Ray does not say (killed, node lost).
        reason: in corral's terms (EXITED, KILLED, SPAWN_FAILED); the monitor substitutes
            its own (HUNG, SHUTDOWN, ...) when it decided the stop.
        detail: the remote traceback, or Ray's message.
        error: the user's exception (cause RAISED), or Ray's error; None otherwise.
        stop_requested: a cooperative stop had been asked for before it ended.
        at: ``time.time()`` when the end was reported.
    """

    cause: DeathCause
    exit: ExitStatus | None
    reason: StopReason
    detail: str = ""
    error: BaseException | None = None
    stop_requested: bool = False
    at: float = 0.0

    @property
    def hint(self) -> str | None:
        return _HINTS.get(self.cause)

    def describe(self) -> str:
        how = self.exit.describe() if self.exit is not None else "exit status unknown"
        text = f"{self.cause.value} ({how})"
        return text + (f": {self.hint}" if self.hint else "")

    def record(self, index: int, name: str, pid: int | None, uptime: float,
               reason: StopReason | None = None) -> ExitRecord:
        """The monitor's ExitRecord of this end (``reason`` overrides, e.g. HUNG)."""
        detail = self.detail if self.hint is None else f"{self.hint}\n{self.detail}"
        return ExitRecord(index, name, pid, self.exit, reason or self.reason,
                          self.at or time.time(), uptime, detail.strip() or None)


def decode(outcome: Any, stop_requested: bool = False) -> ActorExit:
    """What ``run()``'s result (a dict) or its error (a Ray exception) says about the end."""
    now = time.time()
    if not isinstance(outcome, BaseException):
        code = int(outcome.get("code", 0)) if isinstance(outcome, dict) else 0
        stopped = bool(outcome.get("stopped")) if isinstance(outcome, dict) else False
        cause = DeathCause.RETURNED if code == 0 and not stopped else DeathCause.EXITED
        return ActorExit(cause, ExitStatus(code=code), StopReason.EXITED,
                         stop_requested=stop_requested or stopped, at=now)
    from ray import exceptions as rx

    exc = outcome
    text = str(exc)

    def died(cause: DeathCause, code: int | None = None, reason: StopReason | None = None,
             error: BaseException | None = exc) -> ActorExit:
        status = ExitStatus(code=code) if code is not None else None
        if reason is None:
            reason = StopReason.EXITED if status is not None else StopReason.KILLED
        return ActorExit(cause, status, reason, text, error, stop_requested, now)

    if isinstance(exc, rx.RayTaskError):
        user = getattr(exc, "cause", None)
        if isinstance(user, rx.TaskCancelledError):  # KeyboardInterrupt in the target
            return died(DeathCause.RAISED, 1)
        return ActorExit(DeathCause.RAISED, ExitStatus(code=1), StopReason.EXITED, text,
                         user if isinstance(user, BaseException) else exc, stop_requested, now)
    if isinstance(exc, rx.OutOfMemoryError):
        return died(DeathCause.OOM)
    if isinstance(exc, rx.NodeDiedError):
        return died(DeathCause.NODE_LOST)
    if isinstance(exc, rx.ActorUnavailableError):
        return died(DeathCause.UNAVAILABLE)
    if isinstance(exc, rx.ActorDiedError | rx.RayActorError):
        if exc.actor_init_failed:
            return died(DeathCause.START_FAILED, reason=StopReason.SPAWN_FAILED)
        if "killed by `ray.kill`" in text:
            return died(DeathCause.KILLED)
        if "node has died" in text or "node was terminated" in text:
            return died(DeathCause.NODE_LOST)
        if "running low on memory" in text or "memory monitor" in text:
            return died(DeathCause.OOM)
        match = _EXIT_CODE.search(text)
        return died(DeathCause.DIED, int(match.group(1)) if match else None)
    if isinstance(exc, rx.ActorUnschedulableError | rx.RuntimeEnvSetupError
                  | rx.ActorPlacementGroupRemoved):
        return died(DeathCause.START_FAILED, reason=StopReason.SPAWN_FAILED)
    return died(DeathCause.ERROR)
