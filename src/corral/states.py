"""Worker states, the triggers that move them, and the table of allowed moves.

The monitor asks :func:`check` before every move; a pair that is not in the table is a bug and
raises :class:`IllegalTransition` naming the worker, its pid, state and trigger.
"""

from __future__ import annotations

import enum

from corral.errors import IllegalTransition
from corral.events import StopReason  # re-exported: it used to live here

__all__ = ["TRANSITIONS", "IllegalTransition", "StopReason", "Trigger", "WorkerState", "check"]


class WorkerState(enum.Enum):
    PENDING = "pending"  # waiting for the spawner thread to start a process
    STARTING = "starting"  # process runs, not ready yet
    RUNNING = "running"  # process runs and is ready
    STOPPING = "stopping"  # stop signal sent, waiting for it to exit
    BACKOFF = "backoff"  # dead, restart scheduled after a delay
    EXITED = "exited"  # dead by itself, the restart policy says no more
    STOPPED = "stopped"  # stopped by corral (shutdown, scale-down, gave up)

    @property
    def alive(self) -> bool:
        return self in (WorkerState.STARTING, WorkerState.RUNNING, WorkerState.STOPPING)

    @property
    def final(self) -> bool:
        return self in (WorkerState.EXITED, WorkerState.STOPPED)


class Trigger(enum.Enum):
    SPAWNED = "spawned"
    SPAWN_FAILED = "spawn failed"
    READY = "ready"
    EXITED = "exited"
    STOP = "stop"  # corral decided to stop it (shutdown, scale, restart, hung, recycle, ...)
    KILL = "stop timeout"  # the grace ran out: SIGKILL
    BACKOFF_OVER = "backoff over"
    RESTART = "restart"  # asked to start again now (restart(i), rolling restart)


S, T = WorkerState, Trigger

# (state, trigger) -> the states it may lead to. Which one is the policy's decision.
TRANSITIONS: dict[tuple[WorkerState, Trigger], frozenset[WorkerState]] = {
    # PENDING -> STARTING: the spawner started the process.
    (S.PENDING, T.SPAWNED): frozenset({S.STARTING}),
    # PENDING -> BACKOFF/EXITED: start failed; counts as a crash.
    (S.PENDING, T.SPAWN_FAILED): frozenset({S.BACKOFF, S.EXITED, S.STOPPED}),
    # PENDING -> STOPPED: stopped before its process existed (it is stopped once it appears).
    (S.PENDING, T.STOP): frozenset({S.PENDING, S.STOPPED}),
    # STARTING -> RUNNING: ready() called, first beat, or no readiness required.
    (S.STARTING, T.READY): frozenset({S.RUNNING}),
    (S.RUNNING, T.READY): frozenset({S.RUNNING}),
    (S.STOPPING, T.READY): frozenset({S.STOPPING}),
    # STARTING/RUNNING -> BACKOFF/PENDING/EXITED: died by itself; restart later, now, or never.
    (S.STARTING, T.EXITED): frozenset({S.BACKOFF, S.PENDING, S.EXITED, S.STOPPED}),
    (S.RUNNING, T.EXITED): frozenset({S.BACKOFF, S.PENDING, S.EXITED, S.STOPPED}),
    # STARTING/RUNNING -> STOPPING: corral sends the stop signal.
    (S.STARTING, T.STOP): frozenset({S.STOPPING}),
    (S.RUNNING, T.STOP): frozenset({S.STOPPING}),
    # STOPPING -> STOPPING: a second reason (e.g. shutdown during a restart) or the grace ran out.
    (S.STOPPING, T.STOP): frozenset({S.STOPPING}),
    (S.STOPPING, T.KILL): frozenset({S.STOPPING}),
    # STOPPING -> *: the process is gone; restart now, later, or keep it down.
    (S.STOPPING, T.EXITED): frozenset({S.PENDING, S.BACKOFF, S.EXITED, S.STOPPED}),
    # BACKOFF -> PENDING: the delay is over.
    (S.BACKOFF, T.BACKOFF_OVER): frozenset({S.PENDING}),
    # BACKOFF -> PENDING: restart asked for explicitly skips the rest of the delay.
    (S.BACKOFF, T.RESTART): frozenset({S.PENDING}),
    (S.BACKOFF, T.STOP): frozenset({S.STOPPED}),
    # EXITED -> PENDING: an explicit restart brings a finished worker back.
    (S.EXITED, T.RESTART): frozenset({S.PENDING}),
    (S.EXITED, T.STOP): frozenset({S.EXITED, S.STOPPED}),
    (S.STOPPED, T.STOP): frozenset({S.STOPPED}),
}


def check(state: WorkerState, trigger: Trigger, new: WorkerState, who: str) -> None:
    """Raise :class:`IllegalTransition` unless ``state --trigger--> new`` is in the table."""
    allowed = TRANSITIONS.get((state, trigger))
    if allowed is None or new not in allowed:
        raise IllegalTransition(
            f"{who}: no transition from {state.name} on {trigger.name} to {new.name}"
            + (f" (allowed: {', '.join(s.name for s in allowed)})" if allowed else "")
        )
