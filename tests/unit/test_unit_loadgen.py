"""benchmarks/loadgen.py: its response parser, and its failure classes against a real server on
loopback (an asyncio server in the test, misbehaving on purpose) and over a unix socket."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
import loadgen  # noqa: E402

pytestmark = pytest.mark.timeout(60)

OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


# --------------------------------------------------------------------------------- parser


def parse(data: bytes, eof: bool = True, method: str = "GET") -> loadgen.Response:
    async def go() -> loadgen.Response:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        if eof:
            reader.feed_eof()
        return await loadgen.read_response(reader, method)

    return asyncio.run(go())


def test_content_length_and_keep_alive() -> None:
    r = parse(OK_RESPONSE)
    assert (r.status, r.reason, r.body_length, r.keep_alive) == (200, "OK", 2, True)
    assert ("content-length", "2") in r.headers


def test_chunked_with_extension_and_trailer() -> None:
    r = parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-Trailer: y\r\n\r\n")
    assert (r.status, r.body_length, r.keep_alive) == (200, 15, True)


def test_interim_100_is_skipped() -> None:
    r = parse(b"HTTP/1.1 100 Continue\r\n\r\n" + OK_RESPONSE)
    assert (r.status, r.body_length) == (200, 2)


def test_connection_close_http10_and_unframed_bodies() -> None:
    assert not parse(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
                     ).keep_alive
    assert not parse(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").keep_alive
    assert parse(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n"
                 ).keep_alive
    r = parse(b"HTTP/1.1 200 OK\r\n\r\nto the end")  # no framing: the body runs to EOF
    assert (r.body_length, r.keep_alive) == (10, False)


def test_no_body_for_head_204_304() -> None:
    assert parse(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", eof=False,
                 method="HEAD").body_length == 0
    assert parse(b"HTTP/1.1 204 No Content\r\n\r\n", eof=False).status == 204
    assert parse(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n", eof=False
                 ).body_length == 0


def test_two_responses_on_one_connection() -> None:
    async def go() -> list[int]:
        reader = asyncio.StreamReader()
        reader.feed_data(OK_RESPONSE + b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        return [(await loadgen.read_response(reader)).status for _ in range(2)]

    assert asyncio.run(go()) == [200, 404]


@pytest.mark.parametrize("data", [
    b"",                                                    # nothing at all
    b"HTTP/1.1 200 OK\r\nContent-Le",                       # inside the headers
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",    # inside the body
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",  # inside a chunk
])
def test_eof_before_the_end_is_a_premature_close(data: bytes) -> None:
    with pytest.raises(loadgen.PrematureClose):
        parse(data)


@pytest.mark.parametrize("data", [
    b"SSH-2.0-OpenSSH\r\n\r\n",
    b"HTTP/1.1 abc OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXX\r\n0\r\n\r\n",
])
def test_malformed_responses_are_protocol_errors(data: bytes) -> None:
    with pytest.raises(loadgen.ProtocolError):
        parse(data)


def test_request_bytes() -> None:
    assert loadgen.build_request("/x?y=1", "h:1", keep_alive=False) == (
        b"GET /x?y=1 HTTP/1.1\r\nHost: h:1\r\nUser-Agent: corral-loadgen\r\nAccept: */*\r\n"
        b"Connection: close\r\n\r\n")
    assert b"Connection: keep-alive\r\n" in loadgen.build_request("/", "h", keep_alive=True)


# ---------------------------------------------------------------- against a real server


class Server:
    """A loopback (or unix) asyncio server running ``handler`` per connection; counts the
    requests it has read (``requests``) and the connections it accepted."""

    def __init__(self, handler: Callable[[Server, asyncio.StreamReader, asyncio.StreamWriter],
                                         Awaitable[None]]) -> None:
        self.handler = handler
        self.requests = 0
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def read_request(self, reader: asyncio.StreamReader) -> bool:
        """Read one request head; False on EOF."""
        try:
            await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return False
        self.requests += 1
        return True

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.add(writer)
        try:
            await self.handler(self, reader, writer)
        except ConnectionError:
            pass
        finally:
            writer.close()
            self.writers.discard(writer)

    async def start(self, unix: str | None = None) -> str:
        if unix:
            self.server = await asyncio.start_unix_server(self._on_conn, unix)
            return "http://localhost/"
        self.server = await asyncio.start_server(self._on_conn, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/"

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        # From Python 3.12 wait_closed also waits for open connections (a stalling handler's):
        # close them first.
        for writer in list(self.writers):
            writer.close()
        await asyncio.wait_for(self.server.wait_closed(), 5)


def run(handler: Callable[[Server, asyncio.StreamReader, asyncio.StreamWriter],
                          Awaitable[None]], *, rate: float = 50, duration: float = 0.2,
        **kw: object) -> tuple[loadgen.LoadResult, Server]:
    async def go() -> tuple[loadgen.LoadResult, Server]:
        server = Server(handler)
        unix = kw.get("unix")
        url = await server.start(unix if isinstance(unix, str) else None)
        try:
            cfg = loadgen.LoadConfig(url=url, rate=rate, duration=duration, **kw)  # type: ignore[arg-type]
            return await loadgen.run_load(cfg), server
        finally:
            await server.stop()

    return asyncio.run(go())


def failures(result: loadgen.LoadResult) -> dict[str, int]:
    return {k: v for k, v in result.stats_between().failures.items() if v}


async def respond_ok(srv: Server, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
    while await srv.read_request(reader):
        writer.write(OK_RESPONSE)
        await writer.drain()


def test_all_ok_with_new_connections(no_leaks: set[int]) -> None:
    result, srv = run(respond_ok, rate=50, duration=0.2)
    st = result.stats_between()
    assert (st.sent, st.ok, st.failed) == (10, 10, 0)
    assert srv.requests == srv.connections == result.connections_opened == 10
    assert st.p50 is not None and st.max is not None and 0 < st.p50 <= st.max < 5
    assert result.cpu_seconds > 0 and len(result.windows(0.1)) == 2


def test_keepalive_reuses_connections(no_leaks: set[int]) -> None:
    result, srv = run(respond_ok, rate=50, duration=0.2, keepalive=True)
    assert result.stats_between().ok == 10 and srv.requests == 10
    # Sequential (20 ms apart, answered at once): one connection carries them all.
    assert result.connections_opened == srv.connections < 10
    assert sum(result.reused) >= 10 - srv.connections


def test_refused() -> None:
    # Bound, never listening: a SYN to it is answered with RST, and no one else can take the port.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        cfg = loadgen.LoadConfig(url=f"http://127.0.0.1:{port}/", rate=50, duration=0.1)
        result = asyncio.run(loadgen.run_load(cfg))
    assert failures(result) == {"refused": 5}


def test_reset() -> None:
    async def reset(srv: Server, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        await srv.read_request(reader)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # SO_LINGER 0 + close = RST

    result, _ = run(reset)
    assert failures(result) == {"reset": 10}


@pytest.mark.parametrize("partial", [b"", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"])
def test_premature_close(partial: bytes) -> None:
    async def close_early(srv: Server, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        await srv.read_request(reader)
        writer.write(partial)
        await writer.drain()
        # writer.close() in Server: a FIN after the partial response

    result, _ = run(close_early)
    assert failures(result) == {"premature_close": 10}


def test_timeout_and_open_loop() -> None:
    """A server that never answers: every request times out, yet all were launched on time."""
    async def stall(srv: Server, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        await srv.read_request(reader)
        await asyncio.Event().wait()  # until the test server is closed

    result, srv = run(stall, rate=40, duration=0.5, timeout=0.5)
    assert failures(result) == {"timeout": 20}
    assert srv.requests == 20
    assert result.max_in_flight >= 10  # launched while earlier ones were still waiting
    assert min(result.latency) >= 0.5


def test_non_2xx_and_other() -> None:
    async def err500(srv: Server, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        while await srv.read_request(reader):
            writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")

    async def garbage(srv: Server, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        await srv.read_request(reader)
        writer.write(b"NOT HTTP\r\n\r\n")

    result, _ = run(err500)
    assert failures(result) == {"non_2xx": 10}
    result, _ = run(garbage)
    assert failures(result) == {"other": 10}
    assert result.error_samples and "ProtocolError" in result.error_samples[0]


def test_keepalive_close_race_is_counted_not_retried() -> None:
    """The server answers the first request on a connection, then closes the connection on the
    second without answering: those requests fail (on a reused connection), and the server
    sees exactly as many requests as were scheduled."""
    async def one_then_drop(srv: Server, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        if await srv.read_request(reader):
            writer.write(OK_RESPONSE)
            await writer.drain()
        await srv.read_request(reader)  # then close (FIN) with the request unanswered

    result, srv = run(one_then_drop, rate=50, duration=0.4, keepalive=True)
    st = result.stats_between()
    assert srv.requests == st.sent == 20
    assert st.ok == st.failed == 10
    assert set(failures(result)) <= {"premature_close", "reset"}
    assert st.on_reused == 10


def test_keepalive_drops_connections_the_server_closed_while_idle() -> None:
    """A FIN seen while the connection sat in the pool: not used again, no request lost."""
    async def answer_then_close(srv: Server, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
        if await srv.read_request(reader):
            writer.write(OK_RESPONSE)  # says nothing of closing, then closes
            await writer.drain()

    result, srv = run(answer_then_close, rate=20, duration=0.5, keepalive=True)
    assert failures(result) == {}
    assert result.stale_dropped >= 5 and srv.requests == 10


def test_keepalive_pool_limit_queues_requests() -> None:
    async def slow(srv: Server, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter) -> None:
        while await srv.read_request(reader):
            await asyncio.sleep(0.1)
            writer.write(OK_RESPONSE)

    result, srv = run(slow, rate=50, duration=0.4, keepalive=True, connections=2)
    assert failures(result) == {} and srv.connections == 2
    # 20 requests through 2 connections at 100 ms each: the last waited about a second.
    assert max(result.latency) > 0.5


def test_unix_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    result, srv = run(respond_ok, unix=path)
    assert result.stats_between().ok == 10 == srv.requests
    missing = loadgen.LoadConfig(url="http://localhost/", rate=50, duration=0.1,
                                 unix=str(tmp_path / "nobody.sock"))
    assert failures(asyncio.run(loadgen.run_load(missing))) == {"refused": 5}


# ----------------------------------------------------------------- config, stats, the CLI


@pytest.mark.parametrize(("kw", "word"), [
    ({"url": "https://x/"}, "url"), ({"url": "127.0.0.1:80"}, "url"), ({"rate": 0}, "rate"),
    ({"duration": -1}, "duration"), ({"timeout": float("nan")}, "timeout"),
    ({"connections": 0}, "connections"),
])
def test_config_rejects_bad_values(kw: dict[str, object], word: str) -> None:
    args: dict[str, object] = {"url": "http://127.0.0.1/", "rate": 1, "duration": 1, **kw}
    with pytest.raises(ValueError, match=word):
        loadgen.LoadConfig(**args)  # type: ignore[arg-type]


def test_stats_windows_and_round_trip() -> None:
    r = loadgen.LoadResult("http://x/", 10, 2.0, False, t0=5.0,
                           sched=[0.0, 0.5, 1.0, 1.5], latency=[0.01, 0.02, 0.03, 1.0],
                           outcome=[loadgen.OK, loadgen.OK, loadgen.RESET, loadgen.OK],
                           reused=[False] * 4, elapsed=2.0, cpu_seconds=0.1)
    first, second = r.windows(1.0)
    assert (first.sent, first.ok, first.p99) == (2, 2, 0.02)
    assert (second.sent, second.ok, second.failures["reset"], second.max) == (2, 1, 1, 1.0)
    assert loadgen.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert loadgen.percentile([], 99) is None
    back = loadgen.LoadResult.from_dict(json.loads(json.dumps(r.to_dict(records=True))))
    assert back.stats_between(1.0, 2.0) == r.stats_between(1.0, 2.0)
    with pytest.raises(ValueError, match="records"):
        loadgen.LoadResult.from_dict(r.to_dict())


@pytest.fixture
def threaded_server() -> Iterator[str]:
    """An OK-answering server on its own thread and loop (the CLI runs its own loop)."""
    loop = asyncio.new_event_loop()
    srv = Server(respond_ok)
    url = loop.run_until_complete(srv.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield url
    finally:
        asyncio.run_coroutine_threadsafe(srv.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_cli_writes_json(threaded_server: str, tmp_path: Path, no_leaks: set[int]) -> None:
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "loadgen.py"), "--url", threaded_server, "--rate", "40",
         "--duration", "0.25", "--keepalive", "--json", str(out), "--records", "--loop",
         "asyncio"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "10 requests at 40/s" in proc.stdout and "ok 10, failed 0" in proc.stdout
    data = json.loads(out.read_text())
    assert data["overall"]["ok"] == 10 and len(data["records"]["sched"]) == 10
    assert data["keepalive"] is True and data["windows"][0]["sent"] == 10
