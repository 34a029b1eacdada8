"""Validation of a parsed config file into :mod:`corral.cli._model` objects.

Every check records a :class:`~corral.cli._values.ConfigIssue` (file, line, key, expected,
given) and goes on, so that one run reports every problem of a file.
"""

from __future__ import annotations

import difflib
import grp
import math
import os
import pwd
import re
import signal
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import fields
from types import MappingProxyType
from typing import Any

from corral._readiness import parse_ready
from corral.cli._locate import Locator
from corral.cli._model import Config, LogConfig, ProgramConfig, ServeConfig
from corral.cli._values import (
    ConfigError,
    ConfigIssue,
    _given,
    parse_duration,
    parse_env_file,
    parse_signal,
    parse_size,
)
from corral.policy import Backoff, RestartBudget, RestartPolicy

__all__ = ["MAX_NUMPROCS", "Ctx", "check_privileges", "validate"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_TARGET = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_BAD_STOP_SIGNALS = {signal.SIGKILL, signal.SIGSTOP, signal.SIGCONT, signal.SIGCHLD}
MAX_NUMPROCS = 4096
MAX_ENV_FILE = 1024 * 1024  # bytes of one env_file
_ENV_FILE_EXPECTED = "a regular file of UTF-8 KEY=VALUE lines, at most 1 MiB"
_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))


def _not_a_regular_file(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    return next((what for test, what in _FILE_KINDS if test(mode)), "not a regular file")


def _read_env_file(path: str) -> str:
    """The text of the env file ``path``: a regular file, at most :data:`MAX_ENV_FILE` bytes.

    Never blocks and never reads without end: the kind is checked before it is opened (a
    FIFO, /dev/zero...), the open is non-blocking, the open file checked again, and no more
    than the limit (and one byte) read.

    Raises:
        OSError: it cannot be read.
        ValueError: not a regular file, too large, not UTF-8 (the message says which).
    """
    kind = _not_a_regular_file(os.stat(path).st_mode)
    if kind is not None:
        raise ValueError(kind)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        kind = _not_a_regular_file(st.st_mode)  # replaced since the stat
        if kind is not None:
            raise ValueError(kind)
        if st.st_size > MAX_ENV_FILE:
            raise ValueError(f"{st.st_size} bytes")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_ENV_FILE:
            chunk = os.read(fd, MAX_ENV_FILE + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_ENV_FILE:
            raise ValueError(f"more than {MAX_ENV_FILE} bytes")
    finally:
        os.close(fd)
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8: {exc}") from None


class _Bad:
    """The result of a value that did not validate (the issue is already recorded)."""


BAD: Any = _Bad()


class Ctx:
    """Collects issues, with file and line, while a file is validated."""

    def __init__(self, file: str, locator: Locator | None, prefix: tuple[str, ...],
                 base_dir: str) -> None:
        self.file = file
        self.locator = locator
        self.prefix = prefix
        self.base_dir = base_dir
        self.issues: list[ConfigIssue] = []

    def key(self, path: tuple[str, ...]) -> str:
        return ".".join(_quote_key(p) for p in self.prefix + path)

    def line(self, path: tuple[str, ...]) -> int | None:
        return self.locator.line(self.prefix + path) if self.locator else None

    def error(self, path: tuple[str, ...], expected: str, given: str) -> Any:
        self.issues.append(ConfigIssue(self.file, self.line(path), self.key(path), expected,
                                       given))
        return BAD

    def resolve(self, p: str) -> str:
        return os.path.normpath(os.path.join(self.base_dir, os.path.expanduser(p)))


def _quote_key(part: str) -> str:
    return part if re.fullmatch(r"[A-Za-z0-9_-]+", part) else f'"{part}"'


def _unknown_keys(ctx: Ctx, path: tuple[str, ...], table: Mapping[str, Any],
                  known: Iterable[str]) -> None:
    known = list(known)
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            if close:
                ctx.error((*path, key), "a known key",
                          f"unknown key {key!r} (did you mean {close[0]!r}?)")
            else:
                ctx.error((*path, key), f"one of the keys {', '.join(sorted(known))}",
                          f"unknown key {key!r}")




def _str(ctx: Ctx, path: tuple[str, ...], v: Any, *, empty: bool = False) -> Any:
    if not isinstance(v, str) or (not empty and not v):
        return ctx.error(path, "a non-empty string" if not empty else "a string", _given(v))
    return v


def _bool(ctx: Ctx, path: tuple[str, ...], v: Any) -> Any:
    if not isinstance(v, bool):
        return ctx.error(path, "true or false", _given(v))
    return v


def _int(ctx: Ctx, path: tuple[str, ...], v: Any, minimum: int = 0,
         maximum: int | None = None) -> Any:
    if isinstance(v, bool) or not isinstance(v, int):
        return ctx.error(path, f"an integer >= {minimum}", _given(v))
    if v < minimum or (maximum is not None and v > maximum):
        rng = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        return ctx.error(path, f"an integer {rng}", _given(v))
    return v


def _duration(ctx: Ctx, path: tuple[str, ...], v: Any, *, positive: bool = False) -> Any:
    try:
        seconds = parse_duration(v)
    except (TypeError, ValueError) as exc:
        return ctx.error(path, f"a duration ({exc})", _given(v))
    if positive and seconds <= 0:
        return ctx.error(path, "a duration > 0", _given(v))
    return seconds


def _size(ctx: Ctx, path: tuple[str, ...], v: Any) -> Any:
    try:
        size = parse_size(v)
    except (TypeError, ValueError) as exc:
        return ctx.error(path, f"a size ({exc})", _given(v))
    if size <= 0:
        return ctx.error(path, "a size > 0", _given(v))
    return size


def _str_list(ctx: Ctx, path: tuple[str, ...], v: Any, what: str,
              allow_str: bool = True) -> Any:
    if allow_str and isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        return ctx.error(path, f"an array of {what}", _given(v))
    return tuple(v)


def _table(ctx: Ctx, path: tuple[str, ...], v: Any) -> Any:
    if not isinstance(v, dict):
        return ctx.error(path, "a table", _given(v))
    return v


def _uid(ctx: Ctx, path: tuple[str, ...], v: Any) -> Any:
    try:
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            return pwd.getpwuid(v).pw_uid
        if isinstance(v, str) and v:
            return pwd.getpwnam(v).pw_uid
    except KeyError:
        return ctx.error(path, "an existing user name or uid", f"{v!r} (no such user)")
    return ctx.error(path, "a user name or uid", _given(v))


def _gid(ctx: Ctx, path: tuple[str, ...], v: Any) -> Any:
    try:
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            return grp.getgrgid(v).gr_gid
        if isinstance(v, str) and v:
            return grp.getgrnam(v).gr_gid
    except KeyError:
        return ctx.error(path, "an existing group name or gid", f"{v!r} (no such group)")
    return ctx.error(path, "a group name or gid", _given(v))


def _address(ctx: Ctx, path: tuple[str, ...], v: Any, *, unix: bool) -> Any:
    """HOST:PORT, [IPv6]:PORT, and with ``unix``: unix:/path and fd://N."""
    if not isinstance(v, str) or not v:
        return ctx.error(path, "an address string like '127.0.0.1:8000'", _given(v))
    if unix and v.startswith("unix:"):
        if not os.path.isabs(v[5:]):
            return ctx.error(path, "unix:/absolute/path", _given(v))
        return v
    if unix and v.startswith("fd://"):
        if not v[5:].isdigit():
            return ctx.error(path, "fd://N with a file descriptor number", _given(v))
        return v
    m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]*):(\d+)", v)
    if not m or not 0 <= int(m.group(2)) <= 65535:
        shape = "HOST:PORT, [IPv6]:PORT" + (", unix:/path or fd://N" if unix else "")
        return ctx.error(path, f"an address of the form {shape} with a port in 0..65535",
                         _given(v))
    return v


def _http(ctx: Ctx, path: tuple[str, ...], v: Any) -> Any:
    """The metrics endpoint's address, as :class:`corral.endpoint.Endpoint` takes it."""
    from corral._observe import parse_address

    try:
        parse_address(v, "http")
    except (TypeError, ValueError):
        return ctx.error(path, "an address like '127.0.0.1:9100' (HOST:PORT, [IPv6]:PORT, or "
                               "PORT for 127.0.0.1; port 0: any free port)", _given(v))
    return v


def _listen(ctx: Ctx, path: tuple[str, ...], v: Any) -> Any:
    """``listen = ["127.0.0.1:8000", ...]`` (named 0, 1, ...) or ``{ web = "..." }``."""
    if isinstance(v, str):
        v = [v]
    if isinstance(v, list):
        pairs = [(str(i), a) for i, a in enumerate(v)]
    elif isinstance(v, dict):
        pairs = list(v.items())
        for name, _ in pairs:
            if not _NAME.match(name):
                return ctx.error(path, "socket names of letters, digits, '_' and '-'",
                                 repr(name))
    else:
        return ctx.error(path, "an address, a list of addresses or a table of name = address",
                         _given(v))
    if not pairs:
        return ctx.error(path, "at least one address", _given(v))
    checked = [(name, _address(ctx, path, a, unix=True)) for name, a in pairs]
    if any(a is BAD for _, a in checked):
        return BAD
    return tuple(checked)


_LOG_KEYS = {f.name for f in fields(LogConfig)}


def _log(ctx: Ctx, path: tuple[str, ...], v: Any, base: LogConfig) -> Any:
    if _table(ctx, path, v) is BAD:
        return BAD
    _unknown_keys(ctx, path, v, _LOG_KEYS)
    kw: dict[str, Any] = {}
    for key in ("console", "json", "timestamps", "file_json"):
        if key in v:
            kw[key] = _bool(ctx, (*path, key), v[key])
    if "file" in v:
        f = _str(ctx, (*path, "file"), v["file"])
        if f is not BAD:
            f = f if f.startswith("/dev/") else ctx.resolve(f)
            parent = os.path.dirname(f.replace("{program}", "x"))
            if not os.path.isdir(parent):
                f = ctx.error((*path, "file"), "a file in an existing directory",
                              f"{v['file']!r} ({parent} does not exist)")
        kw["file"] = f
    if "max_bytes" in v:
        kw["max_bytes"] = (0 if v["max_bytes"] == 0 else
                           _size(ctx, (*path, "max_bytes"), v["max_bytes"]))
    if "backups" in v:
        kw["backups"] = _int(ctx, (*path, "backups"), v["backups"], 0, 1000)
    if "ring_lines" in v:
        kw["ring_lines"] = _int(ctx, (*path, "ring_lines"), v["ring_lines"], 1)
    if "ring_bytes" in v:
        kw["ring_bytes"] = _size(ctx, (*path, "ring_bytes"), v["ring_bytes"])
    if any(x is BAD for x in kw.values()):
        return BAD
    merged = {f.name: getattr(base, f.name) for f in fields(LogConfig)}
    merged.update(kw)
    return LogConfig(**merged)


_BACKOFF_KEYS = ("initial", "multiplier", "cap", "jitter", "reset_after")
_BUDGET_KEYS = ("max_restarts", "window")


def _backoff(ctx: Ctx, path: tuple[str, ...], v: Any) -> Any:
    if _table(ctx, path, v) is BAD:
        return BAD
    _unknown_keys(ctx, path, v, _BACKOFF_KEYS)
    kw: dict[str, Any] = {}
    for key in _BACKOFF_KEYS:
        if key not in v:
            continue
        val = v[key]
        if key == "multiplier" or key == "jitter":
            if isinstance(val, bool) or not isinstance(val, int | float):
                kw[key] = ctx.error((*path, key), "a number", _given(val))
                continue
            kw[key] = float(val)
        elif key == "reset_after" and val in ("never", "inf"):
            kw[key] = math.inf
        else:
            kw[key] = _duration(ctx, (*path, key), val)
    if any(x is BAD for x in kw.values()):
        return BAD
    return _build(ctx, path, Backoff, kw, "Backoff.")


def _budget(ctx: Ctx, path: tuple[str, ...], v: Any) -> Any:
    if _table(ctx, path, v) is BAD:
        return BAD
    _unknown_keys(ctx, path, v, _BUDGET_KEYS)
    kw: dict[str, Any] = {}
    if "max_restarts" in v:
        val = v["max_restarts"]
        kw["max_restarts"] = None if val == "unlimited" else _int(
            ctx, (*path, "max_restarts"), val, 0)
        if kw["max_restarts"] is BAD:
            ctx.issues[-1] = ConfigIssue(ctx.file, ctx.line((*path, "max_restarts")),
                                         ctx.key((*path, "max_restarts")),
                                         "an integer >= 0 or \"unlimited\"", _given(val))
    if "window" in v:
        kw["window"] = _duration(ctx, (*path, "window"), v["window"], positive=True)
    if any(x is BAD for x in kw.values()):
        return BAD
    return _build(ctx, path, RestartBudget, kw, "RestartBudget.")


def _build(ctx: Ctx, path: tuple[str, ...], cls: Callable[..., Any], kw: dict[str, Any],
           prefix: str) -> Any:
    """Let corral's own validated class check the combination; map its message to a key."""
    try:
        return cls(**kw)
    except (TypeError, ValueError) as exc:
        text = str(exc)
        m = re.match(rf"{re.escape(prefix)}(\w+) must be (.*), got (.*)$", text)
        if m:
            return ctx.error((*path, m.group(1)), m.group(2), m.group(3))
        return ctx.error(path, "consistent settings", text)


_PROGRAM_KEYS = (
    "command", "shell", "target", "args", "numprocs", "cwd", "env", "env_file", "user",
    "group", "umask", "listen", "stop_signal", "stop_timeout", "restart", "backoff", "budget",
    "max_memory", "max_age", "heartbeat_timeout", "startup_timeout", "depends_on", "ready",
    "log",
)


def _program(ctx: Ctx, name: str, t: Any, log_defaults: LogConfig) -> ProgramConfig | None:
    path = ("program", name)
    if not _NAME.match(name):
        ctx.error(path, "a program name of letters, digits, '_' and '-' (no dots or colons: "
                        "workers are shown as NAME.N and addressed as NAME:N)", repr(name))
    if _table(ctx, path, t) is BAD:
        return None
    _unknown_keys(ctx, path, t, _PROGRAM_KEYS)
    kw: dict[str, Any] = {"name": name, "line": ctx.line(path)}

    def p(key: str) -> tuple[str, ...]:
        return (*path, key)

    shell = _bool(ctx, p("shell"), t["shell"]) if "shell" in t else False
    kw["shell"] = shell
    if "command" in t and "target" in t:
        ctx.error(p("target"), "either command or target, not both",
                  "both command and target")
    elif "command" not in t and "target" not in t:
        ctx.error(path, "a command = [argv...] or a target = \"module:function\"",
                  "neither (a program needs something to run)")
    if "command" in t:
        cmd = t["command"]
        if shell is True:
            if isinstance(cmd, list) and len(cmd) == 1 and isinstance(cmd[0], str):
                cmd = cmd[0]
            if not isinstance(cmd, str) or not cmd.strip():
                kw["command"] = ctx.error(p("command"), "a shell command line (a string) with "
                                          "shell = true", _given(cmd))
            else:
                kw["command"] = ("/bin/sh", "-c", cmd)
        elif isinstance(cmd, str):
            kw["command"] = ctx.error(p("command"), "an array of argv strings "
                                      "(or set shell = true to run a string through /bin/sh)",
                                      _given(cmd))
        else:
            kw["command"] = _str_list(ctx, p("command"), cmd,
                                      "non-empty argv strings, at least one",
                                      allow_str=False)
            if kw["command"] is not BAD and not kw["command"]:
                kw["command"] = ctx.error(p("command"), "at least one argv string", "[]")
    if "target" in t:
        target = t["target"]
        if shell is True:
            ctx.error(p("shell"), "shell only with a command", "shell = true with a target")
        if not isinstance(target, str) or not _TARGET.match(target):
            kw["target"] = ctx.error(p("target"), "\"package.module:function\"", _given(target))
        else:
            kw["target"] = target
    if "args" in t:
        if "target" not in t:
            ctx.error(p("args"), "args only with a target (a command takes its arguments in "
                                 "its argv)", _given(t["args"]))
        elif not isinstance(t["args"], list):
            ctx.error(p("args"), "an array of arguments", _given(t["args"]))
        else:
            kw["args"] = tuple(t["args"])
    if "numprocs" in t:
        kw["numprocs"] = _int(ctx, p("numprocs"), t["numprocs"], 0, MAX_NUMPROCS)
    if "cwd" in t:
        cwd = _str(ctx, p("cwd"), t["cwd"])
        if cwd is not BAD:
            cwd = ctx.resolve(cwd)
            if not os.path.isdir(cwd):
                cwd = ctx.error(p("cwd"), "an existing directory", f"{t['cwd']!r} "
                                f"({cwd} does not exist)")
        kw["cwd"] = cwd
    env: dict[str, str] = {}
    if "env_file" in t:
        files = _str_list(ctx, p("env_file"), t["env_file"], "env file paths")
        if files is not BAD:
            resolved = []
            for f in files:
                full = ctx.resolve(f)
                resolved.append(full)
                try:
                    text = _read_env_file(full)
                except OSError as exc:
                    ctx.error(p("env_file"), _ENV_FILE_EXPECTED,
                              f"{f!r} ({exc.strerror or exc})")
                    continue
                except ValueError as exc:
                    ctx.error(p("env_file"), _ENV_FILE_EXPECTED, f"{f!r} ({exc})")
                    continue
                values, issues = parse_env_file(text, full)
                ctx.issues.extend(issues)
                env.update(values)
            kw["env_file"] = tuple(resolved)
    if "env" in t and _table(ctx, p("env"), t["env"]) is not BAD:
        for k, val in t["env"].items():
            if not _ENV_KEY.match(k):
                ctx.error((*p("env"), k), "a variable name of letters, digits and _",
                          repr(k))
            elif isinstance(val, bool) or not isinstance(val, str | int):
                ctx.error((*p("env"), k), "a string (or an integer)", _given(val))
            else:
                env[k] = str(val)
    kw["env"] = MappingProxyType(env)
    if "user" in t:
        uid = _uid(ctx, p("user"), t["user"])
        kw["user"], kw["uid"] = (str(t["user"]), uid) if uid is not BAD else (None, None)
        if uid is not BAD and "group" not in t:
            kw["gid"] = pwd.getpwuid(uid).pw_gid
    if "group" in t:
        gid = _gid(ctx, p("group"), t["group"])
        kw["group"], kw["gid"] = (str(t["group"]), gid) if gid is not BAD else (None, None)
    if "umask" in t:
        u = t["umask"]
        if isinstance(u, str) and re.fullmatch(r"0?[0-7]{1,3}", u):
            u = int(u, 8)
        if isinstance(u, bool) or not isinstance(u, int) or not 0 <= u <= 0o777:
            kw["umask"] = ctx.error(p("umask"), "an octal umask like \"022\" or 0o022",
                                    _given(t["umask"]))
        else:
            kw["umask"] = u
    if "stop_signal" in t:
        try:
            sig = parse_signal(t["stop_signal"])
        except (TypeError, ValueError) as exc:
            kw["stop_signal"] = ctx.error(p("stop_signal"), f"a signal name or number ({exc})",
                                          _given(t["stop_signal"]))
        else:
            if sig in _BAD_STOP_SIGNALS:
                kw["stop_signal"] = ctx.error(p("stop_signal"), "a signal a process can catch "
                                              "(not KILL, STOP, CONT or CHLD)", sig.name)
            else:
                kw["stop_signal"] = sig
    if "stop_timeout" in t:
        kw["stop_timeout"] = _duration(ctx, p("stop_timeout"), t["stop_timeout"])
    if "restart" in t:
        try:
            kw["restart"] = RestartPolicy.parse(t["restart"])
        except ValueError:
            kw["restart"] = ctx.error(p("restart"), "\"always\", \"on-failure\" or \"never\"",
                                      _given(t["restart"]))
    if "backoff" in t:
        kw["backoff"] = _backoff(ctx, p("backoff"), t["backoff"])
    if "budget" in t:
        kw["budget"] = _budget(ctx, p("budget"), t["budget"])
    if "listen" in t:
        kw["listen"] = _listen(ctx, p("listen"), t["listen"])
        if "command" not in t:
            ctx.error(p("listen"), "listen only with a command (a target's workers are not "
                                   "exec'd)", "listen with a target")
    if "max_memory" in t:
        kw["max_memory"] = _size(ctx, p("max_memory"), t["max_memory"])
    for key in ("max_age", "heartbeat_timeout", "startup_timeout"):
        if key in t:
            kw[key] = _duration(ctx, p(key), t[key], positive=True)
    if "depends_on" in t:
        kw["depends_on"] = _str_list(ctx, p("depends_on"), t["depends_on"], "program names")
    if "ready" in t:
        try:
            kw["ready"] = parse_ready(t["ready"])
        except (TypeError, ValueError) as exc:
            text = str(exc)
            m = re.search(r"must be (.*), got (.*)$", text)
            if m:
                kw["ready"] = ctx.error(p("ready"), m.group(1), m.group(2))
            else:
                kw["ready"] = ctx.error(p("ready"), "a valid ready check", text)
    kw["log"] = (_log(ctx, p("log"), t["log"], log_defaults) if "log" in t else log_defaults)
    if any(v is BAD for v in kw.values()) or ("command" not in kw and "target" not in kw):
        return None
    return ProgramConfig(**kw)


_SERVE_KEYS = tuple(f.name for f in fields(ServeConfig) if f.name not in ("name", "line"))


def _serve(ctx: Ctx, name: str, t: Any) -> ServeConfig | None:
    path = ("serve", name)
    if not _NAME.match(name):
        ctx.error(path, "a name of letters, digits, '_' and '-'", repr(name))
    if _table(ctx, path, t) is BAD:
        return None
    _unknown_keys(ctx, path, t, _SERVE_KEYS)
    kw: dict[str, Any] = {"name": name, "line": ctx.line(path)}

    def p(key: str) -> tuple[str, ...]:
        return (*path, key)

    if "app" not in t:
        ctx.error(path, "app = \"module:attribute\"", "no app")
        return None
    app = t["app"]
    if not isinstance(app, str) or not _TARGET.match(app.split("(")[0]):
        kw["app"] = ctx.error(p("app"), "\"package.module:attribute\"", _given(app))
    else:
        kw["app"] = app
    if "bind" in t:
        binds = t["bind"] if isinstance(t["bind"], list) else [t["bind"]]
        if not binds:
            kw["bind"] = ctx.error(p("bind"), "at least one address", "[]")
        else:
            checked = [_address(ctx, p("bind"), b, unix=True) for b in binds]
            kw["bind"] = BAD if BAD in checked else tuple(checked)
    if "workers" in t:
        kw["workers"] = _int(ctx, p("workers"), t["workers"], 1, MAX_NUMPROCS)
    if "interface" in t:
        if t["interface"] not in ("asgi", "wsgi", "auto"):
            kw["interface"] = ctx.error(p("interface"), "\"asgi\", \"wsgi\" or \"auto\"",
                                        _given(t["interface"]))
        else:
            kw["interface"] = t["interface"]
    for key in ("max_surge", "max_unavailable", "max_requests", "max_requests_jitter"):
        if key in t:
            kw[key] = _int(ctx, p(key), t[key], 0)
    for key in ("graceful_timeout", "ready_timeout", "shutdown_delay"):
        if key in t:
            kw[key] = _duration(ctx, p(key), t[key], positive=key == "ready_timeout")
    if "reuse_port" in t:
        kw["reuse_port"] = _bool(ctx, p("reuse_port"), t["reuse_port"])
    if "start_method" in t:
        if t["start_method"] not in ("zygote", "forkserver", "spawn"):
            kw["start_method"] = ctx.error(p("start_method"),
                                           "\"zygote\", \"forkserver\" or \"spawn\"",
                                           _given(t["start_method"]))
        else:
            kw["start_method"] = t["start_method"]
    if "standby" in t:
        kw["standby"] = _int(ctx, p("standby"), t["standby"], 0)
    if "min_ready" in t:
        kw["min_ready"] = _int(ctx, p("min_ready"), t["min_ready"], 1)
    if "max_memory" in t:
        kw["max_memory"] = _size(ctx, p("max_memory"), t["max_memory"])
    if "max_age" in t:
        kw["max_age"] = _duration(ctx, p("max_age"), t["max_age"], positive=True)
    if "idle_grace" in t:
        kw["idle_grace"] = _duration(ctx, p("idle_grace"), t["idle_grace"])
    if "http" in t:
        kw["http"] = _http(ctx, p("http"), t["http"])
    if kw.get("standby", 0) and kw.get("start_method", "zygote") != "zygote":
        ctx.error(p("standby"), "start_method = \"zygote\" alongside it (a standby is forked "
                                "from the generation's zygote)",
                  f"{t['standby']!r} with start_method = {t['start_method']!r}")
        return None
    min_ready, workers = kw.get("min_ready"), kw.get("workers", 1)
    if isinstance(min_ready, int) and isinstance(workers, int) and min_ready > workers:
        ctx.error(p("min_ready"), f"an integer <= workers ({workers})", repr(min_ready))
        return None
    if kw.get("max_surge", 1) == 0 and kw.get("max_unavailable", 0) == 0:
        ctx.error(p("max_surge"), "max_surge or max_unavailable > 0 (a rolling reload must "
                                  "either add or remove a worker to make progress)",
                  "both 0")
        return None
    if kw.get("max_requests_jitter", 0) and not kw.get("max_requests", 0):
        ctx.error(p("max_requests_jitter"), "max_requests > 0 alongside it",
                  f"{t['max_requests_jitter']!r} with max_requests = 0")
        return None
    if any(v is BAD for v in kw.values()):
        return None
    return ServeConfig(**kw)


_GLOBAL_KEYS = ("socket_dir", "socket_name", "allow_uids", "allow_gids", "http", "log",
                "program", "serve")


def _check_depends(ctx: Ctx, depends: Mapping[str, tuple[str, ...]],
                   serve_names: Iterable[str]) -> None:
    """Unknown names and cycles in every program's depends_on (even a program that has
    other errors: all problems of a file are reported at once)."""
    known = list(depends) + list(serve_names)
    graph: dict[str, tuple[str, ...]] = {}
    for name, deps in depends.items():
        ok = []
        for dep in deps:
            if dep == name:
                ctx.error(("program", name, "depends_on"), "other programs' names",
                          f"{dep!r} (a program cannot depend on itself)")
            elif dep not in known:
                close = difflib.get_close_matches(dep, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                ctx.error(("program", name, "depends_on"),
                          f"names of programs in this file ({', '.join(known) or 'none'})",
                          f"{dep!r} (no such program{hint})")
            else:
                ok.append(dep)
        graph[name] = tuple(ok)
    # Cycles: depth-first search, colouring nodes; report each cycle once.
    state: dict[str, int] = {}
    stack: list[str] = []
    reported: set[frozenset[str]] = set()

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for d in graph.get(n, ()):
            if state.get(d) == 1:
                cycle = [*stack[stack.index(d):], d]
                key = frozenset(cycle)
                if key not in reported:
                    reported.add(key)
                    ctx.error(("program", cycle[0], "depends_on"),
                              "dependencies without a cycle",
                              "the cycle " + " -> ".join(cycle))
            elif d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n)


def validate(data: Mapping[str, Any], ctx: Ctx) -> Config:
    _unknown_keys(ctx, (), data, _GLOBAL_KEYS)
    kw: dict[str, Any] = {"path": ctx.file}
    if "socket_dir" in data:
        d = _str(ctx, ("socket_dir",), data["socket_dir"])
        kw["socket_dir"] = d if d is BAD else ctx.resolve(d)
    if "socket_name" in data:
        n = data["socket_name"]
        if not isinstance(n, str) or not _NAME.match(n):
            kw["socket_name"] = ctx.error(("socket_name",), "a name of letters, digits, '_' "
                                          "and '-'", _given(n))
        else:
            kw["socket_name"] = n
    for key, check in (("allow_uids", _uid), ("allow_gids", _gid)):
        if key in data:
            val = data[key]
            if not isinstance(val, list):
                kw[key] = ctx.error((key,), "an array of names or ids", _given(val))
            else:
                ids = [check(ctx, (key,), x) for x in val]
                kw[key] = BAD if BAD in ids else tuple(ids)
    if "http" in data:
        kw["http"] = _http(ctx, ("http",), data["http"])
    log_defaults = LogConfig()
    if "log" in data:
        got = _log(ctx, ("log",), data["log"], log_defaults)
        if got is not BAD:
            log_defaults = got
    kw["log"] = log_defaults
    programs: dict[str, ProgramConfig] = {}
    if "program" in data and _table(ctx, ("program",), data["program"]) is not BAD:
        for name, t in data["program"].items():
            prog = _program(ctx, name, t, log_defaults)
            if prog is not None:
                programs[name] = prog
    serve: dict[str, ServeConfig] = {}
    if "serve" in data and _table(ctx, ("serve",), data["serve"]) is not BAD:
        for name, t in data["serve"].items():
            if name in data.get("program", {}):
                ctx.error(("serve", name), "a name not used by a [program] too",
                          f"{name!r} (already a program)")
                continue
            entry = _serve(ctx, name, t)
            if entry is not None:
                serve[name] = entry
    if not data.get("program") and not data.get("serve"):
        ctx.error(("program",), "at least one [program.NAME] or [serve.NAME] table",
                  "none")
    raw_programs = data.get("program")
    depends: dict[str, tuple[str, ...]] = {}
    if isinstance(raw_programs, dict):
        for name, t in raw_programs.items():
            deps = t.get("depends_on", ()) if isinstance(t, dict) else ()
            deps = [deps] if isinstance(deps, str) else deps
            ok = isinstance(deps, list | tuple) and all(isinstance(d, str) for d in deps)
            depends[name] = tuple(deps) if ok else ()
    raw_serve = data.get("serve")
    _check_depends(ctx, depends, raw_serve if isinstance(raw_serve, dict) else {})
    kw["programs"] = MappingProxyType(programs)
    kw["serve"] = MappingProxyType(serve)
    if ctx.issues or any(v is BAD for v in kw.values()):
        raise ConfigError(sorted(ctx.issues, key=lambda i: i.line or 0))
    return Config(**kw)


def check_privileges(ctx: Ctx, config: Config) -> None:
    if os.geteuid() == 0:
        return
    for name, prog in config.programs.items():
        if prog.requires_root:
            key = "user" if prog.uid is not None and prog.uid != os.geteuid() else "group"
            ctx.error(("program", name, key), f"corral to run as root to switch {key}s "
                                              f"(it runs as uid {os.geteuid()})",
                      repr(prog.user if key == "user" else prog.group))

