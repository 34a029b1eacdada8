"""No log write of corral's half done in a child forked to run Python (the fork start method).

A fork copies every lock in the state it is in. corral logs from its own threads (the
monitor's exit lines, the compat layer's familiar lines) exactly when it restarts a worker,
which is when the spawner thread forks. If the fork lands inside one of those writes, the child
starts with whatever the write held: logging re-creates its handlers' locks in the child, but
not a lock of the program's own inside the stream (Duck wraps ``sys.stderr.write`` in one), so
the new worker blocks forever on its first print.

So every record of a ``corral`` logger is handled inside a gate (each such logger's ``handle``
is wrapped, at the first fork and whenever loggers were added since), and a fork waits at
the gate until no record is being handled. Records are handled side by side (a handler of one
pool that hangs never holds up another pool's records), and every wait is bounded by
:data:`WAIT` on both sides: a record waits at most that long for a fork in progress, a fork at
most that long for the records in progress. A handler of the program's that is stuck, or a
thread that logs while it holds a lock the fork needs (an ``os.register_at_fork`` hook's, the
import lock), can delay a fork or a record by that much once, never deadlock them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Iterator

__all__ = ["WAIT", "logging_held", "records_in_progress"]

# Seconds a fork waits for the corral records being handled (or a record for the forks in
# progress) before it goes ahead anyway.
WAIT = 0.5


class _Gate:
    """Records being handled and forks in progress: each side waits (bounded) for the other.

    What is still in progress when a wait runs out is taken for stuck (a hung handler, a fork
    held up in an at-fork hook): later waits are for the others only, so one stuck record
    costs one wait, not one per fork.
    """

    def __init__(self) -> None:
        # Reentrant: a signal handler may log while this thread is inside the gate.
        self.cond = threading.Condition(threading.RLock())
        self.records = 0
        self.forks = 0
        self.stuck_records = 0
        self.stuck_forks = 0


_gate = _Gate()
_local = threading.local()  # .depth: corral records this thread is handling (nested)
_seen = -1  # how many loggers there were when the corral ones were last wrapped


def _handle_guarded(logger: logging.Logger, record: logging.LogRecord) -> None:
    depth = getattr(_local, "depth", 0)
    gate = _gate
    counted = False
    # A record logged while handling one is part of it; one the forking thread logs is not
    # in the way of its own fork.
    if depth == 0 and not getattr(_local, "forking", False):
        with gate.cond:
            if (gate.forks > gate.stuck_forks
                    and not gate.cond.wait_for(lambda: gate.forks <= gate.stuck_forks, WAIT)):
                gate.stuck_forks = gate.forks
            gate.records += 1
            counted = True
    _local.depth = depth + 1
    try:
        type(logger).handle(logger, record)
    finally:
        _local.depth = depth
        if counted and gate is _gate:  # (a fork child, forked by a handler: a fresh gate)
            with gate.cond:
                gate.records -= 1
                gate.stuck_records = min(gate.stuck_records, gate.records)
                if gate.records <= gate.stuck_records:
                    gate.cond.notify_all()


def _wrap_corral_loggers() -> None:
    global _seen
    registry = logging.Logger.manager.loggerDict
    if _seen == len(registry):
        return
    for name, logger in list(registry.items()):
        if ((name == "corral" or name.startswith("corral.")) and isinstance(logger, logging.Logger)
                and "handle" not in vars(logger)):
            logger.handle = functools.partial(_handle_guarded, logger)  # type: ignore[method-assign]
    _seen = len(registry)


def records_in_progress() -> bool:
    """Whether a corral record is being handled now (a fork would wait for it; a hint, read
    without the lock)."""
    gate = _gate
    return gate.records > gate.stuck_records


@contextlib.contextmanager
def logging_held() -> Iterator[None]:
    """Around a fork: wait (at most :data:`WAIT`) until no corral record is being handled, and
    hold new ones back (as long) until the ``with`` body is done: none is half written in the
    child."""
    _wrap_corral_loggers()
    gate = _gate
    with gate.cond:
        gate.forks += 1
        if (gate.records > gate.stuck_records
                and not gate.cond.wait_for(lambda: gate.records <= gate.stuck_records, WAIT)):
            gate.stuck_records = gate.records
    _local.forking = True
    try:
        yield
    finally:
        _local.forking = False
        if gate is _gate:  # (in the child: a fresh gate, nothing to undo)
            with gate.cond:
                gate.forks -= 1
                gate.stuck_forks = min(gate.stuck_forks, gate.forks)
                if gate.forks <= gate.stuck_forks:
                    gate.cond.notify_all()


def _after_fork_in_child() -> None:
    # Another thread may have been inside the gate at the fork (its lock held, counts that
    # thread will never undo here): a fresh one, or this process could never log again.
    global _gate
    _gate = _Gate()
    # The forking thread's marks: a fork worker never returns into logging_held (it ends
    # with os._exit inside the fork's call), and its own pools' forks must gate its records.
    _local.forking = False
    _local.depth = 0


os.register_at_fork(after_in_child=_after_fork_in_child)
