"""Task functions for the ProcessPool tests.

They live at module level so that spawn and forkserver workers can import them (this directory is
on ``sys.path``, which multiprocessing passes on to its children). Coordination with the test goes
through files, never through timing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_initialized: Any = None
_leaked: list[bytearray] = []


def square(x: int) -> int:
    return x * x


def add(x: int, y: int = 0, *, z: int = 0) -> int:
    return x + y + z


def getpid() -> int:
    return os.getpid()


def pid_and_value(x: int) -> tuple[int, int]:
    return os.getpid(), x


def sleep_then(x: int, seconds: float) -> int:
    time.sleep(seconds)
    return x * 2


def spin(seconds: float) -> int:
    """Burn CPU for ``seconds``."""
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += 1
    return n


def hang_in_here() -> None:
    """Never returns (a recognisable name for the stack dump)."""
    while True:
        time.sleep(3600)


def hang_after_marker(path: str) -> None:
    Path(path).write_text(str(os.getpid()))
    hang_in_here()


def raise_value(x: int) -> None:
    raise ValueError(f"bad value {x}")


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def exit_with(code: int) -> None:
    os._exit(code)


def die_once(marker: str, value: int) -> int:
    """SIGKILLs its worker the first time (when ``marker`` does not exist yet)."""
    path = Path(marker)
    if not path.exists():
        path.write_text("died once")
        os.kill(os.getpid(), signal.SIGKILL)
    return value


def hog(megabytes: int, hold: float) -> int:
    """Take ``megabytes`` of resident memory and hold it."""
    block = bytearray(b"\x01") * (megabytes << 20)  # written, so resident
    time.sleep(hold)
    return len(block)


def leak(megabytes: int) -> int:
    """Keep ``megabytes`` resident after the task returns; returns the pid."""
    _leaked.append(bytearray(b"\x01") * (megabytes << 20))
    return os.getpid()


def lambda_result() -> Any:
    return lambda: 1


class NeedsTwoArgs(Exception):
    """Pickles, but cannot be rebuilt: __init__ needs two arguments, args holds one."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}/{b}")


def raise_unrebuildable() -> None:
    raise NeedsTwoArgs(1, 2)


def init_set(value: Any) -> None:
    global _initialized
    _initialized = value


def get_initialized() -> Any:
    return _initialized


def init_fail() -> None:
    raise RuntimeError("initializer says no")


def init_fail_differently() -> None:
    raise RuntimeError(f"initializer says no in pid {os.getpid()}")


def start_grandchild(path: str) -> None:
    """Start a long-sleeping child, write its pid to ``path``, then hang."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    Path(path).write_text(str(child.pid))
    hang_in_here()


def length(data: bytes) -> int:
    return len(data)


def make_bytes(n: int) -> bytes:
    return b"x" * n


def init_hang_in_here() -> None:
    hang_in_here()


# ------------------------------------------------------- pickling in both directions (futures)


def _exit_now() -> None:
    sys.exit(1)


class ExitAtUnpickle:
    """Unpickling it raises SystemExit (in the worker for a task, in the parent for a result)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return _exit_now, ()


class ExitAtPickle:
    """Pickling it raises SystemExit."""

    def __reduce__(self) -> tuple[Any, ...]:
        sys.exit(1)


class ErrorAtUnpickle:
    """Unpickling it raises ValueError."""

    def __reduce__(self) -> tuple[Any, ...]:
        return int, ("not a number",)


def return_instance(cls: type) -> Any:
    return cls()


def identity(x: Any) -> Any:
    return x


def exit_task() -> None:
    sys.exit(3)


def raise_runtime() -> None:
    raise RuntimeError(123)  # the remote line the traceback must show


def init_put(queue: Any, lock: Any, event: Any) -> None:
    with lock:
        queue.put(os.getpid())
    event.set()


class Payload:
    """A result whose lifetime the parent watches with a weakref."""
