"""``corral``: the command line (click), talking to a running corral over its control socket.

Exit codes. ``status`` follows the LSB convention for the status action (LSB Core 3.1,
section 20.2 "Init Script Actions",
http://refspecs.linuxbase.org/LSB_3.1.1/LSB-Core-generic/LSB-Core-generic/iniscrptact.html):
0 running, 1 dead while corral runs (the "pid file exists" case), 3 not running, 4 unknown.
The other verbs use that section's codes for other actions: 1 generic error, 2 invalid
arguments (click's usage errors), 3 unimplemented, 4 insufficient privilege, 6 not configured
(the config file is invalid), 7 not running (no corral on the socket).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn

import click
from rich.console import Console

from corral.cli import render
from corral.cli.client import (
    ControlClient,
    ControlError,
    NotRunning,
    PermissionDenied,
    RemoteError,
)
from corral.cli.config import Config, ConfigError, find_config, from_command, load, parse_signal

__all__ = ["RunOptions", "Runner", "main", "set_runner"]

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNIMPLEMENTED = 3
EXIT_PRIVILEGE = 4
EXIT_NOT_CONFIGURED = 6
EXIT_NOT_RUNNING = 7
MAX_SOCKET_PATH = 107  # bytes: sun_path is 108, with its NUL


@dataclass(frozen=True)
class RunOptions:
    """What ``corral run`` was asked, besides the config."""

    config: Config
    socket: str
    json_logs: bool
    http: str | None = None
    config_path: str | None = None  # the file (None: a command line)

    @property
    def config_dir(self) -> str | None:
        return os.path.dirname(os.path.abspath(self.config_path)) if self.config_path else None


Runner = Callable[[RunOptions], int]
_runner: Runner | None = None


def set_runner(runner: Runner | None) -> None:
    """Install what ``corral run`` calls (the supervisor integration); returns its exit code."""
    global _runner
    _runner = runner


class _Fail(click.ClickException):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.exit_code = code  # type: ignore[misc]  # click declares it on the class

    def show(self, file: Any = None) -> None:
        click.echo(f"corral: {self.format_message()}", err=True)


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    raise _Fail(message, code)


@dataclass
class _State:
    config_path: str | None
    socket: str | None

    def config(self) -> Config:
        try:
            return load(self.config_path)
        except ConfigError as exc:
            fail(str(exc), EXIT_NOT_CONFIGURED)

    def socket_path(self) -> str:
        """--socket, $CORRAL_SOCKET, the config's socket, or the default one."""
        if self.socket:
            return self.socket
        path = self.config_path or find_config()
        if path is not None:
            try:
                return load(path, check_privileges=False).socket_path
            except ConfigError:
                pass  # a broken file must not stop `corral status` from reaching corral
        from corral._control import socket_path

        return socket_path()


@contextmanager
def _client(state: _State, timeout: float | None = 10.0) -> Iterator[ControlClient]:
    path = state.socket_path()
    try:
        with ControlClient(path, timeout=timeout) as client:
            yield client
    except NotRunning as exc:
        fail(str(exc), EXIT_NOT_RUNNING)
    except PermissionDenied as exc:
        fail(str(exc), EXIT_PRIVILEGE)
    except RemoteError as exc:
        # corral refused a reload of a file with errors: as when this side found them first.
        fail(f"{exc} [{exc.code}]",
             EXIT_NOT_CONFIGURED if exc.code == "bad_config" else EXIT_ERROR)
    except ControlError as exc:
        fail(str(exc), EXIT_ERROR)


def _config_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``-c FILE`` after the verb too (``corral check -c FILE``), same as before it."""

    def remember(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
        if value:
            ctx.ensure_object(_State).config_path = value

    return click.option("-c", "--config", "_config", type=click.Path(dir_okay=False),
                        default=None, expose_value=False, callback=remember,
                        is_eager=True, help="The config file.")(fn)


def _target(text: str) -> dict[str, Any]:
    """``PROGRAM[:INDEX]`` -> {"program": ..., "index": ...}."""
    name, sep, index = text.partition(":")
    if not name or (sep and not index.isdigit()):
        raise click.BadParameter(f"expected PROGRAM or PROGRAM:INDEX (e.g. web:2), got "
                                 f"{text!r}")
    return {"program": name, "index": int(index) if sep else None}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False),
              envvar="CORRAL_CONFIG",
              help="corral.toml or pyproject.toml (default: found in the current directory).")
@click.option("--socket", envvar="CORRAL_SOCKET", type=click.Path(dir_okay=False),
              help="The control socket (default: from the config, else the default one).")
@click.version_option(package_name="corral", prog_name="corral")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, socket: str | None) -> None:
    """Supervise commands and Python targets: keep them alive, show their logs and state."""
    ctx.obj = _State(config_path, socket)


# ------------------------------------------------------------------------------ run / check


@cli.command(context_settings={"ignore_unknown_options": True})
@click.option("-n", "--numprocs", type=click.IntRange(0, 4096), default=None,
              help="How many copies of COMMAND (with no config file).")
@click.option("--name", help="The program's name (default: from the command).")
@click.option("--stop-timeout", type=click.FloatRange(0), default=None, metavar="SECONDS")
@click.option("--restart", type=click.Choice(["always", "on-failure", "never"]), default=None)
@click.option("--ready", default=None, help='"started", "notify", "tcp:PORT", "http://...", '
              '"log:REGEX".')
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Any other key of a [program] table, VALUE in TOML (a bare word is a "
              "string): --set 'backoff={initial=1, cap=60}' --set heartbeat_timeout=30.")
@click.option("--json-logs", is_flag=True, help="Print output as JSON lines.")
@click.option("--http", default=None, metavar="HOST:PORT", help="Serve /metrics etc. there.")
@_config_option
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def run(state: _State, numprocs: int | None, name: str | None, stop_timeout: float | None,
        restart: str | None, ready: str | None, settings: tuple[str, ...], json_logs: bool,
        http: str | None, command: tuple[str, ...]) -> None:
    """Run in the foreground: `corral run -n 4 -- CMD ARGS...` or `corral run -c FILE`."""
    if command:
        if state.config_path:
            fail("give either a command after -- or a config file (-c), not both", EXIT_USAGE)
        try:
            config = from_command(command, numprocs=1 if numprocs is None else numprocs,
                                  name=name, stop_timeout=stop_timeout, restart=restart,
                                  json_logs=json_logs, ready=ready,
                                  extra=_parse_settings(settings))
        except ConfigError as exc:
            fail(str(exc), EXIT_USAGE)
    else:
        if (numprocs is not None or name or stop_timeout is not None or restart or ready
                or settings):
            fail("-n/--name/--stop-timeout/--restart/--ready/--set go with a command: "
                 "corral run -n 4 -- CMD ...", EXIT_USAGE)
        config = state.config()
    if http is not None:
        from corral._observe import parse_address

        try:
            parse_address(http, "--http")
        except ValueError as exc:
            fail(str(exc), EXIT_USAGE)
    # Nothing starts unless every command can: a missing program is named now, not as a
    # crash loop later.
    from corral.cli.preflight import check_commands

    problems = check_commands(config)
    if problems:
        fail(str(ConfigError(problems)), EXIT_USAGE if command else EXIT_NOT_CONFIGURED)
    socket = state.socket or config.socket_path
    size = len(os.fsencode(socket))
    if size > MAX_SOCKET_PATH:
        given = f"{size} bytes: {socket}"
        if state.socket:
            fail(f"--socket (or $CORRAL_SOCKET): expected a path of at most {MAX_SOCKET_PATH} "
                 f"bytes (the AF_UNIX limit), got {given}", EXIT_USAGE)
        fail(f"{config.path}: socket_dir/socket_name: expected a socket path of at most "
             f"{MAX_SOCKET_PATH} bytes (the AF_UNIX limit), got {given}", EXIT_NOT_CONFIGURED)
    runner: Runner
    if _runner is not None:
        runner = _runner
    else:
        from corral.cli.runner import run as runner
    path = None if command else config.path
    sys.exit(runner(RunOptions(config, socket, json_logs or config.log.json, http,
                               config_path=path)))


def _parse_settings(settings: Sequence[str]) -> dict[str, Any]:
    """``--set KEY=VALUE``: VALUE parsed as TOML, else taken as a string."""
    import tomllib

    out: dict[str, Any] = {}
    for item in settings:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--set")
        try:
            out[key] = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = text
    return out


@cli.command()
@_config_option
@click.pass_obj
def check(state: _State) -> None:
    """Validate the config file; print every error; exit 1 if there is any."""
    from corral.cli.preflight import check_commands, check_targets

    path = state.config_path or find_config()
    try:
        config = load(path)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(EXIT_ERROR)
    config_dir = os.path.dirname(os.path.abspath(config.path))
    problems = check_commands(config) + check_targets(config, config_dir, load=False)
    if problems:
        click.echo(str(ConfigError(problems)), err=True)
        sys.exit(EXIT_ERROR)
    progs = ", ".join(f"{n} ({p.numprocs}x {p.kind})" for n, p in config.programs.items())
    serve = ", ".join(f"{n} ({s.workers} workers)" for n, s in config.serve.items())
    click.echo(f"{config.path}: ok")
    if progs:
        click.echo(f"  programs: {progs}")
    if serve:
        click.echo(f"  serve: {serve}")
    click.echo(f"  start order: {' -> '.join(config.start_order())}")
    click.echo(f"  control socket: {config.socket_path}")


# ------------------------------------------------------------------------------ status / top


@cli.command()
@click.argument("programs", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="The corral.status/1 JSON document.")
@click.pass_obj
def status(state: _State, programs: tuple[str, ...], as_json: bool) -> None:
    """Show every worker; exit 0 running, 1 dead, 3 not running, 4 unknown (LSB)."""
    path = state.socket_path()
    try:
        with ControlClient(path) as client:
            payload = client.call("status", {"programs": list(programs)} if programs else {})
    except NotRunning as exc:
        if as_json:
            click.echo(json.dumps({"schema": "corral.status/1", "corral": None,
                                   "programs": [], "error": str(exc)}))
        else:
            click.echo(f"corral: {exc}", err=True)
        sys.exit(render.LSB_NOT_RUNNING)
    except RemoteError as exc:
        click.echo(f"corral: {exc}", err=True)
        sys.exit(render.LSB_UNKNOWN)
    except ControlError as exc:  # permission denied, protocol errors: status unknown
        click.echo(f"corral: {exc}", err=True)
        sys.exit(render.LSB_UNKNOWN)
    if as_json:
        click.echo(json.dumps(payload, indent=2))
    else:
        _console().print(render.status_table(payload, programs))
    sys.exit(render.status_exit_code(payload, programs))


@cli.command()
@click.option("-i", "--interval", type=click.FloatRange(0.1), default=1.0, show_default=True,
              metavar="SECONDS")
@click.option("--once", is_flag=True, help="Print one table and exit.")
@click.pass_obj
def top(state: _State, interval: float, once: bool) -> None:
    """A live table of every worker (state, pid, uptime, restarts, exits, RSS, CPU)."""
    from rich.live import Live

    console = _console()
    with _client(state) as client:
        payload = client.call("status", {"resources": True})
        if once or not console.is_terminal:
            console.print(render.top_view(payload))
            return
        # Live redraws in place (cursor moves, no clear): no flicker. Ctrl-C quits.
        with Live(render.top_view(payload), console=console, auto_refresh=False,
                  screen=False, transient=False) as live:
            try:
                while True:
                    time.sleep(interval)
                    payload = client.call("status", {"resources": True})
                    live.update(render.top_view(payload), refresh=True)
            except KeyboardInterrupt:
                pass


# ------------------------------------------------------------------------------ actions


def _console() -> Console:
    """A terminal's width, or (piped, no $COLUMNS) one wide enough not to wrap rows: a
    status line per worker is what `grep` and scripts expect."""
    console = Console()
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console = Console(width=200)
    return console


def _simple(state: _State, command: str, args: dict[str, Any]) -> None:
    with _client(state) as client:
        data = client.call(command, args)
    message = data.get("message") if isinstance(data, dict) else None
    click.echo(message or f"{command}: ok")


@cli.command()
@click.argument("targets", nargs=-1, required=True)
@click.pass_obj
def start(state: _State, targets: tuple[str, ...]) -> None:
    """Start PROGRAM or PROGRAM:INDEX."""
    for t in targets:
        _simple(state, "start", _target(t))


@cli.command()
@click.argument("targets", nargs=-1, required=True)
@click.pass_obj
def stop(state: _State, targets: tuple[str, ...]) -> None:
    """Stop PROGRAM or PROGRAM:INDEX (its whole process group)."""
    for t in targets:
        _simple(state, "stop", _target(t))


@cli.command()
@click.argument("targets", nargs=-1, required=True)
@click.pass_obj
def restart(state: _State, targets: tuple[str, ...]) -> None:
    """Restart PROGRAM or PROGRAM:INDEX."""
    for t in targets:
        _simple(state, "restart", _target(t))


@cli.command()
@click.argument("program")
@click.argument("numprocs", type=click.IntRange(0, 4096))
@click.pass_obj
def scale(state: _State, program: str, numprocs: int) -> None:
    """Run NUMPROCS workers of PROGRAM."""
    _simple(state, "scale", {"program": program, "numprocs": numprocs})


@cli.command(name="signal")
@click.argument("target")
@click.argument("sig")
@click.pass_obj
def signal_(state: _State, target: str, sig: str) -> None:
    """Send signal SIG (TERM, HUP, USR1, 15...) to PROGRAM or PROGRAM:INDEX."""
    try:
        signum = parse_signal(sig)
    except (TypeError, ValueError) as exc:
        raise click.BadParameter(f"{exc}; expected a name like HUP or a number",
                                 param_hint="SIG") from None
    _simple(state, "signal", {**_target(target), "signal": signum.name})


@cli.command()
@click.argument("serve", required=False)
@_config_option
@click.pass_obj
def reload(state: _State, serve: str | None) -> None:
    """Re-read the config file and apply only what changed; or, with SERVE, roll that
    [serve] table to a new generation (no request lost)."""
    if serve is None and (state.config_path or find_config()):
        state.config()  # a bad file fails here, listing every error, before corral is asked
    with _client(state, timeout=120.0) as client:
        data = client.call("reload", {} if serve is None else {"program": serve})
    if isinstance(data, dict) and "message" in data and "diff" not in data:
        click.echo(data["message"])  # a serve's rolling reload: its outcome
        return
    d = data.get("diff", {}) if isinstance(data, dict) else {}
    parts = []
    for key in ("added", "removed", "serve_added", "serve_removed"):
        if d.get(key):
            parts.append(f"{key.replace('_', ' ')}: {', '.join(d[key])}")
    for key in ("changed", "serve_changed"):
        if d.get(key):
            parts.append(key.replace("_", " ") + ": " + ", ".join(
                f"{n} ({', '.join(k)})" for n, k in d[key].items()))
    click.echo("; ".join(parts) if parts else "reload: nothing changed")


# ------------------------------------------------------------------------------ streams


def _print_objects(objs: Sequence[dict[str, Any]], as_json: bool,
                   fmt: Callable[[dict[str, Any]], str]) -> None:
    out = sys.stdout
    for obj in objs:
        out.write((json.dumps(obj, ensure_ascii=False) if as_json else fmt(obj)) + "\n")
    out.flush()


@cli.command()
@click.argument("target", required=False)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.option("-n", "--lines", type=click.IntRange(0), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="corral.log/1 objects, one per line.")
@click.pass_obj
def logs(state: _State, target: str | None, follow: bool, lines: int, as_json: bool) -> None:
    """Show the last lines of PROGRAM[:INDEX] (or of everything), and follow with -f."""
    args: dict[str, Any] = dict(_target(target)) if target else {"program": None,
                                                                 "index": None}
    args.update(lines=lines, follow=follow)

    def fmt(obj: dict[str, Any]) -> str:
        return render.format_log_line(obj)

    with _client(state, timeout=30.0) as client:
        if not follow:
            data = client.call("logs", args)
            _print_objects(data.get("lines", []), as_json, fmt)
            return
        try:
            for frame in client.stream("logs", args):
                if frame.dropped:
                    click.echo(f"corral: {frame.dropped} log lines were dropped because this "
                               "client read too slowly", err=True)
                data = frame.data or {}
                _print_objects(data.get("lines", []), as_json, fmt)
        except KeyboardInterrupt:
            pass


@cli.command()
@click.option("-f", "--follow", is_flag=True, help="Keep printing new events.")
@click.option("-n", "--limit", type=click.IntRange(0), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="corral.event/1 objects, one per line.")
@click.pass_obj
def events(state: _State, follow: bool, limit: int, as_json: bool) -> None:
    """Show recent lifecycle events (spawned, exited, restarting...); -f to follow."""
    args = {"follow": follow, "limit": limit}
    with _client(state, timeout=30.0) as client:
        if not follow:
            data = client.call("events", args)
            _print_objects(data.get("events", []), as_json, render.format_event)
            return
        try:
            for frame in client.stream("events", args):
                if frame.dropped:
                    click.echo(f"corral: {frame.dropped} events were dropped because this "
                               "client read too slowly", err=True)
                data = frame.data or {}
                _print_objects(data.get("events", []), as_json, render.format_event)
        except KeyboardInterrupt:
            pass


def _add_serve_commands() -> None:
    # Server mode's verbs live in their own module (imports nothing of the server until run).
    from corral.cli.serve_cmd import export, serve

    cli.add_command(serve)
    cli.add_command(export)


_add_serve_commands()


def main(argv: Sequence[str] | None = None) -> None:
    """The ``corral`` entry point."""
    # A closed stdout (`corral logs -f | head`) ends quietly, as other tools do.
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="corral")
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(EXIT_ERROR)


if __name__ == "__main__":
    main()
