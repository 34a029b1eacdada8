"""systemd, both sides: telling systemd about corral serve (:class:`corral._notify.Notifier`,
shared with ``corral run``), and writing its unit files.

    start:   STATUS=starting ... -> READY=1 + STATUS once min_ready workers are ready
    reload:  RELOADING=1 + MONOTONIC_USEC (+ STATUS) -> ... -> READY=1 + STATUS (also on abort)
    stop:    STOPPING=1 + STATUS -> EXTEND_TIMEOUT_USEC while a long drain goes on
    always:  WATCHDOG=1 every WATCHDOG_USEC/2 from the event loop (a stuck loop sends none)
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["service_unit", "socket_unit"]


def _quote(argv: Sequence[str]) -> str:
    # systemd's own quoting is close to the shell's for plain words and quoted strings.
    return " ".join(shlex.quote(a) for a in argv)


def service_unit(name: str, serve_argv: Sequence[str], *, workdir: str,
                 description: str | None = None, socket: bool = False,
                 notify_reload: bool = False, stop_timeout: float = 60.0,
                 watchdog: float | None = 30.0, user: str | None = None,
                 environment: Mapping[str, str] | None = None,
                 corral: str | None = None) -> str:
    """The text of ``NAME.service`` running ``corral serve``.

    Args:
        serve_argv: the arguments after ``corral serve``.
        socket: a ``NAME.socket`` unit hands the listeners over (no ``--bind`` needed).
        notify_reload: ``Type=notify-reload`` (systemd 253+): systemd sends SIGHUP and waits
            for RELOADING=1 ... READY=1; else ``Type=notify`` with ``ExecReload`` sending HUP.
        stop_timeout: ``TimeoutStopSec`` (shutdown_delay + graceful_timeout + a margin; corral
            extends it while a drain goes on).
    """
    exe = corral or os.path.join(os.path.dirname(sys.executable), "corral")
    lines = ["[Unit]", f"Description={description or f'corral serve {name}'}",
             "After=network.target"]
    if socket:
        lines += [f"Requires={name}.socket", f"After={name}.socket"]
    lines += ["", "[Service]"]
    if notify_reload:
        lines += ["Type=notify-reload", "ReloadSignal=SIGHUP"]
    else:
        lines += ["Type=notify", "ExecReload=/bin/kill -HUP $MAINPID"]
    lines += ["NotifyAccess=main", f"ExecStart={_quote([exe, 'serve', *serve_argv])}",
              f"WorkingDirectory={workdir}",
              # SIGTERM to corral alone: it drains the workers itself; SIGKILL to the rest
              # only if the stop timeout passes.
              "KillMode=mixed", f"TimeoutStopSec={stop_timeout:g}",
              "Restart=on-failure", "RestartSec=1"]
    if watchdog:
        lines.append(f"WatchdogSec={watchdog:g}")
    if user:
        lines.append(f"User={user}")
    for key, value in (environment or {}).items():
        lines.append(f"Environment={_quote([f'{key}={value}'])}")
    lines += ["", "[Install]", "WantedBy=multi-user.target", ""]
    return "\n".join(lines)


def socket_unit(name: str, binds: Sequence[str], *, names: Sequence[str] | None = None,
                backlog: int = 2048) -> str:
    """The text of ``NAME.socket``: one ListenStream per bind, named for LISTEN_FDNAMES."""
    lines = ["[Unit]", f"Description=corral serve {name} sockets", "", "[Socket]"]
    for bind in binds:
        address = bind[5:] if bind.startswith("unix:") else bind
        lines.append(f"ListenStream={address}")
    # One name for every fd of this unit (what LISTEN_FDNAMES then repeats).
    lines += [f"FileDescriptorName={names[0] if names else name}", f"Backlog={backlog}",
              "ReusePort=no", "", "[Install]", "WantedBy=sockets.target", ""]
    return "\n".join(lines)


def unit_summary(files: Mapping[str, str]) -> dict[str, Any]:
    return {"files": sorted(files)}
