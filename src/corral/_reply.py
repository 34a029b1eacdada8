"""A one-shot answer from a loop thread to the thread that asked (a command's result)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

__all__ = ["Reply"]


class Reply:
    """Finished once, from the loop thread; waited for by the caller."""

    __slots__ = ("_callbacks", "done", "error", "result")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self._callbacks: list[Callable[[Reply], None]] = []

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        if self.done.is_set():
            return
        self.result, self.error = result, error
        self.done.set()
        for callback in self._callbacks:
            callback(self)

    def add_done_callback(self, callback: Callable[[Reply], None]) -> None:
        """Call ``callback(reply)`` once it is finished (on the finishing thread; at once if
        it is finished already). For a caller on the same loop thread, which cannot wait."""
        if self.done.is_set():
            callback(self)
        else:
            self._callbacks.append(callback)

    def wait(self, timeout: float | None = None, what: str = "the command") -> Any:
        """The result; raises the command's error.

        Raises:
            TimeoutError: no answer within ``timeout`` seconds.
        """
        if not self.done.wait(timeout):
            raise TimeoutError(f"{what} did not finish within {timeout} s")
        if self.error is not None:
            raise self.error
        return self.result
