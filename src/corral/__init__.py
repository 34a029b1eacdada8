"""corral: keeps pools of worker processes alive.

Start N workers, notice at once when one dies or hangs, restart it with backoff under a restart
budget, shut everything down within one deadline, and say what happened and why.
"""

from typing import TYPE_CHECKING

from corral.errors import CorralError, GaveUp, NotPicklable, RestartFailed, SupervisorStateError
from corral.events import Event, EventKind, ExitRecord, StopReason
from corral.exitstatus import ExitStatus
from corral.heartbeat import beat, in_worker, ready, set_status
from corral.policy import Backoff, RestartBudget, RestartPolicy, Strategy
from corral.spec import PoolSpec
from corral.states import WorkerState
from corral.status import WorkerStatus
from corral.supervisor import Supervisor

if TYPE_CHECKING:
    from corral.aio import AsyncSupervisor
    from corral.compat import (
        HeartbeatHealthCheck,
        HeartbeatUpdateNeverCalled,
        WorkerProcessManager,
    )
    from corral.futures import ProcessPoolExecutor
    from corral.pool import (
        MemoryLimitExceeded,
        PoolBroken,
        ProcessPool,
        TaskTimeout,
        UnpicklingFailed,
        WorkerLost,
    )

__version__ = "0.1.0"

_LAZY = {
    "AsyncSupervisor": "corral.aio",
    "WorkerProcessManager": "corral.compat",
    "HeartbeatHealthCheck": "corral.compat",
    "HeartbeatUpdateNeverCalled": "corral.compat",
    "ProcessPool": "corral.pool",
    "ProcessPoolExecutor": "corral.futures",
    "UnpicklingFailed": "corral.pool",
    "WorkerLost": "corral.pool",
    "TaskTimeout": "corral.pool",
    "MemoryLimitExceeded": "corral.pool",
    "PoolBroken": "corral.pool",
}


def __getattr__(name: str) -> object:
    # The compatibility layer, the pool and asyncio load on first use: `import corral` stays
    # light.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'corral' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)

__all__ = [
    "AsyncSupervisor",
    "Backoff",
    "CorralError",
    "Event",
    "EventKind",
    "ExitRecord",
    "ExitStatus",
    "GaveUp",
    "HeartbeatHealthCheck",
    "HeartbeatUpdateNeverCalled",
    "MemoryLimitExceeded",
    "NotPicklable",
    "PoolBroken",
    "PoolSpec",
    "ProcessPool",
    "ProcessPoolExecutor",
    "RestartBudget",
    "RestartFailed",
    "RestartPolicy",
    "StopReason",
    "Strategy",
    "Supervisor",
    "SupervisorStateError",
    "TaskTimeout",
    "UnpicklingFailed",
    "WorkerLost",
    "WorkerProcessManager",
    "WorkerState",
    "WorkerStatus",
    "beat",
    "in_worker",
    "ready",
    "set_status",
]
