"""Socket activation under ``corral run``: systemd's sockets matched to the config by name.

systemd passes fds 3.. with ``LISTEN_FDS``, ``LISTEN_PID`` (they are ours only if it is our
pid) and ``LISTEN_FDNAMES`` (``FileDescriptorName=`` of the socket unit). They are adopted once
at start (the variables are then removed, so no child sees them), never bound, kept across
config reloads and closed at exit. Each fd goes by its name:

    NAME            -> [serve.NAME]: every fd of that name, in order, instead of its ``bind``
    PROGRAM.ENTRY   -> the ``listen`` entry ENTRY of [program.PROGRAM] (a list's are 0, 1...),
                       instead of its address

An fd whose name matches nothing is warned about and kept (a reload may add its table).
:meth:`Activation.check` lists the combinations that cannot work, as config errors.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence

from corral.cli._model import Config
from corral.cli._values import ConfigIssue
from corral.serve import _listeners
from corral.serve._listeners import Listener

__all__ = ["Activation"]

log = logging.getLogger("corral.run")


class Activation:
    """The sockets systemd handed to this ``corral run`` (none without socket activation)."""

    def __init__(self, adopted: Sequence[Listener] = ()) -> None:
        self.adopted = list(adopted)

    @classmethod
    def from_environment(cls) -> Activation:
        """Adopt LISTEN_FDS (when LISTEN_PID is ours) and remove the LISTEN_* variables.

        Raises:
            ListenerError: a passed fd is not a listening stream socket.
        """
        adopted = _listeners.adopt_systemd()
        if adopted:
            log.info("adopted %d socket(s) from systemd: %s", len(adopted),
                     ", ".join(f"{x.name}={x.address}" for x in adopted))
        return cls(adopted)

    def __bool__(self) -> bool:
        return bool(self.adopted)

    def _named(self, name: str) -> list[Listener]:
        return [x for x in self.adopted if x.name == name]

    def for_serve(self, name: str) -> list[Listener]:
        """[serve.NAME]'s sockets: duplicates (the Server closes its own when it ends; the
        originals stay for the next one, after a reload). [] when it binds its own."""
        return [Listener(x.name, x.sock.dup(), x.address, x.origin)
                for x in self._named(name)]

    def for_listen(self, program: str, entry: str) -> Listener | None:
        """The socket for ``listen`` entry ``entry`` of [program.PROGRAM], if systemd has it,
        named ``entry`` as the program's LISTEN_FDNAMES says (the same socket object: closed
        by :meth:`close` only)."""
        found = self._named(f"{program}.{entry}")
        if not found:
            return None
        return Listener(entry, found[0].sock, found[0].address, found[0].origin)

    def check(self, config: Config) -> list[ConfigIssue]:
        """The combinations that cannot work, each as a config issue."""
        issues: list[ConfigIssue] = []
        path = config.path or "corral.toml"
        for name, cfg in config.serve.items():
            mine = self._named(name)
            if mine and cfg.reuse_port:
                lacking = [x.address for x in mine if x.sock.family != socket.AF_UNIX
                           and not x.sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)]
                if lacking:
                    issues.append(ConfigIssue(
                        path, cfg.line, f"serve.{name}.reuse_port",
                        "systemd's sockets for this serve to have SO_REUSEPORT (ReusePort=yes "
                        "in the socket unit: each worker binds a socket of its own beside it)",
                        f"true, and systemd passed {', '.join(lacking)} without it"))
        for name, prog in config.programs.items():
            entries = {entry for entry, _ in prog.listen}
            for entry in sorted(entries):
                found = self._named(f"{name}.{entry}")
                if len(found) > 1:
                    issues.append(ConfigIssue(
                        path, prog.line, f"program.{name}.listen.{entry}",
                        "one socket from systemd per listen entry",
                        f"{len(found)} fds named {name}.{entry!s} in LISTEN_FDNAMES"))
        # fd://N naming one of systemd's fds would be the same socket taken twice.
        fds = {x.fd: x.name for x in self.adopted}
        addresses = [(f"serve.{n}.bind", c.line, list(c.bind)) for n, c in config.serve.items()]
        addresses += [(f"program.{n}.listen", p.line, [a for _, a in p.listen])
                      for n, p in config.programs.items()]
        for key, line, binds in addresses:
            for text in binds:
                if text.startswith("fd://") and text[5:].isdigit() and int(text[5:]) in fds:
                    issues.append(ConfigIssue(
                        path, line, key, "an address, or the socket unit's "
                        "FileDescriptorName to take one of systemd's sockets by name",
                        f"{text!r}, which is systemd's socket {fds[int(text[5:])]!r}"))
        return issues

    def unmatched(self, config: Config) -> list[Listener]:
        """The adopted sockets no table of ``config`` takes."""
        wanted = set(config.serve) | {f"{name}.{entry}" for name, prog in config.programs.items()
                                      for entry, _ in prog.listen}
        return [x for x in self.adopted if x.name not in wanted]

    def warn_unmatched(self, config: Config) -> None:
        left = self.unmatched(config)
        if not left:
            return
        names = sorted(config.serve) + sorted(
            f"{name}.{entry}" for name, prog in config.programs.items()
            for entry, _ in prog.listen)
        log.warning("systemd passed socket(s) that no table takes: %s; a socket is taken by "
                    "its FileDescriptorName: SERVE for a [serve.SERVE], PROGRAM.ENTRY for a "
                    "listen entry (names here: %s); kept open for a reload",
                    ", ".join(f"{x.name}={x.address} (fd {x.fd})" for x in left),
                    ", ".join(names) or "none")

    def close(self) -> None:
        _listeners.close_all(self.adopted)
        self.adopted = []
