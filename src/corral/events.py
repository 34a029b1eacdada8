"""Lifecycle event records: what happened to which worker, when and why."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from corral.exitstatus import ExitStatus
from corral.states import StopReason

__all__ = ["Event", "EventKind", "ExitRecord"]


class EventKind(enum.Enum):
    SPAWNED = "spawned"
    READY = "ready"
    EXITED = "exited"
    UNHEALTHY = "unhealthy"
    RESTARTING = "restarting"  # a restart is scheduled (with its delay)
    GAVE_UP = "gave up"
    STOPPED = "stopped"  # the whole pool stopped


@dataclass(frozen=True)
class ExitRecord:
    """One ended worker process.

    Attributes:
        index, name, pid: which worker.
        exit: how the process ended (None if it never started).
        reason: why (by itself, or which decision of corral's).
        at: ``time.time()`` of the exit.
        uptime: seconds it ran.
        detail: extra evidence: a stack dump for a hung worker, the failed check, the error.
    """

    index: int
    name: str
    pid: int | None
    exit: ExitStatus | None
    reason: StopReason
    at: float
    uptime: float
    detail: str | None = None

    def describe(self) -> str:
        how = self.exit.describe() if self.exit else "no process"
        text = f"worker {self.name!r} (index {self.index}, pid {self.pid}): {self.reason.value}, "
        text += f"{how} after {self.uptime:.2f}s"
        hint = self.exit.hint if self.exit and not self.reason.by_corral else None
        return text + (f" ({hint})" if hint else "")


@dataclass(frozen=True)
class Event:
    """Something that happened in a pool, delivered to subscribers off the monitor thread."""

    kind: EventKind
    pool: str
    index: int | None
    name: str | None
    pid: int | None
    at: float
    exit: ExitRecord | None = None
    delay: float | None = None  # RESTARTING: seconds until the restart
    message: str = ""
