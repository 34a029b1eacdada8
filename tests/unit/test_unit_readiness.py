"""Readiness specs and checks: parsing, real TCP/HTTP probes, the prober on a loop, log regex."""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from corral._readiness import (
    LogMatcher,
    Prober,
    ReadyHttp,
    ReadyLog,
    ReadyNotify,
    ReadyStarted,
    ReadyTcp,
    parse_ready,
    probe_http,
    probe_tcp,
)

pytestmark = pytest.mark.timeout(30)


def test_parse_ready_kinds() -> None:
    assert parse_ready("started") == ReadyStarted()
    assert parse_ready("notify") == ReadyNotify()
    assert parse_ready("tcp:8000") == ReadyTcp("127.0.0.1", 8000)
    assert parse_ready("tcp:localhost:81") == ReadyTcp("localhost", 81)
    assert parse_ready("tcp:[::1]:81") == ReadyTcp("::1", 81)
    assert str(parse_ready("tcp:[::1]:81")) == "tcp:[::1]:81"
    assert parse_ready("http://127.0.0.1:8000/healthz") == ReadyHttp(
        "http://127.0.0.1:8000/healthz")
    spec = parse_ready(r"log:listening on \d+")
    assert isinstance(spec, ReadyLog) and spec.pattern.pattern == r"listening on \d+"


@pytest.mark.parametrize(("value", "message"), [
    ("tcp:0", "port in 1..65535"),
    ("tcp:99999", "port in 1..65535"),
    ("tcp:http", "port in 1..65535"),
    ("tcp:[::1]80", r"tcp:\[IPv6\]:PORT"),
    ("http://", "with a host"),
    ("http://host:notaport/", "with a host"),
    ("log:", "needs a regular expression"),
    ("log:(unclosed", "regular expression is invalid"),
    ("ready", "must be one of"),
])
def test_parse_ready_errors(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as e:
        parse_ready(value)
    assert repr(value) in str(e.value)


def test_parse_ready_type() -> None:
    with pytest.raises(TypeError, match=r"ready must be a string .* got 5 \(int\)"):
        parse_ready(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_probe_tcp() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert not probe_tcp("127.0.0.1", port, 1.0)  # bound, not listening
        s.listen(1)
        assert probe_tcp("127.0.0.1", port, 1.0)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        code = 200 if self.path == "/ok" else 503
        self.send_response(code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"hi")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    t.join(10)


def test_probe_http(http_server: int) -> None:
    assert probe_http(f"http://127.0.0.1:{http_server}/ok")
    assert not probe_http(f"http://127.0.0.1:{http_server}/starting")
    assert not probe_http(f"http://127.0.0.1:{free_port()}/ok", timeout=0.5)


def _one_answer(answer: Callable[[socket.socket], None]) -> tuple[int, threading.Thread]:
    """A listener that answers its first connection with ``answer(conn)`` (real sockets)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn, contextlib.suppress(OSError):
                conn.recv(4096)
                answer(conn)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return listener.getsockname()[1], t


def test_probe_http_reads_the_status_line_only() -> None:
    # An event stream: 200 at once, then a body that never ends. Reading the body (64 KiB,
    # each read under its own timeout) held the probe, and every program's probes behind it.
    stop = threading.Event()

    def stream(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
        while not stop.wait(0.2):
            conn.sendall(b"data: tick\n\n")

    port, t = _one_answer(stream)
    try:
        t0 = time.monotonic()
        assert probe_http(f"http://127.0.0.1:{port}/events", timeout=1.0)
        assert time.monotonic() - t0 < 5  # generous: it returns at the status line
    finally:
        stop.set()
        t.join(10)


def test_probe_http_has_one_deadline_for_the_whole_probe() -> None:
    # A server that trickles its answer a byte at a time, each byte within the per-read
    # timeout: the probe fails at its deadline, not when the server is done.
    stop = threading.Event()

    def trickle(conn: socket.socket) -> None:
        for byte in b"HTTP/1.1 200 OK\r\n" * 100:
            if stop.wait(0.3):
                return
            conn.sendall(bytes([byte]))

    port, t = _one_answer(trickle)
    try:
        t0 = time.monotonic()
        assert not probe_http(f"http://127.0.0.1:{port}/", timeout=1.0)
        assert time.monotonic() - t0 < 4  # (before: the whole status line, ~5 s)
    finally:
        stop.set()
        t.join(10)


def test_prober_waits_until_the_port_listens(loop) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        ready: list[bool] = []
        prober = Prober(loop, ReadyTcp("127.0.0.1", port), lambda: ready.append(True),
                        interval=0.01)
        loop.run_until(lambda: prober.attempts >= 3, what="a few failed probes")
        assert ready == []
        s.listen(1)
        loop.run_until(lambda: ready, what="ready")
        assert prober.done and ready == [True]


def test_prober_http_and_cancel(loop, http_server: int) -> None:
    ready: list[bool] = []
    Prober(loop, ReadyHttp(f"http://127.0.0.1:{http_server}/ok"), lambda: ready.append(True))
    loop.run_until(lambda: ready, what="http ready")
    never: list[bool] = []
    prober = Prober(loop, ReadyHttp(f"http://127.0.0.1:{http_server}/starting"),
                    lambda: never.append(True), interval=0.01)
    loop.run_until(lambda: prober.attempts >= 2, what="probes")
    prober.cancel()
    attempts = prober.attempts
    loop.run_for(0.2)
    assert never == [] and prober.attempts <= attempts + 1


def test_prober_rejects_other_specs(loop) -> None:
    with pytest.raises(TypeError, match="tcp: or http:"):
        Prober(loop, ReadyNotify(), lambda: None)  # type: ignore[arg-type]


def test_log_matcher() -> None:
    spec = parse_ready(r"log:Uvicorn running on http://\S+")
    assert isinstance(spec, ReadyLog)
    m = LogMatcher(spec)
    assert not m.feed(b"INFO: Started server process")
    assert m.feed(b"INFO: Uvicorn running on http://127.0.0.1:8000 (Press CTRL+C)")
    assert m.feed("anything after") and m.matched is not None
    assert "Uvicorn" in m.matched
