"""ProcessPool: a process pool whose workers may die, hang or bloat without breaking it.

::

    executor.py      ProcessPool: the public executor (checks, pickling, map, shutdown)
    errors.py        what a future may raise: WorkerLost, TaskTimeout, PoolBroken, ...
    _future.py       its future (cancel() stops a running task) and map's results
    _runner.py       the pool's threads: the manager thread and the spawner thread
    _manager.py      PoolManager: every worker and task record, on the manager thread
    _roster.py, _limits.py, _failures.py, _replies.py, _shared.py, _records.py: its parts
    _conn.py         non-blocking IO on a worker's socket
    _wire.py         the wire protocol, without IO (frames, message kinds)
    _worker.py       the worker side

The names below load on first use: a worker process imports ``corral.pool._worker`` (and so this
package) without the manager's modules.
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from corral.pool.errors import (
        MemoryLimitExceeded,
        PoolBroken,
        RemoteTraceback,
        TaskTimeout,
        UnpicklingFailed,
        WorkerLost,
    )
    from corral.pool.executor import ProcessPool

__all__ = [
    "MemoryLimitExceeded",
    "PoolBroken",
    "ProcessPool",
    "RemoteTraceback",
    "TaskTimeout",
    "UnpicklingFailed",
    "WorkerLost",
]

_LAZY = {name: "corral.pool.errors" for name in __all__}
_LAZY["ProcessPool"] = "corral.pool.executor"


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'corral.pool' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
