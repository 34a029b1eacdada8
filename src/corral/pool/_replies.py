"""What a worker's message means, beyond the everyday result and hello: the errors a task's
future gets, and an initializer's failure. Pure: no IO, no records."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from corral.errors import NotPicklable
from corral.pool._failures import last_line
from corral.pool._wire import WireKind
from corral.pool.errors import RemoteTraceback, UnpicklingFailed

__all__ = ["InitFailed", "interpret", "unreadable"]

log = logging.getLogger("corral.procpool")


@dataclass(frozen=True, slots=True)
class InitFailed:
    """The worker's initializer raised; the worker exits next."""

    error: str  # for the exit record: "its initializer raised:\n<traceback>"
    summary: str  # the traceback's last line: "RuntimeError: initializer says no"
    exc: BaseException | None  # what it raised, its traceback as __cause__ (None: unpicklable)


def safe_str(obj: object) -> str:
    try:
        return str(obj)
    except BaseException:
        return f"<{type(obj).__name__} whose str() failed>"


def _remote(tb: str) -> RemoteTraceback:
    return RemoteTraceback(f'\n"""\n{tb}"""')


def interpret(msg: Any, label: str | None, drop_in: bool, who: str
              ) -> InitFailed | BaseException | None:
    """A worker's message other than a result or hello.

    Args:
        msg: the unpickled message.
        label: the running task's label, None if the worker runs none.
        drop_in: concurrent.futures' behaviour (a result that cannot be pickled fails with the
            pickling error itself).
        who: the pool and worker, for the log line about an unknown message.

    Returns:
        :class:`InitFailed`; the exception the running task's future gets (its traceback in
        the worker as ``__cause__``); or None: nothing to do.
    """
    err: BaseException
    match msg:
        case (WireKind.INIT_FAILED, str() as text, exc):
            if isinstance(exc, BaseException):
                exc.__cause__ = _remote(text)
            else:
                exc = None
            return InitFailed(f"its initializer raised:\n{text}", last_line(text), exc)
        case (WireKind.RAISED, BaseException() as err, str() as tb):
            pass
        case (WireKind.UNPICKLABLE, str() as text, str() as tb, original):
            # The task ended, but its result (or exception) could not be pickled.
            err = (original if drop_in and isinstance(original, BaseException)  # as the stdlib
                   else NotPicklable(f"{label}: {text}"))
        case (WireKind.UNDECODABLE, str() as text, str() as tb):
            err = UnpicklingFailed(f"{label}: {text}")
        case _:
            log.error("%s: unknown message: %.200r", who, msg)
            return None
    if label is None:
        return None  # a reply for a task given up on (cannot happen: we stop reading)
    if tb:
        err.__cause__ = _remote(tb)
    return err


def unreadable(exc: BaseException, label: str | None, who: str) -> BaseException | None:
    """A message that could not be unpickled (``exc``): the running task's error, if any."""
    if label is None:
        log.error("%s: unreadable message: %s: %s", who, type(exc).__name__, safe_str(exc))
        return None
    err = UnpicklingFailed(f"the result of {label} could not be unpickled in the parent "
                           f"({type(exc).__name__}: {safe_str(exc)})")
    err.__cause__ = exc
    return err
