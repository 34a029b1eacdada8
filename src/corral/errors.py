"""corral's exceptions: one base class and a few precise, picklable subclasses."""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from corral.events import ExitRecord

__all__ = [
    "CorralError",
    "GaveUp",
    "IllegalTransition",
    "NotPicklable",
    "RestartFailed",
    "SupervisorStateError",
]


class CorralError(Exception):
    """Base class of every error corral raises on purpose."""


class SupervisorStateError(CorralError, RuntimeError):
    """A method was called in a state that does not allow it (e.g. ``start()`` twice)."""


class IllegalTransition(CorralError, RuntimeError):
    """The monitor tried a move the state table does not allow (a bug in corral)."""


class NotPicklable(CorralError, TypeError, pickle.PicklingError):
    """The target, its arguments or a result cannot be pickled to reach the other process.

    A ``TypeError`` (what pickle raises for most such objects) and a ``pickle.PicklingError``
    (what ``concurrent.futures`` code expects).
    """


class RestartFailed(CorralError, RuntimeError):
    """A rolling restart stopped: a replacement ended before it was ready. The workers not yet
    restarted keep running their old process."""


class GaveUp(CorralError):
    """The pool used up its restart budget and stopped.

    Attributes:
        history: the last exits that led to giving up, oldest first.
    """

    def __init__(self, message: str, history: Sequence[ExitRecord] = ()) -> None:
        super().__init__(message)
        self.history: tuple[ExitRecord, ...] = tuple(history)

    def __reduce__(self) -> tuple[type[GaveUp], tuple[str, tuple[ExitRecord, ...]]]:
        return (type(self), (str(self), self.history))
