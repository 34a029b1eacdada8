"""Logging's locks held across a fork whose child runs Python (the fork start method).

A fork copies every lock in the state it is in. corral logs from its own threads (the
monitor's exit lines, the compat layer's familiar lines) exactly when it restarts a worker,
which is when the spawner thread forks. If the fork lands inside one of those writes, the child
starts with whatever the write held: logging re-creates its handlers' locks in the child, but
not a lock of the program's own inside the stream (Duck wraps ``sys.stderr.write`` in one), so
the new worker blocks forever on its first print.

So around such a fork the spawner holds logging's module lock, then the lock of every handler a
record of corral's can reach (the ``corral`` loggers' handlers and their ancestors', and
logging's last resort): no write of corral's is half done in the child. The order (module lock
first) is the one ``logging.config`` takes. Each lock is waited for at most :data:`WAIT`
seconds: a handler stuck in a write (a full pipe) delays a fork, never stops it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

__all__ = ["WAIT", "logging_held"]

# Seconds to wait for one lock before forking without it.
WAIT = 0.5

# (how many loggers there were, the corral loggers among them): rescanned when loggers are added.
_corral_loggers: tuple[int, list[logging.Logger]] = (-1, [])


def _loggers() -> list[logging.Logger]:
    global _corral_loggers
    registry = logging.Logger.manager.loggerDict
    seen, found = _corral_loggers
    if seen != len(registry):
        found = [lg for name, lg in list(registry.items())
                 if (name == "corral" or name.startswith("corral."))
                 and isinstance(lg, logging.Logger)]
        _corral_loggers = (len(registry), found)
    return found


def _locks() -> list[Any]:
    """Logging's module lock, then each distinct handler lock a corral record can reach."""
    locks: list[Any] = [logging._lock]  # type: ignore[attr-defined]
    seen: set[int] = set()
    for start in _loggers():
        logger: logging.Logger | None = start
        while logger is not None:
            for handler in logger.handlers:
                if id(handler) not in seen and handler.lock is not None:
                    seen.add(id(handler))
                    locks.append(handler.lock)
            logger = logger.parent if logger.propagate else None
    last = logging.lastResort
    if last is not None and id(last) not in seen and last.lock is not None:
        locks.append(last.lock)
    return locks


@contextlib.contextmanager
def logging_held() -> Iterator[None]:
    """Hold logging's locks (see the module's docstring) for the ``with`` body: a fork."""
    held: list[Any] = []
    try:
        for lock in _locks():
            if lock.acquire(timeout=WAIT):
                held.append(lock)
        yield
    finally:
        for lock in reversed(held):
            with contextlib.suppress(RuntimeError):
                lock.release()
