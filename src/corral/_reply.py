"""A one-shot answer from a loop thread to the thread that asked (a command's result)."""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["Reply"]


class Reply:
    """Finished once, from the loop thread; waited for by the caller."""

    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        if self.done.is_set():
            return
        self.result, self.error = result, error
        self.done.set()

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
