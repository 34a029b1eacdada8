"""Listening sockets owned by corral: bound once, or adopted from systemd socket activation.

corral binds every ``--bind`` address once, in the supervising process, before any worker
exists, and keeps the sockets open until the very end (after the last worker has gone): a
reload never closes them, so there is one accept queue per address, and a connection waiting in
it is taken by whichever worker is alive. Workers get the same sockets (inherited through the
zygote's fork, or passed at a spawn/forkserver start) and never call ``shutdown(2)`` on them.

Addresses: ``HOST:PORT``, ``[IPv6]:PORT``, ``unix:/path``, ``fd://N`` (an fd corral inherited).

systemd socket activation (``sd_listen_fds(3)``): fds 3..3+LISTEN_FDS-1, meant for us only if
``LISTEN_PID`` is our pid, named by ``LISTEN_FDNAMES``; :func:`adopt_systemd` takes them and
unsets the three variables (so workers and their children do not see them).

Command programs receive sockets the same way (:func:`spawn_with_listeners`): the fds moved to
3.. with ``posix_spawn`` file actions, ``LISTEN_FDS``/``LISTEN_FDNAMES`` in the environment, and
``LISTEN_PID`` set by a two-line ``/bin/sh`` shim to its own pid right before it execs the program
(so the pid is the exec'd program's); ``{listen.NAME.fd}`` in the argv becomes the fd number.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import socket
import stat
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "LISTEN_ENV",
    "Listener",
    "ListenerError",
    "adopt_systemd",
    "bind",
    "bind_all",
    "check_migrate_req",
    "close_all",
    "listen_env",
    "parse_bind",
    "spawn_with_listeners",
    "substitute_argv",
]

log = logging.getLogger(__name__)

LISTEN_ENV = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
SD_LISTEN_FDS_START = 3
DEFAULT_BACKLOG = 2048
_MIGRATE_REQ = "/proc/sys/net/ipv4/tcp_migrate_req"


class ListenerError(OSError):
    """An address could not be bound or an inherited fd is not a listening socket."""


@dataclass(frozen=True)
class BindAddress:
    """One parsed ``--bind``: ``kind`` is "tcp", "unix" or "fd"."""

    text: str
    kind: str
    host: str = ""
    port: int = 0
    path: str = ""
    fd: int = -1


def parse_bind(text: str) -> BindAddress:
    """``HOST:PORT``, ``[IPv6]:PORT``, ``unix:/path`` or ``fd://N``.

    Raises:
        ValueError: any other shape, naming it.
    """
    if not isinstance(text, str) or not text:
        raise ValueError(f"bind must be an address like '127.0.0.1:8000', got {text!r}")
    if text.startswith("unix:"):
        path = text[5:]
        if not os.path.isabs(path):
            raise ValueError(f"bind unix:PATH needs an absolute path, got {text!r}")
        return BindAddress(text, "unix", path=path)
    if text.startswith("fd://"):
        if not text[5:].isdigit():
            raise ValueError(f"bind fd://N needs a file descriptor number, got {text!r}")
        return BindAddress(text, "fd", fd=int(text[5:]))
    m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]*):(\d+)", text)
    if not m or not 0 <= int(m.group(2)) <= 65535:
        raise ValueError(f"bind must be HOST:PORT, [IPv6]:PORT, unix:/path or fd://N with a "
                         f"port in 0..65535, got {text!r}")
    host = m.group(1)
    if host.startswith("["):
        host = host[1:-1]
    return BindAddress(text, "tcp", host=host or "0.0.0.0", port=int(m.group(2)))


@dataclass
class Listener:
    """A listening socket and how to name it.

    Attributes:
        name: its name (``LISTEN_FDNAMES``, ``{listen.NAME.fd}``): "web", "0", ...
        sock: the socket (blocking mode is left as the workers' server wants it).
        address: a readable address: "127.0.0.1:8000", "unix:/run/app.sock".
        origin: "bound" (by corral), "systemd" or "inherited" (fd://N).
    """

    name: str
    sock: socket.socket
    address: str
    origin: str = "bound"

    @property
    def fd(self) -> int:
        return self.sock.fileno()

    @property
    def port(self) -> int | None:
        if self.sock.family in (socket.AF_INET, socket.AF_INET6):
            return int(self.sock.getsockname()[1])
        return None


def _describe(sock: socket.socket) -> str:
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        text = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
        return "unix:" + (text.replace("\0", "@") or "(unnamed)")
    if sock.family == socket.AF_INET6:
        return f"[{name[0]}]:{name[1]}"
    return f"{name[0]}:{name[1]}"


def bind(addr: BindAddress | str, *, name: str, reuse_port: bool = False,
         backlog: int = DEFAULT_BACKLOG) -> Listener:
    """Bind and listen on one address.

    ``SO_REUSEADDR`` is always set for TCP (a restart of corral must not wait for TIME_WAIT);
    ``reuse_port`` adds ``SO_REUSEPORT`` (see the README for the trade-off).

    Raises:
        ListenerError: the address is in use, not allowed, or not a listening socket (fd://N).
    """
    if isinstance(addr, str):
        addr = parse_bind(addr)
    if addr.kind == "fd":
        return _adopt_fd(addr.fd, name, "inherited")
    if addr.kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            _remove_stale_unix(addr.path)
            sock.bind(addr.path)
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            raise ListenerError(exc.errno, f"cannot listen on {addr.text}: {exc.strerror}"
                                ) from None
        return Listener(name, sock, addr.text)
    family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((addr.host, addr.port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        hint = " (another server is listening there?)" if exc.errno == errno.EADDRINUSE else ""
        raise ListenerError(exc.errno, f"cannot listen on {addr.text}: {exc.strerror}{hint}"
                            ) from None
    return Listener(name, sock, _describe(sock))


def _remove_stale_unix(path: str) -> None:
    """A socket file left by a previous run is removed; any other file is an error."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenerError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: stale
    else:
        raise ListenerError(errno.EADDRINUSE, f"unix:{path}: a server is listening there")
    finally:
        probe.close()


def _adopt_fd(fd: int, name: str, origin: str) -> Listener:
    """A socket object for an inherited fd, checked to be a listening stream socket."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ListenerError(exc.errno, f"fd {fd} ({name}) is not a socket: {exc.strerror}"
                            ) from None
    try:
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as exc:
        sock.detach()
        raise ListenerError(exc.errno, f"fd {fd} ({name}): {exc.strerror}") from None
    if kind != socket.SOCK_STREAM or not listening:
        sock.detach()
        raise ListenerError(errno.EINVAL, f"fd {fd} ({name}) is not a listening stream "
                                          "socket (Accept=yes sockets are not supported)")
    os.set_inheritable(fd, False)
    return Listener(name, sock, _describe(sock), origin)


def bind_all(binds: Sequence[str], *, reuse_port: bool = False,
             backlog: int = DEFAULT_BACKLOG, names: Sequence[str] | None = None
             ) -> list[Listener]:
    """Bind every address (all or none: a failure closes those already bound)."""
    out: list[Listener] = []
    try:
        for i, text in enumerate(binds):
            name = names[i] if names is not None and i < len(names) else str(i)
            out.append(bind(text, name=name, reuse_port=reuse_port, backlog=backlog))
    except BaseException:
        close_all(out, unlink=True)
        raise
    return out


def adopt_systemd(env: Mapping[str, str] | None = None, *, unset: bool = True
                  ) -> list[Listener]:
    """The sockets systemd passed us (``sd_listen_fds``): [] if none are meant for us.

    Args:
        env: where to read LISTEN_* (default ``os.environ``).
        unset: remove LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES from ``os.environ`` afterwards.

    Raises:
        ListenerError: a passed fd is not a listening stream socket.
    """
    source = os.environ if env is None else env
    try:
        pid = int(source.get("LISTEN_PID", "0"))
        n = int(source.get("LISTEN_FDS", "0"))
    except ValueError:
        log.warning("LISTEN_PID=%r / LISTEN_FDS=%r are not integers: ignored",
                    source.get("LISTEN_PID"), source.get("LISTEN_FDS"))
        return []
    names = source.get("LISTEN_FDNAMES", "")
    if unset and env is None:
        for key in LISTEN_ENV:
            os.environ.pop(key, None)
    if pid != os.getpid() or n <= 0:
        return []
    parts = names.split(":") if names else []
    out: list[Listener] = []
    for i in range(n):
        name = parts[i] if i < len(parts) and parts[i] else str(i)
        out.append(_adopt_fd(SD_LISTEN_FDS_START + i, name, "systemd"))
    return out


def close_all(listeners: Sequence[Listener], *, unlink: bool = True) -> None:
    """Close the listeners (last thing of a stop); unix socket files corral made are removed."""
    for lst in listeners:
        path = None
        if unlink and lst.origin == "bound" and lst.address.startswith("unix:"):
            path = lst.address[5:]
        with contextlib.suppress(OSError):
            lst.sock.close()
        if path and not path.startswith("@"):
            with contextlib.suppress(OSError):
                os.unlink(path)


def check_migrate_req(path: str = _MIGRATE_REQ) -> int | None:
    """``net.ipv4.tcp_migrate_req`` (None if this kernel has none: before Linux 5.14)."""
    try:
        with open(path) as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return None


def warn_reuse_port(value: int | None) -> str | None:
    """The warning ``reuse_port`` deserves on this kernel, or None."""
    if value == 1:
        return None
    why = ("is 0" if value == 0 else "does not exist here (Linux < 5.14)")
    return (f"reuse_port: net.ipv4.tcp_migrate_req {why}: each worker gets an accept queue "
            "of its own (beside the shared one), and the connections waiting in a worker's "
            "queue are reset when it exits (every reload and restart). Without reuse_port all "
            "workers share one queue and nothing is lost; or set net.ipv4.tcp_migrate_req=1 "
            "(root).")


# ------------------------------------------------------------------------ command programs


def listen_env(listeners: Sequence[Listener]) -> dict[str, str]:
    """LISTEN_FDS and LISTEN_FDNAMES for a program receiving ``listeners`` from fd 3 on
    (LISTEN_PID is set by the shim, in the program's own process)."""
    return {"LISTEN_FDS": str(len(listeners)),
            "LISTEN_FDNAMES": ":".join(lst.name for lst in listeners)}


_PLACEHOLDER = re.compile(r"\{listen\.([A-Za-z0-9_-]+)\.fd\}")


def substitute_argv(argv: Sequence[str], listeners: Sequence[Listener]) -> list[str]:
    """``{listen.NAME.fd}`` (or ``{listen.0.fd}`` by position) -> the fd number it gets.

    Raises:
        ValueError: a placeholder names no listener.
    """
    numbers: dict[str, int] = {}
    for i, lst in enumerate(listeners):
        numbers.setdefault(lst.name, SD_LISTEN_FDS_START + i)
        numbers.setdefault(str(i), SD_LISTEN_FDS_START + i)

    def repl(m: re.Match[str]) -> str:
        key = m.group(1)
        if key not in numbers:
            raise ValueError(f"argv placeholder {m.group(0)} names no listener (have: "
                             f"{', '.join(lst.name for lst in listeners) or 'none'})")
        return str(numbers[key])

    return [_PLACEHOLDER.sub(repl, a) for a in argv]


# Sets LISTEN_PID to the shell's own pid, which exec keeps for the program.
_SHIM = 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"'
_SHIM_CWD = 'cd -- "$1" || exit 127; shift; LISTEN_PID=$$; export LISTEN_PID; exec "$@"'
# As another user or group: a shell cannot switch ids, so this interpreter (started as root,
# single-threaded: safe to switch there) takes cwd, umask, groups, gid, uid in that order (as
# subprocess does), sets LISTEN_PID to its own pid and execs the program.
_PY_SHIM = """\
import os, signal, sys, warnings  # execvp may import warnings: do it while still root
# The interpreter ignores these at startup; an ignored signal survives exec (subprocess's
# restore_signals undoes the same for a program run without listeners).
for s in ("SIGPIPE", "SIGXFSZ"):
    if hasattr(signal, s):
        signal.signal(getattr(signal, s), signal.SIG_DFL)
cwd, umask, groups, gid, uid, *argv = sys.argv[1:]
# Like systemd: the program has 0-2 and its sockets 3.. only. The parent listed corral's
# inheritable fds as close actions already; this also catches one made since (by a thread).
os.closerange(3 + int(os.environ.get("LISTEN_FDS", "0")), os.sysconf("SC_OPEN_MAX"))
try:
    if cwd:
        os.chdir(cwd)
    if umask:
        os.umask(int(umask, 8))
    if groups != "-":
        os.setgroups([int(g) for g in groups.split(",") if g])
    if gid:
        os.setregid(int(gid), int(gid))
    if uid:
        os.setreuid(int(uid), int(uid))
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.execvp(argv[0], argv)
except OSError as exc:
    sys.stderr.write(f"corral-listen: {argv[0]}: {exc}\\n")
    os._exit(127)
"""


def spawn_with_listeners(argv: Sequence[str], listeners: Sequence[Listener], *,
                         env: Mapping[str, str] | None = None, cwd: str | None = None,
                         stdout: int | None = None, stderr: int | None = None,
                         umask: int | None = None,
                         ids: tuple[int | None, int | None, list[int] | None] | None = None,
                         ) -> int:
    """Start ``argv`` as systemd would start a socket-activated service; returns its pid.

    The listeners land on fds 3.. (``posix_spawn`` file actions, so no code of ours runs
    between fork and exec in this threaded process), the program gets LISTEN_FDS,
    LISTEN_FDNAMES and, from the shim, LISTEN_PID = its own pid; ``{listen.NAME.fd}`` in the
    argv is replaced. It leads a new process group and gets no other fd of ours: fds 0-2 and
    its sockets only (an inheritable fd corral inherited is closed in the child, as systemd
    and Popen's ``close_fds`` do).
    ``umask`` is set by the shim. ``ids`` = (uid, gid, supplementary groups) to switch to
    (None each: keep ours); the shim is then this interpreter (``-I -S``, a few milliseconds
    more), which switches them before the exec.

    Raises:
        ValueError: an unknown placeholder; OSError: it could not be started.
    """
    argv = substitute_argv(argv, listeners)
    program = argv[0] if os.sep in argv[0] else (shutil.which(argv[0]) or argv[0])
    full_env = dict(os.environ if env is None else env)
    for key in LISTEN_ENV:
        full_env.pop(key, None)
    full_env.update(listen_env(listeners))
    n = len(listeners)
    # Park every source fd above the targets first: a source may sit on a target number.
    floor = SD_LISTEN_FDS_START + n + 3
    parked: list[int] = []
    actions: list[tuple[int, ...]] = []
    try:
        for lst in listeners:
            parked.append(_dup_above(lst.fd, floor))
        if stdout is not None:
            actions.append((os.POSIX_SPAWN_DUP2, stdout, 1))
        if stderr is not None:
            actions.append((os.POSIX_SPAWN_DUP2, stderr, 2))
        devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        parked.append(devnull)
        actions.append((os.POSIX_SPAWN_DUP2, devnull, 0))
        for i, fd in enumerate(parked[:n]):
            actions.append((os.POSIX_SPAWN_DUP2, fd, SD_LISTEN_FDS_START + i))
        # An fd corral itself inherited without close-on-exec (from its launching shell, say)
        # would survive the exec: close each one past the sockets (after the dup2s, so an
        # inheritable stdout/stderr source goes too), as Popen's close_fds does.
        actions.extend((os.POSIX_SPAWN_CLOSE, fd)
                       for fd in _inheritable_fds(SD_LISTEN_FDS_START + n))
        if ids is not None:
            uid, gid, groups = ids
            exe = sys.executable
            shim = [exe, "-I", "-S", "-c", _PY_SHIM, cwd or "",
                    "" if umask is None else f"{umask:o}",
                    "-" if groups is None else ",".join(map(str, groups)),
                    "" if gid is None else str(gid), "" if uid is None else str(uid)]
        else:
            exe = "/bin/sh"
            script = _SHIM_CWD if cwd else _SHIM
            if umask is not None:
                script = f"umask {umask:03o}; {script}"
            shim = ["/bin/sh", "-c", script, "corral-listen"]
            if cwd:
                shim.append(cwd)
        return os.posix_spawn(exe, [*shim, program, *argv[1:]], full_env,
                              file_actions=actions, setpgroup=0, resetids=False,
                              setsigmask=(), setsigdef=_catchable_signals())
    finally:
        for fd in parked:
            with contextlib.suppress(OSError):
                os.close(fd)


def _inheritable_fds(lowest: int) -> list[int]:
    """Our open fds numbered ``lowest`` or more that lack close-on-exec."""
    try:
        candidates = sorted(int(name) for name in os.listdir("/proc/self/fd"))
    except OSError:  # no /proc: try every number the limit allows (a bounded scan)
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        top = 65536 if soft == resource.RLIM_INFINITY else min(soft, 65536)
        candidates = list(range(lowest, top))
    out = []
    for fd in candidates:
        if fd < lowest:
            continue
        try:
            if os.get_inheritable(fd):
                out.append(fd)
        except OSError:  # closed meanwhile (the listing's own fd, another thread's)
            continue
    return out


def _dup_above(fd: int, floor: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor)


def _catchable_signals() -> tuple[int, ...]:
    import signal

    return tuple(s for s in signal.valid_signals()
                 if s not in (signal.SIGKILL, signal.SIGSTOP))
