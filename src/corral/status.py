"""Immutable snapshots of a pool's workers, as returned by ``Supervisor.status()``."""

from __future__ import annotations

from dataclasses import dataclass

from corral.events import ExitRecord, StopReason
from corral.states import WorkerState

__all__ = ["WorkerStatus"]


@dataclass(frozen=True)
class WorkerStatus:
    """One worker at the moment ``status()`` was called.

    Attributes:
        index, name, pid: which worker (pid None while it has no process).
        state: its :class:`WorkerState`.
        ready: it signalled readiness (or needs none) and is RUNNING.
        restarts: how many times it was started again.
        started_at: ``time.time()`` its current process started, or None.
        uptime: seconds its current process has run, or 0.
        heartbeat_age: seconds since its last beat, or None (never beat / no process).
        status_text: what the worker last passed to ``corral.set_status``.
        last_exit: how its previous process ended, or None.
        last_reason: why it last stopped, or None.
        next_restart_in: seconds until a scheduled restart (BACKOFF), or None.
    """

    index: int
    name: str
    pid: int | None
    state: WorkerState
    ready: bool
    restarts: int
    started_at: float | None
    uptime: float
    heartbeat_age: float | None
    status_text: str
    last_exit: ExitRecord | None
    next_restart_in: float | None

    @property
    def alive(self) -> bool:
        return self.state.alive

    @property
    def last_reason(self) -> StopReason | None:
        return self.last_exit.reason if self.last_exit else None
