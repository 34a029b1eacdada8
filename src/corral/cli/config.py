"""``corral.toml`` (or ``[tool.corral]`` in pyproject.toml): load, validate, compare.

The file is read with the stdlib ``tomllib`` into frozen dataclasses. Validation collects every
problem of a file before it fails: :class:`ConfigError` carries them all, each naming the file,
the line, the key, what was expected and what was given. Unknown keys are errors, with a "did
you mean" suggestion. Nothing here starts a process or imports user code.

Layout (see examples/corral.toml)::

    socket_dir = "/run/corral"        # global settings at the top level
    socket_name = "corral"
    allow_uids = [1000]               # user names work too
    allow_gids = ["deploy"]
    http = "127.0.0.1:9100"           # /metrics /livez /readyz /status (or run --http)

    [log]                             # defaults for every program's log settings
    console = true
    timestamps = false

    [program.web]
    command = ["python", "-m", "http.server", "8000"]
    numprocs = 2
    ready = "tcp:8000"
    depends_on = ["db"]
    backoff = { initial = 0.5, cap = 30 }

    [serve.api]                       # server mode: run by `corral run` (and `corral serve api`)
    app = "myapp:app"
    bind = ["127.0.0.1:8000"]

Durations are seconds (a number) or strings like ``"500ms"``, ``"30s"``, ``"5m"``, ``"1h30m"``.
Sizes are bytes (an integer) or strings like ``"512MiB"``, ``"1GB"``, ``"64k"`` (K/M/G/T alone
and KiB/MiB/... are powers of 1024; KB/MB/... powers of 1000).
"""

from __future__ import annotations

import logging
import os
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

from corral.cli._locate import Locator
from corral.cli._model import Config, LogConfig, ProgramConfig, ServeConfig
from corral.cli._schema import Ctx, validate
from corral.cli._schema import check_privileges as _check_privileges
from corral.cli._values import (
    ConfigError,
    ConfigIssue,
    parse_duration,
    parse_env_file,
    parse_signal,
    parse_size,
)

__all__ = [
    "CONFIG_NAMES",
    "Config",
    "ConfigDiff",
    "ConfigError",
    "ConfigIssue",
    "LogConfig",
    "ProgramChange",
    "ProgramConfig",
    "ServeConfig",
    "diff",
    "find_config",
    "from_command",
    "load",
    "load_text",
    "parse_duration",
    "parse_env_file",
    "parse_signal",
    "parse_size",
]

CONFIG_NAMES = ("corral.toml", "pyproject.toml")

log = logging.getLogger(__name__)



def _decode_error(file: str, exc: tomllib.TOMLDecodeError) -> ConfigError:
    text = str(exc)
    m = re.search(r"\(at line (\d+), column (\d+)\)", text)
    line = int(m.group(1)) if m else getattr(exc, "lineno", None)
    message = re.sub(r"\s*\(at line \d+, column \d+\)", "", text)
    col = f", column {m.group(2)}" if m else ""
    return ConfigError([ConfigIssue(file, line, "(syntax)", "valid TOML",
                                    f"{message}{col}")])


def _too_deep(file: str) -> ConfigError:
    return ConfigError([ConfigIssue(file, None, "(syntax)",
                                    "TOML whose arrays and tables nest a few hundred deep at "
                                    "most", "nesting too deep to read (RecursionError)")])


def load_text(text: str, path: str = "corral.toml", *, check_privileges: bool = True
              ) -> Config:
    """Validate the TOML ``text`` as if it were the file ``path`` (relative paths in it are
    resolved against that file's directory); :class:`ConfigError` lists every problem.

    Any failure while reading or validating it is a :class:`ConfigError` (nesting too deep
    for the parser included), never another exception: a reload must be able to refuse it.
    """
    try:
        return _load_text(text, path, check_privileges)
    except ConfigError:
        raise
    except RecursionError:
        raise _too_deep(path) from None
    except Exception as exc:
        # Not a problem the validator knows how to name: still the file's, still refused.
        log.debug("validating %s failed", path, exc_info=True)
        raise ConfigError([ConfigIssue(path, None, "(file)", "a config corral can validate",
                                       f"{type(exc).__name__}: {exc}")]) from None


def _load_text(text: str, path: str, check_privileges: bool) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _decode_error(path, exc) from None
    prefix: tuple[str, ...] = ()
    if os.path.basename(path) == "pyproject.toml":
        prefix = ("tool", "corral")
        tool = data.get("tool", {}).get("corral")
        if not isinstance(tool, dict):
            raise ConfigError([ConfigIssue(path, None, "tool.corral", "a [tool.corral] table",
                                           "none in this pyproject.toml")])
        data = tool
    ctx = Ctx(path, Locator(text), prefix, os.path.dirname(os.path.abspath(path)))
    config = validate(data, ctx)
    if check_privileges:
        _check_privileges(ctx, config)
        if ctx.issues:
            raise ConfigError(ctx.issues)
    return config


def find_config(directory: str = ".") -> str | None:
    """``corral.toml`` in ``directory``, else a pyproject.toml there with ``[tool.corral]``."""
    directory = os.path.abspath(directory)
    first = os.path.join(directory, "corral.toml")
    if os.path.isfile(first):
        return first
    py = os.path.join(directory, "pyproject.toml")
    if os.path.isfile(py):
        try:
            with open(py, "rb") as fh:
                if isinstance(tomllib.load(fh).get("tool", {}).get("corral"), dict):
                    return py
        except (OSError, tomllib.TOMLDecodeError, RecursionError):
            return None
    return None


def load(path: str | None = None, *, check_privileges: bool = True) -> Config:
    """Load and validate a config file (default: :func:`find_config` in the cwd)."""
    if path is None:
        path = find_config()
        if path is None:
            raise ConfigError([ConfigIssue(os.path.abspath("corral.toml"), None, "(file)",
                                           "a corral.toml, or a pyproject.toml with "
                                           "[tool.corral], in the current directory",
                                           "neither")])
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise ConfigError([ConfigIssue(path, None, "(file)", "a readable file",
                                       exc.strerror or str(exc))]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([ConfigIssue(path, None, "(file)", "UTF-8 text", str(exc))]
                          ) from None
    return load_text(text, path, check_privileges=check_privileges)


def from_command(argv: Iterable[str], *, numprocs: int = 1, name: str | None = None,
                 stop_timeout: float | None = None, restart: str | None = None,
                 json_logs: bool = False, ready: str | None = None,
                 extra: dict[str, Any] | None = None) -> Config:
    """The config of ``corral run -n N -- CMD...``: one program, validated like a file
    (``extra``: more keys of its table, from ``--set KEY=VALUE``)."""
    argv = list(argv)
    if name is None:
        base = os.path.basename(argv[0]) if argv else "cmd"
        name = re.sub(r"[^A-Za-z0-9_-]", "-", base).strip("-") or "cmd"
        if not name[0].isalnum():
            name = "cmd-" + name
    prog: dict[str, Any] = dict(extra or {})
    prog.update(command=argv, numprocs=numprocs)
    if stop_timeout is not None:
        prog["stop_timeout"] = stop_timeout
    if restart is not None:
        prog["restart"] = restart
    if ready is not None:
        prog["ready"] = ready
    data: dict[str, Any] = {"program": {name: prog}, "log": {"json": json_logs}}
    ctx = Ctx("<command line>", None, (), os.getcwd())
    return validate(data, ctx)




@dataclass(frozen=True)
class ProgramChange:
    """A program whose settings changed, and which ones."""

    name: str
    keys: tuple[str, ...]

    @property
    def scale_only(self) -> bool:
        """Only ``numprocs`` changed: scale it, do not restart its workers."""
        return self.keys == ("numprocs",)


@dataclass(frozen=True)
class ConfigDiff:
    """What ``corral reload`` must do (supervisord's reread + update)."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[ProgramChange, ...] = ()
    unchanged: tuple[str, ...] = ()
    serve_added: tuple[str, ...] = ()
    serve_removed: tuple[str, ...] = ()
    serve_changed: tuple[ProgramChange, ...] = ()
    globals_changed: tuple[str, ...] = ()  # socket_dir/socket_name need a restart of corral

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.serve_added
                    or self.serve_removed or self.serve_changed or self.globals_changed)

    def to_json(self) -> dict[str, Any]:
        return {
            "added": list(self.added), "removed": list(self.removed),
            "changed": {c.name: list(c.keys) for c in self.changed},
            "unchanged": list(self.unchanged),
            "serve_added": list(self.serve_added), "serve_removed": list(self.serve_removed),
            "serve_changed": {c.name: list(c.keys) for c in self.serve_changed},
            "globals_changed": list(self.globals_changed),
        }


def _changed_keys(old: Any, new: Any) -> tuple[str, ...]:
    return tuple(f.name for f in fields(old)
                 if f.compare and f.name != "name" and getattr(old, f.name) != getattr(new,
                                                                                        f.name))


def diff(old: Config, new: Config) -> ConfigDiff:
    """Which programs were added, removed or changed (and which keys) between two configs."""
    changed, unchanged = [], []
    for name in old.programs:
        if name in new.programs:
            keys = _changed_keys(old.programs[name], new.programs[name])
            if keys:
                changed.append(ProgramChange(name, keys))
            else:
                unchanged.append(name)
    serve_changed = []
    for name in old.serve:
        if name in new.serve:
            keys = _changed_keys(old.serve[name], new.serve[name])
            if keys:
                serve_changed.append(ProgramChange(name, keys))
    globals_changed = tuple(
        key for key in ("socket_dir", "socket_name", "allow_uids", "allow_gids", "http", "log")
        if getattr(old, key) != getattr(new, key))
    return ConfigDiff(
        added=tuple(n for n in new.programs if n not in old.programs),
        removed=tuple(n for n in old.programs if n not in new.programs),
        changed=tuple(changed), unchanged=tuple(unchanged),
        serve_added=tuple(n for n in new.serve if n not in old.serve),
        serve_removed=tuple(n for n in old.serve if n not in new.serve),
        serve_changed=tuple(serve_changed), globals_changed=globals_changed)
