"""Values in corral's config: durations, sizes, signals, env files, and the error types.

Each parser raises TypeError/ValueError with what it expects; the config validator turns that
into a :class:`ConfigIssue` with the file, line and key.
"""

from __future__ import annotations

import math
import re
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from corral.errors import CorralError

__all__ = [
    "ConfigError",
    "ConfigIssue",
    "parse_duration",
    "parse_env_file",
    "parse_signal",
    "parse_size",
]

_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# ------------------------------------------------------------------------------ errors


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a config file."""

    file: str
    line: int | None
    key: str
    expected: str
    given: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key}: expected {self.expected}, got {self.given}"


class ConfigError(CorralError, ValueError):
    """A config file has problems; ``issues`` lists every one of them."""

    def __init__(self, issues: Iterable[ConfigIssue]) -> None:
        self.issues: tuple[ConfigIssue, ...] = tuple(issues)
        n = len(self.issues)
        head = f"{n} error{'s' if n != 1 else ''} in {self.issues[0].file if n else 'config'}"
        super().__init__(head + ":\n" + "\n".join(f"  {i}" for i in self.issues))


def _given(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({_type_name(value)})"


def _type_name(value: Any) -> str:
    return {str: "string", int: "integer", float: "float", bool: "boolean", list: "array",
            dict: "table"}.get(type(value), type(value).__name__)


# ------------------------------------------------------------------------------ scalars


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string like ``"1h30m"``, ``"500ms"``; ValueError if bad."""
    if isinstance(value, bool):
        raise TypeError("a duration must be a number of seconds or a string like '30s'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)", text)
        if not parts or re.sub(r"\s+", "", "".join(a + u for a, u in parts)) != \
                re.sub(r"\s+", "", text):
            raise ValueError("a duration must look like '30s', '500ms', '5m', '1h30m'")
        unit = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
        seconds = sum(float(a) * unit[u] for a, u in parts)
    else:
        raise TypeError("a duration must be a number of seconds or a string like '30s'")
    if math.isnan(seconds) or math.isinf(seconds) or seconds < 0:
        raise ValueError("a duration must be finite and >= 0")
    return seconds


_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1024 ** 2,
               "mib": 1024 ** 2, "mb": 1000 ** 2, "g": 1024 ** 3, "gib": 1024 ** 3,
               "gb": 1000 ** 3, "t": 1024 ** 4, "tib": 1024 ** 4, "tb": 1000 ** 4}


def parse_size(value: Any) -> int:
    """Bytes from an integer or a string like ``"512MiB"``; ValueError if bad."""
    if isinstance(value, bool):
        raise TypeError("a size must be a number of bytes or a string like '512MiB'")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", value)
        unit = m.group(2).lower() if m else ""
        if not m or unit not in _SIZE_UNITS:
            raise ValueError("a size must look like 1048576, '512MiB', '1GB' or '64k'")
        size = int(float(m.group(1)) * _SIZE_UNITS[unit])
    else:
        raise TypeError("a size must be a number of bytes or a string like '512MiB'")
    if size < 0:
        raise ValueError("a size must be >= 0")
    return size


def parse_signal(value: Any) -> signal.Signals:
    """A signal from ``"TERM"``, ``"SIGTERM"``, ``"term"`` or ``15``; ValueError if unknown."""
    if isinstance(value, bool):
        raise TypeError("a signal must be a name like 'TERM' or a number")
    if isinstance(value, int):
        try:
            return signal.Signals(value)
        except ValueError:
            raise ValueError(f"no signal number {value}") from None
    if isinstance(value, str):
        name = value.strip().upper()
        if name.isdigit():
            return parse_signal(int(name))
        if not name.startswith("SIG"):
            name = "SIG" + name
        try:
            return signal.Signals[name]
        except KeyError:
            raise ValueError(f"no signal named {value!r}") from None
    raise TypeError("a signal must be a name like 'TERM' or a number")


# ------------------------------------------------------------------------------ env files


def parse_env_file(text: str, file: str = "<env>") -> tuple[dict[str, str], list[ConfigIssue]]:
    """``KEY=VALUE`` lines (``#`` comments, optional ``export``, quotes); no expansion.

    Double-quoted values understand ``\\n \\t \\" \\\\ \\$``; single-quoted ones are literal;
    unquoted ones end at `` #`` and are stripped.
    """
    env: dict[str, str] = {}
    issues: list[ConfigIssue] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[7:].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not _ENV_KEY.match(key):
            issues.append(ConfigIssue(file, lineno, key or raw.strip(), "KEY=VALUE with a "
                                      "KEY of letters, digits and _", _given(raw.strip())))
            continue
        value = value.strip()
        if value[:1] == '"':
            m = re.fullmatch(r'"((?:[^"\\]|\\.)*)"\s*(#.*)?', value)
            if not m:
                issues.append(ConfigIssue(file, lineno, key, "a closing \" on the same line",
                                          _given(value)))
                continue
            value = re.sub(r"\\(.)", lambda c: {"n": "\n", "t": "\t", "r": "\r"}.get(
                c.group(1), c.group(1)), m.group(1))
        elif value[:1] == "'":
            m = re.fullmatch(r"'([^']*)'\s*(#.*)?", value)
            if not m:
                issues.append(ConfigIssue(file, lineno, key, "a closing ' on the same line",
                                          _given(value)))
                continue
            value = m.group(1)
        else:
            value = re.split(r"\s+#", value, maxsplit=1)[0].strip()
        env[key] = value
    return env, issues


