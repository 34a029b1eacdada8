"""Lifecycle event records: what happened to which worker, when and why."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from corral.exitstatus import ExitStatus

__all__ = ["Event", "EventKind", "ExitRecord", "StopReason"]


class StopReason(enum.Enum):
    """Why a worker's process ended (what ``status()`` and the events report)."""

    EXITED = "exited"  # exited by itself with a code
    KILLED = "killed by signal"  # died of a signal corral did not send
    SPAWN_FAILED = "spawn failed"
    HUNG = "hung"  # no heartbeat within the timeout
    STARTUP_TIMEOUT = "startup timeout"  # never became ready within the startup grace
    UNHEALTHY = "unhealthy"  # the health check failed too often
    RECYCLED_MEMORY = "recycled: memory"
    RECYCLED_AGE = "recycled: age"
    SCALED_DOWN = "scaled down"
    RESTARTED = "restarted on request"
    GROUP_RESTART = "restarted with its group"  # one_for_all / rest_for_one
    SHUTDOWN = "shut down"
    STOPPED = "stopped on request"  # kept stopped (the corral command's `stop`)
    GAVE_UP = "pool gave up"

    @property
    def by_corral(self) -> bool:
        return self not in (StopReason.EXITED, StopReason.KILLED, StopReason.SPAWN_FAILED)


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
        why = (self.detail if self.reason is StopReason.GROUP_RESTART and self.detail
               else self.reason.value)
        text = f"worker {self.name!r} (index {self.index}, pid {self.pid}): {why}, "
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
    standby: bool = False  # about a hot standby (index None), not a worker

    def to_json(self) -> dict[str, Any]:
        """The ``corral.event/1`` object (docs/json-schema.md), as ``corral events --json``
        prints it and corral's log records carry it (``record.corral``)."""
        from corral._json import event_to_json

        return event_to_json(self)
