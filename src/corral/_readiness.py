"""Readiness of command workers: what ``ready = "..."`` means and how it is checked.

``"started"``      ready as soon as the process runs.
``"notify"``       the worker sends ``READY=1`` to its ``NOTIFY_SOCKET`` (:mod:`corral._notify`);
                   for a Python ``target`` worker, ``corral.ready()``.
``"tcp:PORT"``     a TCP connect to 127.0.0.1:PORT (or ``tcp:HOST:PORT``) succeeds.
``"http://..."``   a GET returns 2xx (``https://`` too, without certificate checks, as
                   Kubernetes' httpGet probes do: it is the worker's own endpoint).
``"log:REGEX"``    a line of the worker's output matches REGEX (``re.search``).

Probes run off the loop thread, on a few shared daemon threads (one program's slow answer
delays no other program's probe), and their result comes back with ``call_soon_threadsafe``.
Why: a connect to a loopback port whose accept queue is full blocks until its timeout (the SYN
is dropped), and the loop interface has no wait-for-writable for a non-blocking connect.
Threads idle unless a worker is starting, each probe bounded by one short deadline for the
whole of it, are simpler and as cheap. ``log:`` needs no probe: the log hub feeds
:class:`LogMatcher`.
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from urllib.parse import urlsplit

from corral._daemonpool import DaemonExecutor
from corral._loop import Loop, TimerHandle

__all__ = [
    "LogMatcher",
    "Prober",
    "ReadyHttp",
    "ReadyLog",
    "ReadyNotify",
    "ReadySpec",
    "ReadyStarted",
    "ReadyTcp",
    "parse_ready",
    "probe_http",
    "probe_tcp",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReadyStarted:
    def __str__(self) -> str:
        return "started"


@dataclass(frozen=True)
class ReadyNotify:
    def __str__(self) -> str:
        return "notify"


@dataclass(frozen=True)
class ReadyTcp:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


@dataclass(frozen=True)
class ReadyHttp:
    url: str

    def __str__(self) -> str:
        return self.url


@dataclass(frozen=True)
class ReadyLog:
    pattern: re.Pattern[str]

    def __str__(self) -> str:
        return f"log:{self.pattern.pattern}"


ReadySpec = ReadyStarted | ReadyNotify | ReadyTcp | ReadyHttp | ReadyLog

_EXPECTED = ('"started", "notify", "tcp:PORT", "tcp:HOST:PORT", "http://HOST:PORT/PATH" or '
             '"log:REGEX"')


def parse_ready(value: object) -> ReadySpec:
    """Parse a ``ready`` setting; ValueError/TypeError name what was expected and given."""
    if not isinstance(value, str):
        raise TypeError(f"ready must be a string ({_EXPECTED}), got {value!r} "
                        f"({type(value).__name__})")
    if value == "started":
        return ReadyStarted()
    if value == "notify":
        return ReadyNotify()
    if value.startswith("tcp:"):
        return _parse_tcp(value)
    if value.startswith(("http://", "https://")):
        parts = urlsplit(value)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if not parts.hostname or port == -1:
            raise ValueError(f"ready must be a URL with a host (and a valid port), got "
                             f"{value!r}")
        return ReadyHttp(value)
    if value.startswith("log:"):
        text = value[4:]
        if not text:
            raise ValueError(f"ready = \"log:REGEX\" needs a regular expression, got {value!r}")
        try:
            return ReadyLog(re.compile(text))
        except re.error as exc:
            raise ValueError(f"ready = {value!r}: the regular expression is invalid ({exc})"
                             ) from None
    raise ValueError(f"ready must be one of {_EXPECTED}, got {value!r}")


def _parse_tcp(value: str) -> ReadyTcp:
    rest = value[4:]
    host = "127.0.0.1"
    if rest.startswith("["):
        close = rest.find("]:")
        if close < 0:
            raise ValueError(f"ready must be tcp:[IPv6]:PORT, got {value!r}")
        host, rest = rest[1:close], rest[close + 2:]
    elif ":" in rest:
        host, rest = rest.rsplit(":", 1)
    if not rest.isdigit() or not 1 <= int(rest) <= 65535 or not host:
        raise ValueError(f"ready must be tcp:PORT or tcp:HOST:PORT with a port in 1..65535, "
                         f"got {value!r}")
    return ReadyTcp(host, int(rest))


# ------------------------------------------------------------------------------ probes


def probe_tcp(host: str, port: int, timeout: float = 1.0) -> bool:
    """True if a TCP connection to ``host:port`` is accepted within ``timeout``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def probe_http(url: str, timeout: float = 1.0) -> bool:
    """True if ``GET url`` answers a 2xx status within ``timeout`` in all (no redirects
    followed).

    Only the status line is read, against one deadline for the whole probe: a body that never
    ends (an event stream) is not waited for, and a server that trickles its answer a byte at
    a time cannot hold the probe (and the probes of other programs behind it) past it.
    """
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    https = parts.scheme == "https"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    name = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        name = f"{name}:{parts.port}"
    deadline = time.monotonic() + timeout
    try:
        request = (f"GET {target} HTTP/1.1\r\nHost: {name}\r\nUser-Agent: corral-readiness\r\n"
                   "Connection: close\r\n\r\n").encode("ascii")
        sock = socket.create_connection((host, parts.port or (443 if https else 80)),
                                        timeout=timeout)
    except (OSError, UnicodeError, ValueError):
        return False
    try:
        if https:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock = ctx.wrap_socket(sock, server_hostname=host)
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        sock.sendall(request)
        head = b""
        while b"\r\n" not in head and len(head) < 1024:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            sock.settimeout(left)
            chunk = sock.recv(1024)
            if not chunk:
                break
            head += chunk
        status = _STATUS_LINE.match(head.split(b"\r\n", 1)[0])
        return status is not None and 200 <= int(status.group(1)) < 300
    except (OSError, ValueError):
        return False
    finally:
        sock.close()


# "HTTP/1.1 200 OK", "HTTP/1.0 204", "HTTP/2 200"
_STATUS_LINE = re.compile(rb"HTTP/\d(?:\.\d)? (\d{3})(?: |$)")


class LogMatcher:
    """``log:REGEX``: feed it a worker's lines; True once one matches."""

    def __init__(self, spec: ReadyLog) -> None:
        self.pattern = spec.pattern
        self.matched: str | None = None

    def feed(self, line: bytes | str) -> bool:
        if self.matched is not None:
            return True
        text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
        if self.pattern.search(text):
            self.matched = text
            return True
        return False


_executor: DaemonExecutor | None = None
_executor_lock = threading.Lock()


def _shared_executor() -> DaemonExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            # Probes of several programs side by side: a slow answer delays no other program.
            _executor = DaemonExecutor(8, "corral-probe")
        return _executor


class Prober:
    """Probe a ``tcp:``/``http:`` spec until it succeeds, then call ``on_ready`` (loop thread).

    Probes run every ``interval`` seconds, growing by half up to ``max_interval``, on the shared
    probe threads. The startup timeout is the supervisor's business: it cancels the prober.

    Args:
        loop: the event loop.
        spec: a :class:`ReadyTcp` or :class:`ReadyHttp`.
        on_ready: called once, on the loop thread.
        timeout: per probe.
        executor: where probes run (default: one shared daemon thread).
    """

    def __init__(self, loop: Loop, spec: ReadyTcp | ReadyHttp, on_ready: Callable[[], None],
                 *, interval: float = 0.05, max_interval: float = 1.0, timeout: float = 1.0,
                 executor: Executor | None = None) -> None:
        if not isinstance(spec, ReadyTcp | ReadyHttp):
            raise TypeError(f"Prober needs a tcp: or http: spec, got {spec!r}")
        self.spec = spec
        self.attempts = 0
        self._loop = loop
        self._on_ready = on_ready
        self._interval = interval
        self._max = max_interval
        self._timeout = timeout
        self._executor = executor
        self._timer: TimerHandle | None = None
        self._done = False
        self._timer = loop.call_later(0.0, self._submit)

    @property
    def done(self) -> bool:
        return self._done

    def cancel(self) -> None:
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _probe(self) -> bool:
        spec = self.spec
        if isinstance(spec, ReadyTcp):
            return probe_tcp(spec.host, spec.port, self._timeout)
        return probe_http(spec.url, self._timeout)

    def _submit(self) -> None:
        self._timer = None
        if self._done:
            return
        executor = self._executor or _shared_executor()
        future = executor.submit(self._probe)
        future.add_done_callback(
            lambda f: self._loop.call_soon_threadsafe(
                self._result, f.exception() is None and bool(f.result())))

    def _result(self, ok: bool) -> None:
        self.attempts += 1
        if self._done:
            return
        if ok:
            self._done = True
            self._on_ready()
            return
        delay = self._interval
        self._interval = min(self._max, self._interval * 1.5)
        self._timer = self._loop.call_later(delay, self._submit)
