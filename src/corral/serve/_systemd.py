"""systemd, both sides: telling systemd about corral serve, and writing its unit files.

The notify protocol is written directly (:mod:`corral._notify`: one datagram to
``$NOTIFY_SOCKET``, ``@`` = the abstract namespace): it is one ``sendto``, the man page ships
standalone versions for that reason, and the test seam is a fake ``NOTIFY_SOCKET`` bound by the
test. The variables are taken from the environment at start and removed from it, so workers
(and their children) never talk to systemd in corral's name.

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

from corral import _notify

__all__ = ["Notifier", "service_unit", "socket_unit"]


class Notifier:
    """corral serve's messages to systemd (a no-op without ``NOTIFY_SOCKET``).

    Args:
        env: where NOTIFY_SOCKET / WATCHDOG_USEC / WATCHDOG_PID come from (default:
            ``os.environ``, from which they are then removed).
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        source = os.environ if env is None else env
        self.env = {k: source[k] for k in _notify.NOTIFY_ENV if k in source}
        if env is None:
            for key in _notify.NOTIFY_ENV:
                os.environ.pop(key, None)
        self.enabled = bool(self.env.get("NOTIFY_SOCKET"))
        self.watchdog_interval = _notify.watchdog_interval(self.env) if self.enabled else None
        self.sent: list[str] = []  # what was sent (for status and tests)
        self._is_ready = False
        self._last_status = ""

    def _send(self, **fields: object) -> None:
        if not self.enabled:
            return
        _notify.notify(env=self.env, **fields)
        self.sent.append(" ".join(f"{k}={v}" for k, v in fields.items()))

    def ready(self, status: str) -> None:
        self._is_ready = True
        self._last_status = status
        self._send(READY=1, STATUS=status)

    def status(self, text: str) -> None:
        """STATUS=text, only when it changed (it is recomputed after every loop round)."""
        if text != self._last_status:
            self._last_status = text
            self._send(STATUS=text)

    def reloading(self, status: str) -> None:
        if self.enabled:
            _notify.reloading(status, env=self.env)
            self.sent.append(f"RELOADING=1 STATUS={status}")

    def stopping(self, status: str) -> None:
        self._send(STOPPING=1, STATUS=status)

    def extend_timeout(self, seconds: float) -> None:
        if self.enabled and seconds > 0:
            _notify.extend_timeout(seconds, env=self.env)
            self.sent.append(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def watchdog(self) -> None:
        if self.enabled:
            _notify.watchdog(env=self.env)


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
