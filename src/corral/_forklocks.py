"""No log write of corral's half done in a child forked to run Python (the fork start method).

A fork copies every lock in the state it is in. corral logs from its own threads (the
monitor's exit lines, the compat layer's familiar lines) exactly when it restarts a worker,
which is when the spawner thread forks. If the fork lands inside one of those writes, the child
starts with whatever the write held: logging re-creates its handlers' locks in the child, but
not a lock of the program's own inside the stream (Duck wraps ``sys.stderr.write`` in one), so
the new worker blocks forever on its first print.

So every record of a ``corral`` logger is handled under one lock of corral's (each such
logger's ``handle`` is wrapped, at the first fork and whenever loggers were added since), and
the spawner holds that lock across such a fork. It holds no lock of anyone else's: a handler
of the program's that is stuck, or a thread that logs while it holds a lock the fork needs
(the import lock), can delay a fork by at most :data:`WAIT` seconds, never deadlock it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Iterator

__all__ = ["WAIT", "logging_held"]

# Seconds a fork waits for a corral record being written before it goes ahead anyway.
WAIT = 0.5

_guard = threading.RLock()
_seen = -1  # how many loggers there were when the corral ones were last wrapped


def _handle_guarded(logger: logging.Logger, record: logging.LogRecord) -> None:
    with _guard:
        type(logger).handle(logger, record)


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


@contextlib.contextmanager
def logging_held() -> Iterator[None]:
    """Hold corral's logging guard for the ``with`` body (a fork): no corral record is half
    written in the child."""
    _wrap_corral_loggers()
    got = _guard.acquire(timeout=WAIT)
    try:
        yield
    finally:
        if got:
            with contextlib.suppress(RuntimeError):  # a fork child's fresh lock (see below)
                _guard.release()


def _after_fork_in_child() -> None:
    # Held by the forking thread at the fork: a fresh one, or the child's other threads could
    # never log through corral's loggers again.
    global _guard
    _guard = threading.RLock()


os.register_at_fork(after_in_child=_after_fork_in_child)
