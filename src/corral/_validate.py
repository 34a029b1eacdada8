"""Small argument checks whose errors name the parameter, what was expected and what was given."""

from __future__ import annotations

import math
import sys
import threading
from typing import Any

# The most workers a count may ask for: Linux's largest pid_max (PID_MAX_LIMIT on 64-bit
# machines); more processes cannot exist at once, so a larger count is a mistake, not a pool.
MAX_WORKERS = 4_194_304
_FLOAT_MAX = int(sys.float_info.max)


def _given(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def number(name: str, value: Any, *, minimum: float = 0.0, strict: bool = False,
           allow_inf: bool = False) -> float:
    """Check that ``value`` is a real number >= minimum (> when ``strict``); return it as float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {_given(value)}")
    if isinstance(value, int) and abs(value) > _FLOAT_MAX:
        # (past any float: math.isnan would raise OverflowError, which names no parameter)
        if allow_inf and value > 0:
            return math.inf
        raise ValueError(f"{name} must be a finite number, got an int of "
                         f"{value.bit_length()} bits")
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if strict and not value > minimum:
        raise ValueError(f"{name} must be > {minimum:g}, got {value!r}")
    if not strict and not value >= minimum:
        raise ValueError(f"{name} must be >= {minimum:g}, got {value!r}")
    return float(value)


def optional_number(name: str, value: Any, *, minimum: float = 0.0,
                    strict: bool = False) -> float | None:
    if value is None:
        return None
    return number(name, value, minimum=minimum, strict=strict)


def integer(name: str, value: Any, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {_given(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return value


def callable_(name: str, value: Any, *, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    if not callable(value):
        expected = "a callable or None" if optional else "a callable"
        raise TypeError(f"{name} must be {expected}, got {_given(value)}")
    return value


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {_given(value)}")
    return value


def choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def timeout(name: str, value: Any, *, positive: bool = False) -> float | None:
    """A timeout: None or ``math.inf`` (no limit), or a number >= 0 (> 0 when ``positive``).
    Returns None for no limit; so is any number too large for the threading primitives
    (``threading.TIMEOUT_MAX``, some 292 years), which would raise OverflowError in a wait."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be None or a number of seconds >= 0, got {_given(value)}")
    if isinstance(value, int) and value >= threading.TIMEOUT_MAX:
        return None  # (an int too large for a float: math.isnan would overflow)
    if math.isnan(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be None or a number of seconds {bound}, got {value!r}")
    return None if value >= threading.TIMEOUT_MAX else float(value)


def count(name: str, value: Any, *, minimum: int = 0) -> int:
    """A number of workers: an int from ``minimum`` to :data:`MAX_WORKERS`."""
    integer(name, value, minimum=minimum)
    if value > MAX_WORKERS:
        raise ValueError(f"{name} must be at most {MAX_WORKERS:,} (Linux's largest pid_max: no "
                         f"more processes can exist at once), got {value!r}")
    return int(value)


def index(name: str, value: Any) -> int:
    """A worker index: an int >= 0 (a bool is refused, though it is an int)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a worker index (an int >= 0), got {_given(value)}")
    if value < 0:
        raise ValueError(f"{name} must be a worker index (an int >= 0), got {value!r}")
    return value
