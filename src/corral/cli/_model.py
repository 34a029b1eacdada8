"""The validated configuration: frozen dataclasses built by :mod:`corral.cli._schema`."""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from corral._readiness import ReadyNotify, ReadySpec, ReadyStarted
from corral.policy import Backoff, RestartBudget, RestartPolicy

__all__ = ["Config", "LogConfig", "ProgramConfig", "ServeConfig"]


@dataclass(frozen=True)
class LogConfig:
    """Where a program's output goes (each key may be set globally in ``[log]``).

    Attributes:
        console: print it on corral's stdout, prefixed ``name.N |``.
        json: print JSON lines on the console instead (one object per line).
        timestamps: prefix console lines with the time.
        file: a file per program (``{program}`` is replaced by its name); None: no file.
        max_bytes: rotate the file at this size (0: never); never for non-regular files.
        backups: rotated files to keep.
        file_json: write the file as JSON lines.
        ring_lines, ring_bytes: the in-memory tail kept per worker (``corral logs -n``).
    """

    console: bool = True
    json: bool = False
    timestamps: bool = True
    file: str | None = None
    max_bytes: int = 10 * 1024 * 1024
    backups: int = 5
    file_json: bool = False
    ring_lines: int = 1000
    ring_bytes: int = 1024 * 1024

    def file_for(self, program: str) -> str | None:
        return None if self.file is None else self.file.replace("{program}", program)


@dataclass(frozen=True)
class ProgramConfig:
    """One ``[program.NAME]`` (see the module docstring and docs for each key)."""

    name: str
    command: tuple[str, ...] | None = None  # the argv (with shell: /bin/sh -c "...")
    shell: bool = False
    target: str | None = None  # "module:function"
    args: tuple[Any, ...] = ()
    numprocs: int = 1
    cwd: str | None = None
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    env_file: tuple[str, ...] = ()
    user: str | None = None
    uid: int | None = None
    group: str | None = None
    gid: int | None = None
    umask: int | None = None
    stop_signal: signal.Signals = signal.SIGTERM
    stop_timeout: float = 10.0
    restart: RestartPolicy = RestartPolicy.ALWAYS
    backoff: Backoff = field(default_factory=Backoff)
    budget: RestartBudget = field(default_factory=RestartBudget)
    max_memory: int | None = None
    max_age: float | None = None
    heartbeat_timeout: float | None = None
    startup_timeout: float | None = None
    depends_on: tuple[str, ...] = ()
    ready: ReadySpec = field(default_factory=ReadyStarted)
    log: LogConfig = field(default_factory=LogConfig)
    # (name, address): listening sockets corral binds once and hands to every start of the
    # command as systemd does (fds 3.., LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID).
    listen: tuple[tuple[str, str], ...] = ()
    line: int | None = field(default=None, compare=False)

    @property
    def kind(self) -> str:
        return "command" if self.command is not None else "target"

    @property
    def needs_notify_socket(self) -> bool:
        """A command worker gets its own NOTIFY_SOCKET (READY=1, or WATCHDOG=1 beats)."""
        return self.kind == "command" and (isinstance(self.ready, ReadyNotify)
                                           or self.heartbeat_timeout is not None)

    @property
    def requires_root(self) -> bool:
        euid, egid = os.geteuid(), os.getegid()
        return (self.uid is not None and self.uid != euid) or (
            self.gid is not None and self.gid != egid)

    def full_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The worker's environment: ``base`` (default: corral's own), then env_file, env."""
        out = dict(os.environ if base is None else base)
        out.update(self.env)
        return out

    def pool_spec_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :class:`corral.PoolSpec` this program maps to.

        ``target``/``args`` are left out (the target is imported by whoever builds the pool:
        loading a config never imports user code); command programs have no PoolSpec
        ``target`` at all. ``ready_when``: "started" -> "started", "notify" -> "ready";
        tcp:/http:/log: -> "ready" as well: the supervisor must mark the worker ready when its
        check passes (corral._readiness).
        """
        ready_when = "started" if isinstance(self.ready, ReadyStarted) else "ready"
        return {
            "name": self.name,
            "workers": self.numprocs,
            "restart": self.restart,
            "backoff": self.backoff,
            "budget": self.budget,
            "stop_signal": int(self.stop_signal),
            "stop_timeout": self.stop_timeout,
            "heartbeat_timeout": self.heartbeat_timeout,
            "startup_timeout": self.startup_timeout,
            "ready_when": ready_when,
            "max_memory": self.max_memory,
            "max_age": self.max_age,
            "names": _Names(self.name),
        }

    def target_args(self) -> _ConstArgs:
        """``PoolSpec.args`` for a target program: the same ``args`` for every worker."""
        return _ConstArgs(self.args)


class _Names:
    """``PoolSpec.names``: ``name.N``, as the console prefix and the CLI show workers."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, index: int) -> str:
        return f"{self.name}.{index}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Names) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)


class _ConstArgs:
    def __init__(self, args: tuple[Any, ...]) -> None:
        self.args = args

    def __call__(self, index: int) -> tuple[Any, ...]:
        return self.args


@dataclass(frozen=True)
class ServeConfig:
    """One ``[serve.NAME]`` (server mode): hosted by ``corral run`` (corral.cli._serves), or
    run alone by ``corral -c FILE serve NAME``."""

    name: str
    app: str
    bind: tuple[str, ...] = ("127.0.0.1:8000",)
    workers: int = 1
    interface: str = "auto"
    max_surge: int = 1
    max_unavailable: int = 0
    graceful_timeout: float = 30.0
    ready_timeout: float = 60.0
    shutdown_delay: float = 0.0
    reuse_port: bool = False
    max_requests: int = 0
    max_requests_jitter: int = 0
    start_method: str = "zygote"
    standby: int = 0
    min_ready: int | None = None
    max_memory: int | None = None
    max_age: float | None = None
    idle_grace: float = 0.5
    http: str | None = None
    line: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Config:
    """A whole validated file."""

    path: str
    programs: Mapping[str, ProgramConfig] = field(
        default_factory=lambda: MappingProxyType({}))
    serve: Mapping[str, ServeConfig] = field(default_factory=lambda: MappingProxyType({}))
    socket_dir: str | None = None
    socket_name: str = "corral"
    allow_uids: tuple[int, ...] = ()
    allow_gids: tuple[int, ...] = ()
    http: str | None = None
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def socket_path(self) -> str:
        from corral._control import socket_path

        return socket_path(self.socket_dir, self.socket_name)

    def start_order(self) -> list[str]:
        """Programs and serve entries, dependencies first (file order otherwise)."""
        names = list(self.programs) + list(self.serve)
        deps = {n: p.depends_on for n, p in self.programs.items()}
        done: list[str] = []
        seen: set[str] = set()

        def visit(n: str) -> None:
            if n in seen:
                return
            seen.add(n)
            for d in deps.get(n, ()):
                visit(d)
            done.append(n)

        for n in names:
            visit(n)
        return done

    def stop_order(self) -> list[str]:
        return list(reversed(self.start_order()))

