"""sd_notify, both sides: the receiving socket corral gives each command worker, and the sender
that tells systemd (or any ``$NOTIFY_SOCKET``) about corral itself.

Protocol (``sd_notify(3)``): one AF_UNIX datagram to ``$NOTIFY_SOCKET`` (a leading ``@`` means
the abstract namespace), payload newline-separated ``KEY=VALUE`` lines: ``READY=1``,
``STATUS=...``, ``WATCHDOG=1``, ``STOPPING=1``, ``RELOADING=1`` (with
``MONOTONIC_USEC=<CLOCK_MONOTONIC us>``), ``MAINPID=``, ``EXTEND_TIMEOUT_USEC=``, ``ERRNO=``...

Receiver: a SOCK_DGRAM socket with SO_PASSCRED, read on the loop without blocking; the sender's
pid/uid/gid come from the kernel (SCM_CREDENTIALS), never from the payload, and only pids the
``accept_pid`` callback allows (typically: in the worker's process group) are heard. A message
from a process that exited before it was read cannot be checked against its group and is
dropped (systemd has the same limit; a worker sends READY before it exits).

Sender: never blocks (MSG_DONTWAIT); a no-op when ``$NOTIFY_SOCKET`` is unset.
:class:`Notifier` is a service's side of it (``corral serve``, ``corral run``): the variables
taken from the environment and removed from it, STATUS only when it changed, the watchdog
pings and the stop's time extensions on the caller's loop.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import secrets
import socket
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from corral._loop import Loop

__all__ = [
    "NOTIFY_ENV",
    "Notifier",
    "NotifyMessage",
    "NotifySocket",
    "extend_timeout",
    "in_process_group",
    "notify",
    "notify_raw",
    "parse_notify",
    "ready",
    "reloading",
    "status",
    "stopping",
    "strip_notify_env",
    "watchdog",
    "watchdog_interval",
]

log = logging.getLogger(__name__)

NOTIFY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
MAX_MESSAGE = 4096  # systemd's own limit for a notify datagram is a page
_UCRED = struct.Struct("3i")
_MAX_FDS = 16
_PER_WAKEUP = 64


# ------------------------------------------------------------------------------ parsing


def parse_notify(data: bytes) -> dict[str, str]:
    """``KEY=VALUE`` lines to a dict (later keys win); malformed lines are skipped."""
    out: dict[str, str] = {}
    text = data.decode("utf-8", "replace")
    for line in text.split("\n"):
        key, sep, value = line.partition("=")
        if not sep or not key or not all(c.isupper() or c.isdigit() or c == "_" for c in key):
            if line:
                log.debug("notify: ignoring malformed line %r", line[:80])
            continue
        out[key] = value
    return out


@dataclass(frozen=True)
class NotifyMessage:
    """One datagram, with the sender as the kernel saw it."""

    pid: int
    uid: int
    gid: int
    fields: Mapping[str, str] = field(default_factory=dict)
    at: float = 0.0  # time.monotonic() when it was read

    @property
    def ready(self) -> bool:
        return self.fields.get("READY") == "1"

    @property
    def stopping(self) -> bool:
        return self.fields.get("STOPPING") == "1"

    @property
    def reloading(self) -> bool:
        return self.fields.get("RELOADING") == "1"

    @property
    def watchdog(self) -> bool:
        """A keep-alive ping (``WATCHDOG=1``): corral treats it as a heartbeat."""
        return self.fields.get("WATCHDOG") == "1"

    @property
    def watchdog_trigger(self) -> bool:
        """``WATCHDOG=trigger``: the service asks to be treated as hung now."""
        return self.fields.get("WATCHDOG") == "trigger"

    @property
    def status(self) -> str | None:
        return self.fields.get("STATUS")

    @property
    def mainpid(self) -> int | None:
        return _int_field(self.fields, "MAINPID")

    @property
    def errno(self) -> int | None:
        return _int_field(self.fields, "ERRNO")

    @property
    def extend_timeout_usec(self) -> int | None:
        return _int_field(self.fields, "EXTEND_TIMEOUT_USEC")

    @property
    def monotonic_usec(self) -> int | None:
        return _int_field(self.fields, "MONOTONIC_USEC")


def _int_field(fields: Mapping[str, str], key: str) -> int | None:
    value = fields.get(key)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def in_process_group(pgid: int) -> Callable[[int], bool]:
    """An ``accept_pid`` that allows the processes of one process group (a worker's)."""

    def accept(pid: int) -> bool:
        try:
            return os.getpgid(pid) == pgid
        except OSError:  # gone already (or not ours to see)
            return False

    return accept


# ------------------------------------------------------------------------------ receiver


class NotifySocket:
    """A notify socket for one worker (or a group of them), read on the loop.

    Args:
        loop: the event loop.
        on_message: called on the loop thread with each accepted :class:`NotifyMessage`.
        accept_pid: which sender pids to hear (e.g. :func:`in_process_group`); None accepts
            every sender (only for tests and trusted setups).
        path: bind to this filesystem path (its directory should be 0700 and owned by us, or
            by the worker's user when it runs as another one). None: an abstract-namespace
            address with a random name (no filesystem permissions involved, so a worker run
            as another user can send; the credentials check still applies).
        max_size: longest datagram accepted; longer ones are dropped and logged.
        name: the worker's name, for log messages.
    """

    def __init__(self, loop: Loop, on_message: Callable[[NotifyMessage], None], *,
                 accept_pid: Callable[[int], bool] | None, path: str | None = None,
                 max_size: int = MAX_MESSAGE, name: str = "worker") -> None:
        if max_size < 16:
            raise ValueError(f"max_size must be >= 16, got {max_size!r}")
        self.name = name
        self._loop = loop
        self._on_message = on_message
        self._accept_pid = accept_pid
        self._max = max_size
        self._path = path
        self.rejected = 0
        self._warned: set[int] = set()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            if path is None:
                self.address = f"@corral-notify-{os.getpid()}-{secrets.token_hex(8)}"
                sock.bind("\0" + self.address[1:])
            else:
                sock.bind(path)
                os.chmod(path, 0o600)
                self.address = path
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._closed = False
        loop.add_reader(sock.fileno(), self._on_readable)

    @property
    def fileno(self) -> int:
        return self._sock.fileno()

    def env(self) -> dict[str, str]:
        """The environment entries a worker needs to talk to this socket."""
        return {"NOTIFY_SOCKET": self.address}

    def allow_owner(self, uid: int, gid: int = -1) -> None:
        """Let a worker that runs as ``uid`` connect to a path socket (chown it)."""
        if self._path is not None:
            os.chown(self._path, uid, gid)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        if self._path is not None:
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass

    def _on_readable(self) -> None:
        for _ in range(_PER_WAKEUP):  # bounded: other fds get their turn
            if self._closed:
                return
            try:
                data, ancdata, flags, _addr = self._sock.recvmsg(
                    self._max, socket.CMSG_SPACE(_UCRED.size)
                    + socket.CMSG_SPACE(_MAX_FDS * array.array("i").itemsize))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.ENOBUFS):
                    return
                log.warning("notify socket of %s: recvmsg failed (%s)", self.name, exc)
                return
            self._handle(data, ancdata, flags)

    def _handle(self, data: bytes, ancdata: list[tuple[int, int, bytes]], flags: int) -> None:
        cred: tuple[int, int, int] | None = None
        for level, kind, payload in ancdata:
            if level != socket.SOL_SOCKET:
                continue
            if kind == socket.SCM_CREDENTIALS and len(payload) >= _UCRED.size:
                pid, uid, gid = _UCRED.unpack_from(payload)
                cred = (pid, uid, gid)
            elif kind == socket.SCM_RIGHTS:
                # FDSTORE and friends: corral keeps no fds from workers; never leak them.
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                for fd in fds:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
        if cred is None:
            self._reject(-1, "it carried no credentials")
            return
        pid, uid, gid = cred
        if flags & socket.MSG_TRUNC:
            self._reject(pid, f"it is longer than {self._max} bytes")
            return
        if self._accept_pid is not None and not self._accept_pid(pid):
            self._reject(pid, "the sender is not in the worker's process group (or exited)")
            return
        fields = parse_notify(data)
        if not fields:
            return
        self._on_message(NotifyMessage(pid, uid, gid, fields, time.monotonic()))

    def _reject(self, pid: int, why: str) -> None:
        self.rejected += 1
        if pid not in self._warned and len(self._warned) < 100:
            self._warned.add(pid)
            log.warning("notify socket of %s: dropped a message from pid %d: %s", self.name,
                        pid, why)


# ------------------------------------------------------------------------------ sender


def _address(env: Mapping[str, str]) -> str | None:
    addr = env.get("NOTIFY_SOCKET")
    if not addr:
        return None
    if addr[0] == "@":
        return "\0" + addr[1:]
    if addr[0] != "/":
        # vsock:/... and relative paths are not supported: say so rather than guess.
        log.warning("NOTIFY_SOCKET=%r is neither an absolute path nor @abstract; ignored", addr)
        return None
    return addr


def notify_raw(text: str, *, env: Mapping[str, str] | None = None) -> bool:
    """Send ``text`` as one datagram to ``$NOTIFY_SOCKET``.

    Returns:
        True if sent; False if ``NOTIFY_SOCKET`` is unset (a no-op) or the message could not
        be sent without blocking (logged).
    """
    addr = _address(os.environ if env is None else env)
    if addr is None:
        return False
    payload = text.encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(payload, socket.MSG_DONTWAIT, addr)
        except OSError as exc:
            log.warning("sd_notify to %r failed (%s): %r not delivered", addr.lstrip("\0"),
                        exc, text[:200])
            return False
    return True


def notify(*, env: Mapping[str, str] | None = None, **fields: object) -> bool:
    """``notify(READY=1, STATUS="3/4 ready")``: fields in the order given, one datagram."""
    lines = []
    for key, value in fields.items():
        text = str(int(value)) if isinstance(value, bool) else str(value)
        if "\n" in text:
            raise ValueError(f"notify field {key} must be one line, got {text!r}")
        lines.append(f"{key}={text}")
    return notify_raw("\n".join(lines), env=env)


def ready(status: str | None = None, *, env: Mapping[str, str] | None = None) -> bool:
    if status is None:
        return notify(READY=1, env=env)
    return notify(READY=1, STATUS=status, env=env)


def status(text: str, *, env: Mapping[str, str] | None = None) -> bool:
    return notify(STATUS=text, env=env)


def watchdog(*, env: Mapping[str, str] | None = None) -> bool:
    return notify(WATCHDOG=1, env=env)


def stopping(status: str | None = None, *, env: Mapping[str, str] | None = None) -> bool:
    if status is None:
        return notify(STOPPING=1, env=env)
    return notify(STOPPING=1, STATUS=status, env=env)


def reloading(status: str | None = None, *, env: Mapping[str, str] | None = None) -> bool:
    """``RELOADING=1`` with ``MONOTONIC_USEC`` (Type=notify-reload needs both)."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    if status is None:
        return notify(RELOADING=1, MONOTONIC_USEC=usec, env=env)
    return notify(RELOADING=1, MONOTONIC_USEC=usec, STATUS=status, env=env)


def extend_timeout(seconds: float, *, env: Mapping[str, str] | None = None) -> bool:
    """Ask for ``seconds`` more (``EXTEND_TIMEOUT_USEC``) during a long start, reload or stop."""
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds!r}")
    return notify(EXTEND_TIMEOUT_USEC=int(seconds * 1_000_000), env=env)


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """How often to send ``WATCHDOG=1``: half of ``WATCHDOG_USEC``, in seconds, or None.

    None when no watchdog is asked for, or when ``WATCHDOG_PID`` names another process (the
    variables were inherited and are not meant for us).
    """
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    try:
        if pid and int(pid) != os.getpid():
            return None
        value = int(usec)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r / WATCHDOG_PID=%r are not integers; no watchdog", usec,
                    pid)
        return None
    if value <= 0:
        return None
    return value / 2_000_000


def strip_notify_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` without NOTIFY_SOCKET / WATCHDOG_*: for workers when corral consumes them."""
    return {k: v for k, v in env.items() if k not in NOTIFY_ENV}


# ------------------------------------------------------------------------------ a service


class Notifier:
    """A service's messages to systemd (a no-op without ``NOTIFY_SOCKET``).

    The variables are taken at construction and removed from ``os.environ``, so workers (and
    their children) never talk to systemd in corral's name.

    Args:
        env: where NOTIFY_SOCKET / WATCHDOG_USEC / WATCHDOG_PID come from (default:
            ``os.environ``, from which they are then removed).
    """

    # While a long stop goes on, more time is asked for this often (each time for what is
    # left of it plus EXTEND_MARGIN).
    EXTEND_EVERY = 5.0
    EXTEND_MARGIN = 10.0

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        source = os.environ if env is None else env
        self.env = {k: source[k] for k in NOTIFY_ENV if k in source}
        if env is None:
            for key in NOTIFY_ENV:
                os.environ.pop(key, None)
        self.enabled = bool(self.env.get("NOTIFY_SOCKET"))
        self.watchdog_interval = watchdog_interval(self.env) if self.enabled else None
        self.sent: list[str] = []  # what was sent (for status and tests)
        self._is_ready = False
        self._last_status = ""
        self._watchdog_on = False
        self._extending = False

    def _send(self, **fields: object) -> None:
        if not self.enabled:
            return
        notify(env=self.env, **fields)
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
            self._last_status = status
            reloading(status, env=self.env)
            self.sent.append(f"RELOADING=1 STATUS={status}")

    def stopping(self, status: str) -> None:
        self._last_status = status
        self._send(STOPPING=1, STATUS=status)

    def extend_timeout(self, seconds: float) -> None:
        if self.enabled and seconds > 0:
            extend_timeout(seconds, env=self.env)
            self.sent.append(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def watchdog(self) -> None:
        if self.enabled:
            watchdog(env=self.env)

    def start_watchdog(self, loop: Loop) -> None:
        """WATCHDOG=1 every WATCHDOG_USEC/2 from ``loop`` (a stuck loop sends none)."""
        interval = self.watchdog_interval
        if not interval or self._watchdog_on:
            return
        self._watchdog_on = True

        def ping() -> None:
            self.watchdog()
            loop.call_later(interval, ping)

        ping()

    def keep_extending(self, loop: Loop, remaining: Callable[[], float | None]) -> None:
        """EXTEND_TIMEOUT_USEC now and every EXTEND_EVERY seconds, for ``remaining()`` +
        EXTEND_MARGIN seconds, until ``remaining()`` says None (the stop is over)."""
        if not self.enabled or self._extending:
            return
        self._extending = True

        def extend() -> None:
            left = remaining()
            if left is None:
                self._extending = False
                return
            self.extend_timeout(max(left, 0.0) + self.EXTEND_MARGIN)
            loop.call_later(self.EXTEND_EVERY, extend)

        extend()
