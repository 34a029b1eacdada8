"""Task functions of the ProcessPool tests run on both backends.

A local worker imports this module; a Ray actor gets it by value (the tests register it with
cloudpickle), as a Ray program sends the functions of its ``__main__``. Coordination with the
test goes through files, never through timing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


class Oops(Exception):
    """A user's own exception type: it must come back as itself."""


def square(x: int) -> int:
    return x * x


def add(x: int, y: int = 0, *, z: int = 0) -> int:
    return x + y + z


def getpid() -> int:
    return os.getpid()


def sleep_then(x: int, seconds: float) -> int:
    time.sleep(seconds)
    return x * 2


def raise_value(x: int) -> None:
    raise ValueError(f"bad value {x}")


def raise_oops(what: str) -> None:
    raise Oops(what)


def exit_now(code: int) -> None:
    os._exit(code)


def die_once(marker: str, value: int) -> int:
    """Dies the first time (leaving a marker), returns ``value`` the next."""
    path = Path(marker)
    if not path.exists():
        path.write_text(str(os.getpid()))
        os._exit(1)
    return value


def hang_in_here() -> None:
    """Never returns on its own (a recognisable name for the stack dump)."""
    while True:
        time.sleep(60)


def hang_after_marker(path: str) -> None:
    Path(path).write_text(str(os.getpid()))
    hang_in_here()


def sleep_after_marker(path: str, seconds: float) -> int:
    Path(path).write_text(str(os.getpid()))
    time.sleep(seconds)
    return os.getpid()


# The initializer's mark is kept in the environment of the worker's process: on Ray each
# function of this module arrives by value with globals of its own, so a module global set by
# one would not be seen by another.
def init_set(value: str) -> None:
    os.environ["CORRAL_TEST_INITIALIZED"] = value


def get_initialized() -> str | None:
    return os.environ.get("CORRAL_TEST_INITIALIZED")


def init_fail() -> None:
    raise RuntimeError("initializer says no")


def env(name: str) -> str | None:
    return os.environ.get(name)


def stop_self_after_marker(path: str) -> None:
    """SIGSTOPs its own process: a hang no thread of the actor can answer for."""
    import signal

    Path(path).write_text(str(os.getpid()))
    # Stopped for good: something outside corral (corral sends Ray actors no SIGCONT) can
    # continue it (see ray_targets.stops_itself); the task must not return then.
    while True:
        os.kill(os.getpid(), signal.SIGSTOP)
