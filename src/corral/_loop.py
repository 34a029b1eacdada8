"""The event-loop interface that corral's IO building blocks are written against.

Log pipes, the control socket, notify sockets and readiness probes are sans-IO-ish classes: they
never own a thread or a selector. They take a :class:`Loop` and register callbacks on it. The
supervisor's reactor provides one; the tests use a small ``selectors`` implementation.

Every callback runs on the loop's thread. Only :meth:`Loop.call_soon_threadsafe` may be called
from another thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

__all__ = ["Loop", "TimerHandle", "WriterLoop"]


class TimerHandle(Protocol):
    """What :meth:`Loop.call_later` returns."""

    def cancel(self) -> None:
        """Do not run the callback (a no-op once it ran or was cancelled)."""


@runtime_checkable
class Loop(Protocol):
    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback()`` whenever ``fd`` is readable (replaces an earlier reader of fd)."""

    def remove_reader(self, fd: int) -> None:
        """Stop watching ``fd`` for reading (a no-op if it was not watched)."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        """Call ``callback()`` once, ``delay`` seconds from now (monotonic clock)."""

    def call_soon_threadsafe(self, callback: Callable[..., None], *args: Any) -> None:
        """From any thread: run ``callback(*args)`` on the loop thread, soon."""


@runtime_checkable
class WriterLoop(Loop, Protocol):
    """A loop that can also wait for writability (optional).

    Writers (:mod:`corral._outbuf`) use it when the loop has it; otherwise they retry a blocked
    write with :meth:`Loop.call_later` (a short, growing delay), which only happens while an
    output is congested.
    """

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None: ...

    def remove_writer(self, fd: int) -> None: ...
