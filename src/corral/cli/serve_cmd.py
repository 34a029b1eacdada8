"""``corral serve`` and ``corral export systemd`` (server mode, issue 12)."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import click

__all__ = ["export", "serve"]

_SERVE_HELP = """Serve an ASGI or WSGI app: `corral serve app:app --bind 127.0.0.1:8000 -w 4`,
or a [serve.NAME] table of the config (`corral -c corral.toml serve [NAME]`).

SIGHUP (or `corral reload`) reloads the code with no request lost; SIGTERM drains and stops."""


def _options(fn: Any) -> Any:
    opts = [
        click.option("-b", "--bind", "binds", multiple=True, metavar="ADDRESS",
                     help="HOST:PORT, [IPv6]:PORT, unix:/path or fd://N; repeat for more. "
                          "Default 127.0.0.1:8000, or systemd's sockets (LISTEN_FDS)."),
        click.option("-w", "--workers", type=click.IntRange(1, 4096), default=None),
        click.option("--interface", type=click.Choice(["auto", "asgi", "wsgi"]), default=None),
        click.option("--start-method", type=click.Choice(["zygote", "forkserver", "spawn"]),
                     default=None, help="zygote (default): fork each worker from a process "
                                        "that imported the app once."),
        click.option("--max-surge", type=click.IntRange(0), default=None),
        click.option("--max-unavailable", type=click.IntRange(0), default=None),
        click.option("--graceful-timeout", type=click.FloatRange(0), default=None,
                     metavar="SECONDS"),
        click.option("--ready-timeout", type=click.FloatRange(0, min_open=True), default=None,
                     metavar="SECONDS"),
        click.option("--shutdown-delay", type=click.FloatRange(0), default=None,
                     metavar="SECONDS"),
        click.option("--reuse-port", is_flag=True, default=None),
        click.option("--max-requests", type=click.IntRange(0), default=None),
        click.option("--max-requests-jitter", type=click.IntRange(0), default=None),
        click.option("--max-memory", default=None, metavar="SIZE", help="e.g. 512MiB"),
        click.option("--max-age", default=None, metavar="DURATION", help="e.g. 1h"),
        click.option("--min-ready", type=click.IntRange(1), default=None),
        click.option("--standby", type=click.IntRange(0), default=None,
                     help="Hot standbys forked ahead with the app's start-up done."),
        click.option("--http", default=None, metavar="HOST:PORT",
                     help="Serve /metrics /livez /readyz /status there (HOST:PORT, "
                          "[IPv6]:PORT, or PORT for 127.0.0.1); /readyz is 503 while "
                          "starting and from SIGTERM on, through --shutdown-delay."),
        click.option("--app-dir", default=None, type=click.Path(file_okay=False)),
        click.option("--name", default=None, help="The program's name (default: web)."),
        click.option("--log-level", default="warning", show_default=True,
                     type=click.Choice(["critical", "error", "warning", "info", "debug"]),
                     help="uvicorn's log level in the workers."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def build_options(app: str | None, config_path: str | None, given: dict[str, Any]) -> Any:
    """ServeOptions from the command line, over a [serve.NAME] table when -c is given."""
    from corral.cli.config import ConfigError, load, parse_duration, parse_size
    from corral.serve._server import ServeOptions, from_config

    values = {k: v for k, v in given.items() if v is not None and v != ()}
    if "binds" in values:
        values["bind"] = tuple(values.pop("binds"))
    if "max_memory" in values:
        values["max_memory"] = parse_size(values["max_memory"])
    if "max_age" in values:
        values["max_age"] = parse_duration(values["max_age"])
    if "http" in values:
        from corral._observe import parse_address

        parse_address(values["http"], "--http")  # ValueError: a usage error naming --http
    log_level = values.pop("log_level", "warning")
    values["uvicorn"] = {"log_level": log_level}
    if app is not None and ":" in app:
        return ServeOptions(app=app, **values)
    # A config's [serve.NAME] (app is then the NAME, or None for the only one).
    try:
        config = load(config_path)
    except ConfigError as exc:
        if app is not None and config_path is None:
            # Most likely a MODULE:APP without its ":APP", rather than a missing config.
            raise click.UsageError(
                f"APP must be MODULE:ATTRIBUTE (e.g. myapp:app), got {app!r}; or the name of "
                f"a [serve.NAME] table of a config (-c FILE), but none was found here ({exc})"
            ) from None
        raise click.ClickException(str(exc)) from None
    if not config.serve:
        raise click.ClickException(f"{config.path} has no [serve.NAME] table; give "
                                   "MODULE:APP on the command line")
    name = app or values.pop("name", None)
    if name is None:
        if len(config.serve) > 1:
            raise click.ClickException(f"{config.path} has several [serve] tables "
                                       f"({', '.join(config.serve)}): name one")
        name = next(iter(config.serve))
    if name not in config.serve:
        raise click.ClickException(f"no [serve.{name}] in {config.path}")
    values.pop("name", None)
    base = from_config(config.serve[name],
                       app_dir=values.pop("app_dir", None) or os.path.dirname(
                           os.path.abspath(config.path)))
    from dataclasses import replace

    return replace(base, **values)


def _console_logging() -> None:
    root = logging.getLogger("corral")
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s corral | %(message)s",
                                           datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


@click.command(help=_SERVE_HELP)
@click.argument("app", required=False)
@_options
@click.pass_obj
def serve(state: Any, /, app: str | None, **given: Any) -> None:
    from corral.serve._server import Server

    try:
        options = build_options(app, state.config_path, given)
    except (TypeError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    socket_path = state.socket
    if socket_path is None:
        if state.config_path:
            from corral.cli.config import load

            socket_path = load(state.config_path, check_privileges=False).socket_path
        else:
            from corral._control import socket_path as default_path

            socket_path = default_path()
    _console_logging()
    sys.exit(Server(options, control_socket=socket_path).run())


@click.group()
def export() -> None:
    """Write files for other tools (systemd units)."""


@export.command(name="systemd")
@click.argument("app", required=False)
@_options
@click.option("--socket-unit", is_flag=True, help="Also write NAME.socket (socket activation: "
                                                  "systemd binds, corral adopts).")
@click.option("--notify-reload", is_flag=True, help="Type=notify-reload (systemd 253+).")
@click.option("--user", default=None, help="User= of the service.")
@click.option("-o", "--output-dir", default=".", show_default=True,
              type=click.Path(file_okay=False))
@click.pass_obj
def export_systemd(state: Any, /, app: str | None, socket_unit: bool, notify_reload: bool,
                   user: str | None, output_dir: str, **given: Any) -> None:
    """Write NAME.service (and NAME.socket) running `corral serve`."""
    from corral.serve._systemd import service_unit
    from corral.serve._systemd import socket_unit as make_socket_unit

    try:
        options = build_options(app, state.config_path, given)
    except (TypeError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    argv = [options.app, "--workers", str(options.workers), "--name", options.name,
            "--app-dir", options.app_dir, "--graceful-timeout", f"{options.graceful_timeout:g}",
            "--ready-timeout", f"{options.ready_timeout:g}",
            "--max-surge", str(options.max_surge),
            "--max-unavailable", str(options.max_unavailable)]
    if options.shutdown_delay:
        argv += ["--shutdown-delay", f"{options.shutdown_delay:g}"]
    if options.interface != "auto":
        argv += ["--interface", options.interface]
    if options.start_method != "zygote":
        argv += ["--start-method", options.start_method]
    if options.http is not None:
        argv += ["--http", options.http]  # the probes load balancers and kubelets ask
    if not socket_unit:
        for b in options.bind:
            argv += ["--bind", b]
    stop = options.shutdown_delay + options.graceful_timeout + 15
    files = {f"{options.name}.service": service_unit(
        options.name, argv, workdir=options.app_dir, socket=socket_unit,
        notify_reload=notify_reload, stop_timeout=stop, user=user)}
    if socket_unit:
        files[f"{options.name}.socket"] = make_socket_unit(options.name, options.bind,
                                                           backlog=options.backlog)
    os.makedirs(output_dir, exist_ok=True)
    for fname, text in files.items():
        path = os.path.join(output_dir, fname)
        with open(path, "w") as fh:
            fh.write(text)
        click.echo(f"wrote {path}")
