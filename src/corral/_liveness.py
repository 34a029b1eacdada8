"""When a worker must next show life, and what it is if it has not: pure functions of the
spec, the worker's state and its last beat (monotonic times), tested without processes."""

from __future__ import annotations

from corral.events import StopReason
from corral.spec import PoolSpec
from corral.states import WorkerState

__all__ = ["due", "next_look"]


def due(spec: PoolSpec, state: WorkerState, started: float | None, last: float,
        ) -> tuple[float, StopReason] | None:
    """The time by which a worker must have shown life, and the verdict if it has not.

    Args:
        state: the worker's state (only STARTING and RUNNING workers are watched).
        started: when its process started (None: no process).
        last: its last beat, 0 for never.
    """
    if started is None or (state is not WorkerState.RUNNING and state is not WorkerState.STARTING):
        return None
    hbt, sut = spec.heartbeat_timeout, spec.startup_timeout
    if state is WorkerState.STARTING and sut is not None:
        # Still in its startup grace: only the grace counts, however it beats.
        return started + sut, StopReason.STARTUP_TIMEOUT
    if hbt is None:
        return None
    if last > 0:
        return last + hbt, StopReason.HUNG
    # Never beat: allowed the startup grace (or one heartbeat timeout) from its start.
    return started + (sut if sut is not None else hbt), StopReason.STARTUP_TIMEOUT


def next_look(spec: PoolSpec, due_at: float, last: float, now: float) -> float:
    """When to look at a worker next: its due time, or sooner while it has never beaten.

    A first beat wakes nobody, so a worker inside a long startup grace is looked at again after
    one heartbeat timeout; from then on its deadline is ``last beat + timeout``.
    """
    hbt = spec.heartbeat_timeout
    if last == 0.0 and hbt is not None:
        return min(due_at, now + hbt)
    return due_at
