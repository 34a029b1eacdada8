"""The HTTP endpoint over real sockets, with fake pools (no worker processes): routes, methods,
limits, keep-alive, Host checks, and that it costs nothing while nobody asks."""

from __future__ import annotations

import contextlib
import http.client
import json
import select
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from unittest import mock

import psutil
import pytest
from test_unit_observability import FakeSource, worker

from corral._observe import PoolSummary, PoolView
from corral.endpoint import MAX_HEAD, Endpoint, _plain_request
from corral.states import WorkerState
from corral.status import WorkerStatus
from obs_support import get
from support import wait_for

S = WorkerState


@pytest.fixture
def web() -> FakeSource:
    return FakeSource("web", [worker(0), worker(1)])


@pytest.fixture
def endpoint(web: FakeSource) -> Iterator[Endpoint]:
    ep = Endpoint("127.0.0.1:0", pools=[web], request_timeout=1.0).start()
    yield ep
    ep.close()


def raw(address: tuple[str, int], data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` on a new connection; everything the server answers until it closes."""
    with socket.create_connection(address, timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_routes(endpoint: Endpoint, web: FakeSource) -> None:
    addr = endpoint.address
    assert addr[1] > 0 and endpoint.url == f"http://127.0.0.1:{addr[1]}"
    r = get(addr, "/livez")
    assert r.status == 200 and "livez check passed" in r.text and web.pinged == 1
    r = get(addr, "/readyz")
    assert r.status == 200 and "[+] pool 'web': 2/2 workers ready, needs 2" in r.text
    assert get(addr, "/readyz/web").status == 200
    assert get(addr, "/readyz/nope").status == 404
    assert get(addr, "/livez/nope").status == 404
    r = get(addr, "/metrics")
    assert r.status == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert 'corral_workers{pool="web",state="running"} 2.0' in r.text
    assert "process_cpu_seconds_total" not in r.text  # not unless asked
    doc = json.loads(get(addr, "/status").body)
    assert doc["schema"] == "corral.status/1"
    assert [w["index"] for w in doc["programs"][0]["workers"]] == [0, 1]
    # OpenMetrics when asked for, by the Accept header.
    r = get(addr, "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    assert r.text.rstrip().endswith("# EOF")
    # A query string is ignored; a HEAD has headers only.
    assert get(addr, "/readyz?verbose").status == 200
    r = get(addr, "/metrics", method="HEAD")
    assert r.status == 200 and r.body == b"" and int(r.headers["content-length"]) > 100
    assert r.headers["cache-control"] == "no-store"


def test_not_ready_and_not_alive(endpoint: Endpoint, web: FakeSource) -> None:
    web.workers = [worker(0), worker(1, S.BACKOFF)]
    r = get(endpoint.address, "/readyz")
    assert r.status == 503
    assert "[-] pool 'web': 1/2 workers ready, needs 2; not ready: w-1 backoff" in r.text
    web.responsive = False
    r = get(endpoint.address, "/livez")
    assert r.status == 503 and "did not answer" in r.text
    r = get(endpoint.address, "/status")
    assert json.loads(r.body)["programs"][0]["error"].startswith("its loop did not answer")


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405),
    (b"DELETE /status HTTP/1.1\r\n\r\n", 405),
    (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 405),
    (b"GET http://example.com/metrics HTTP/1.1\r\n\r\n", 404),  # never a proxy
    (b"GET //example.com/ HTTP/1.1\r\n\r\n", 404),
    (b"GET /metrics/ HTTP/1.1\r\n\r\n", 404),
    (b"GET /readyz/web/x HTTP/1.1\r\n\r\n", 404),
    (b"GET /../etc/passwd HTTP/1.1\r\n\r\n", 404),
    (b"GET /livez HTTP/1.1\r\nHost: evil.example:9100\r\n\r\n", 403),  # DNS rebinding
    (b"GET /livez HTTP/9.9\r\n\r\n", 505),
    (b"garbage\r\n\r\n", 400),
])
def test_bad_requests(endpoint: Endpoint, request_bytes: bytes, status: int) -> None:
    answer = raw(endpoint.address, request_bytes.replace(b"\r\n\r\n",
                                                        b"\r\nConnection: close\r\n\r\n", 1))
    assert answer.split(b"\r\n", 1)[0].split(b" ")[1] == str(status).encode(), answer[:300]
    if status == 405:
        assert b"Allow: GET, HEAD" in answer


def test_loopback_host_names_pass(endpoint: Endpoint) -> None:
    port = endpoint.address[1]
    for host in ("localhost", f"localhost:{port}", f"127.0.0.1:{port}", "[::1]:9100"):
        assert get(endpoint.address, "/livez", headers={"Host": host}).status == 200, host


def test_limits_size_and_time(web: FakeSource) -> None:
    with Endpoint("127.0.0.1:0", pools=[web], request_timeout=0.5).start() as ep:
        big = b"GET /livez HTTP/1.1\r\nX-Pad: " + b"a" * (MAX_HEAD + 10) + b"\r\n\r\n"
        assert raw(ep.address, big).startswith(b"HTTP/1.0 431 ")
        # A slow client is cut after request_timeout in all, whatever its pace: a header
        # line every 0.1 s keeps no connection open.
        t0 = time.monotonic()
        answer = b""
        with socket.create_connection(ep.address, timeout=10) as s:
            s.sendall(b"GET /livez HTTP/1.1\r\n")
            while time.monotonic() - t0 < 5 and not _readable(s, 0.1):
                with contextlib.suppress(OSError):
                    s.sendall(b"X: y\r\n")
            with contextlib.suppress(ConnectionResetError):  # our late lines may reset it
                answer = s.recv(65536)
        assert time.monotonic() - t0 < 3.0
        assert answer == b"" or answer.startswith(b"HTTP/1.0 408 "), answer


def _readable(s: socket.socket, timeout: float) -> bool:
    return bool(select.select([s], [], [], timeout)[0])


def test_keep_alive_and_pipelining(endpoint: Endpoint) -> None:
    conn = http.client.HTTPConnection(*endpoint.address, timeout=10)
    try:
        for path in ("/livez", "/metrics", "/readyz", "/nope"):
            conn.request("GET", path)
            r = conn.getresponse()
            r.read()
            assert r.status in (200, 404) and r.getheader("Connection") == "keep-alive"
        sock = conn.sock
        assert sock is not None
    finally:
        conn.close()
    # Two requests in one write: two answers, in order.
    answer = raw(endpoint.address, b"GET /livez HTTP/1.1\r\n\r\n"
                                   b"GET /nope HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert answer.count(b"HTTP/1.1 ") == 2
    assert answer.index(b"HTTP/1.1 200") < answer.index(b"HTTP/1.1 404")


def test_connection_limit_evicts_idle_then_refuses(web: FakeSource) -> None:
    with Endpoint("127.0.0.1:0", pools=[web], max_connections=2).start() as ep:
        idle = []
        for _ in range(2):
            c = http.client.HTTPConnection(*ep.address, timeout=10)
            c.request("GET", "/livez")
            c.getresponse().read()
            idle.append(c)  # kept alive, idle
        # A third connection takes the place of the longest-idle one.
        assert get(ep.address, "/livez").status == 200
        wait_for(lambda: len(ep._conns) <= 2, 5, "the evicted connection to go")
        # Two connections in the middle of a request are not idle: a third gets a 503.
        busy = [socket.create_connection(ep.address, timeout=10) for _ in range(2)]
        for s in busy:
            s.sendall(b"GET /livez HTTP/1.1\r\n")  # and nothing more yet
        wait_for(lambda: len(ep._conns) == 2 and not any(c.idle for c in ep._conns.values()),
                 5, "two busy connections")
        try:
            answer = raw(ep.address, b"GET /livez HTTP/1.1\r\n\r\n")
        except ConnectionResetError:
            answer = b""  # refused before its request arrived: the 503 may be lost with it
        assert answer == b"" or answer.startswith(b"HTTP/1.0 503 "), answer
        assert len(ep._conns) == 2
        for c in idle:
            c.close()
        for s in busy:
            s.close()


def _settled_rounds(ep: Endpoint) -> int:
    """The endpoint's round count once its thread sleeps in epoll_wait with that count
    unchanged across two looks (the round that closed the last connection may still be
    finishing when ``_conns`` empties)."""
    reactor, thread = ep._reactor, ep._thread
    assert reactor is not None and thread is not None
    path = f"/proc/self/task/{thread.native_id}/wchan"
    last = [-1]

    def settled() -> bool:
        with open(path) as fh:
            asleep = "epoll" in fh.read()
        before, last[0] = last[0], reactor.rounds if asleep else -1
        return asleep and before == last[0]

    wait_for(settled, 5, "the endpoint's thread asleep in epoll_wait")
    return reactor.rounds


def test_unused_endpoint_costs_nothing(web: FakeSource) -> None:
    with Endpoint("127.0.0.1:0", pools=[web]).start() as ep:
        assert get(ep.address, "/livez").status == 200
        reactor = ep._reactor
        assert reactor is not None
        wait_for(lambda: not ep._conns, 5, "the connection to close")
        rounds = _settled_rounds(ep)
        thread = ep._thread
        assert thread is not None
        cpu0 = time.clock_gettime(time.pthread_getcpuclockid(thread.ident or 0))
        time.sleep(1.0)  # watching for something that must not happen: a wake-up
        cpu1 = time.clock_gettime(time.pthread_getcpuclockid(thread.ident or 0))
        assert reactor.rounds == rounds  # it slept in epoll, no timeout
        assert cpu1 - cpu0 < 0.001


def test_close_releases_the_port_and_thread(web: FakeSource) -> None:
    ep = Endpoint("127.0.0.1:0", pools=[web]).start()
    addr = ep.address
    thread = ep._thread
    with pytest.raises(RuntimeError, match="already started"):
        ep.start()
    ep.close()
    ep.close()  # idempotent
    assert thread is not None and not thread.is_alive()
    with pytest.raises(OSError):
        socket.create_connection(addr, timeout=2).close()
    # The same port can be bound again at once (SO_REUSEADDR).
    again = Endpoint(f"127.0.0.1:{addr[1]}", pools=[web]).start()
    again.close()


def test_several_pools_and_a_registry_of_yours(web: FakeSource) -> None:
    from prometheus_client import CollectorRegistry, Counter

    registry = CollectorRegistry()
    mine = Counter("my_app_requests", "my own metric", registry=registry)
    mine.inc()
    jobs = FakeSource("jobs", [worker(0, S.STARTING, ready=False)])
    with Endpoint("127.0.0.1:0", pools=[web, jobs], registry=registry).start() as ep:
        text = get(ep.address, "/metrics").text
        assert "my_app_requests_total 1.0" in text
        assert 'corral_workers{pool="jobs",state="starting"} 1.0' in text
        r = get(ep.address, "/readyz")
        assert r.status == 503 and "[+] pool 'web'" in r.text and "[-] pool 'jobs'" in r.text
        assert get(ep.address, "/readyz/web").status == 200
    # Our collector left your registry with the endpoint.
    assert b"corral_workers" not in __import__("prometheus_client").generate_latest(registry)


def test_status_document_of_the_caller(web: FakeSource) -> None:
    doc = {"schema": "corral.status/1", "corral": {"pid": 1}, "programs": []}
    with Endpoint("127.0.0.1:0", pools=[web], status=lambda: doc).start() as ep:
        assert json.loads(get(ep.address, "/status").body) == doc


def test_readiness_and_liveness_of_the_caller(web: FakeSource) -> None:
    """A program's own verdict answers the bare /readyz and /livez; /readyz/POOL still asks
    the pool."""
    verdict = [False, "server 'web': starting: 0/2 workers ready, needs 2"]
    asked: list[float] = []

    def liveness(timeout: float) -> tuple[bool, str]:
        asked.append(timeout)
        return True, "server 'web': its loop answers"

    with Endpoint("127.0.0.1:0", pools=[web], readiness=lambda: (verdict[0], verdict[1]),
                  liveness=liveness, timeout=0.5).start() as ep:
        r = get(ep.address, "/readyz")
        assert r.status == 503
        assert r.text == ("[-] server 'web': starting: 0/2 workers ready, needs 2\n"
                          "readyz check failed\n")
        verdict[:] = [True, "server 'web': serving"]
        r = get(ep.address, "/readyz")
        assert r.status == 200 and r.text == "[+] server 'web': serving\nreadyz check passed\n"
        r = get(ep.address, "/readyz/web")
        assert r.status == 200 and "pool 'web': 2/2 workers ready" in r.text
        r = get(ep.address, "/livez")
        assert r.status == 200 and "its loop answers" in r.text and asked == [0.5]
        assert web.pinged == 0  # the caller's liveness, not the pools'
        assert get(ep.address, "/livez/web").status == 200 and web.pinged == 1
    with pytest.raises(TypeError, match="readiness must be a callable or None"):
        Endpoint("127.0.0.1:0", readiness=True)  # type: ignore[arg-type]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="address needs a host"):
        Endpoint(":9100")
    with pytest.raises(ValueError, match="timeout must be > 0"):
        Endpoint("127.0.0.1:0", timeout=0)
    with pytest.raises(TypeError, match="max_connections must be an int"):
        Endpoint("127.0.0.1:0", max_connections=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"expected a corral\.Supervisor"):
        Endpoint("127.0.0.1:0", pools=["web"])


def test_concurrent_scrapes(endpoint: Endpoint) -> None:
    errors: list[BaseException] = []

    def scrape_many() -> None:
        try:
            for _ in range(20):
                assert get(endpoint.address, "/metrics").status == 200
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=scrape_many) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors


# ----------------------------------------------- the lean path for plain requests (scrape cost)


@pytest.mark.parametrize("head", [
    b"GET /livez HTTP/1.0\r\nHost: localhost\r\n\r\n",  # not 1.1
    b"GET /livez HTTP/1.1\nHost: localhost\n\n",  # bare LF
    b"POST /livez HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET /livez HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\n\r\n",  # repeated
    b"GET /livez HTTP/1.1\r\nContent-Length: 3\r\n\r\n",
    b"GET /livez HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET /livez HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
    b"GET /livez HTTP/1.1\r\nHost : localhost\r\n\r\n",  # space before the colon
    b"GET /livez HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",  # obsolete line folding
    b"GET /liv\x01ez HTTP/1.1\r\n\r\n",
    b"GET /livez HTTP/1.1\r\nX: \xc3\xa9\r\n\r\n",  # not ASCII
    b"GET /livez HTTP/1.1\r\nX: a\rb\r\n\r\n",  # a lone CR
    b"GET  /livez HTTP/1.1\r\n\r\n",
    b"GET /livez HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n",  # the stdlib's 100 headers
])
def test_unusual_requests_take_the_stdlib_path(head: bytes) -> None:
    assert _plain_request(head) is None


def test_plain_request_is_parsed() -> None:
    got = _plain_request(b"GET /metrics?x=1 HTTP/1.1\r\nHost: 127.0.0.1:9100\r\n"
                         b"Accept: text/plain;version=0.0.4;q=0.9,*/*;q=0.1\r\n"
                         b"User-Agent: Prometheus/2.48.0\r\n"
                         b"X-Prometheus-Scrape-Timeout-Seconds:\t10 \r\n\r\n")
    assert got == ("GET", "/metrics?x=1",
                   {"host": "127.0.0.1:9100",
                    "accept": "text/plain;version=0.0.4;q=0.9,*/*;q=0.1",
                    "user-agent": "Prometheus/2.48.0",
                    "x-prometheus-scrape-timeout-seconds": "10"}, True)
    assert _plain_request(b"HEAD / HTTP/1.1\r\nConnection: Close\r\n\r\n") == (
        "HEAD", "/", {"connection": "Close"}, False)


def _answer_of(address: tuple[str, int], data: bytes) -> tuple[bytes, dict[str, str], bytes]:
    """(status line, headers but Date, body) of one request on its own connection."""
    answer = raw(address, data)
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    assert "Date" in headers
    del headers["Date"]
    return status.encode(), headers, body


@pytest.mark.parametrize("path", ["/livez", "/readyz", "/readyz/nope", "/nope", "/status",
                                  "/metrics", "http://example.com/metrics"])
def test_lean_and_stdlib_paths_answer_alike(endpoint: Endpoint, path: str) -> None:
    """The same request, plain (lean path) and with a header that sends it to the stdlib's
    parser (a folded line): the same status, headers and body."""
    plain = f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
    assert _plain_request(plain) is not None
    unusual = plain.replace(b"Host: localhost\r\n", b"Host: localhost\r\nX-A: b\r\n c\r\n")
    assert _plain_request(unusual) is None
    lean, stdlib = _answer_of(endpoint.address, plain), _answer_of(endpoint.address, unusual)
    if path == "/status":  # its uptime moves (and so its length)
        assert lean[0] == stdlib[0]
        assert {**lean[1], "Content-Length": ""} == {**stdlib[1], "Content-Length": ""}
        assert json.loads(lean[2])["schema"] == json.loads(stdlib[2])["schema"]
    else:
        assert lean == stdlib
    evil = plain.replace(b"Host: localhost", b"Host: evil.example")
    assert _plain_request(evil) is not None
    assert _answer_of(endpoint.address, evil)[0] == b"HTTP/1.1 403 Forbidden"
    head = plain.replace(b"GET ", b"HEAD ", 1)
    status, headers, body = _answer_of(endpoint.address, head)
    assert status == lean[0] and body == b""
    if path != "/status":  # its uptime moves (and so its length)
        assert headers["Content-Length"] == lean[1]["Content-Length"]


def test_lean_path_keeps_the_connection(endpoint: Endpoint) -> None:
    with socket.create_connection(endpoint.address, timeout=10) as s:
        for _ in range(3):
            s.sendall(b"GET /livez HTTP/1.1\r\nHost: localhost\r\n\r\n")
            answer = b""
            while b"livez check passed\n" not in answer:
                chunk = s.recv(65536)
                assert chunk, answer
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: keep-alive" in answer
        s.sendall(b"GET /livez HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
        assert b"Connection: close" in answer and answer.endswith(b"livez check passed\n")


@pytest.mark.parametrize("accept", ["", "application/openmetrics-text; version=1.0.0",
                                    "application/openmetrics-text; version=0.0.1"])
def test_metrics_stay_what_the_encoder_writes(web: FakeSource, accept: str) -> None:
    """Scrape after scrape (families cached, the moving ones written directly), the body is
    byte for byte what prometheus_client's encoder writes for the same registry, and its
    parser reads it; a pool name with characters to escape included."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import choose_encoder
    from prometheus_client.openmetrics.parser import (
        text_string_to_metric_families as om_families,
    )
    from prometheus_client.parser import text_string_to_metric_families

    from corral.metrics import CorralCollector

    # The workers' RSS is read for real, by both collectors at different moments: a sleeping
    # process's stays put (this test process's own may change between the two reads).
    sleeper = subprocess.Popen(["sleep", "60"])
    pid = sleeper.pid
    proc = psutil.Process(pid)
    last = [-1]

    def settled() -> bool:  # exec'd and loaded: its RSS the same as one poll ago
        rss, before = proc.memory_info().rss, last[0]
        last[0] = rss
        return proc.name() == "sleep" and rss == before
    wait_for(settled, 10, "the sleeping process to settle", interval=0.05)
    odd = FakeSource('we"ird\\pool', [worker(0, beat=1.0, pid=pid)])
    ep = Endpoint("127.0.0.1:0", pools=[web, odd]).start()
    try:
        mirror = CollectorRegistry(auto_describe=False)
        collector = CorralCollector([web, odd])
        mirror.register(collector)
        encoder, ctype = choose_encoder(accept)
        for round_ in range(4):
            web.workers = [worker(0, uptime=10.0 + round_, beat=0.5 * round_, pid=pid),
                           worker(1, S.BACKOFF if round_ == 2 else S.RUNNING, pid=pid)]
            body = get(ep.address, "/metrics", headers={"Accept": accept} if accept else {}).body
            expected = encoder(mirror)
            assert body == expected, [(x, y) for x, y in zip(
                body.decode().splitlines(), expected.decode().splitlines(), strict=False)
                if x != y]
            text = body.decode()
            families = list(om_families(text) if ctype.startswith("application/openmetrics")
                            else text_string_to_metric_families(text))
            assert {f.name for f in families} >= {"corral_workers", "corral_heartbeat_age_seconds"}
    finally:
        ep.close()
        sleeper.kill()
        sleeper.wait()


def test_kept_alive_connection_timeouts() -> None:
    """One timer a connection, moved only to fire earlier: an idle connection is still closed
    ``idle_timeout`` after its last answer however many requests came before, and a request
    begun on a kept-alive connection still has ``request_timeout`` for its head."""
    web = FakeSource("web", [worker(0)])
    with Endpoint("127.0.0.1:0", pools=[web], idle_timeout=0.6,
                  request_timeout=5.0).start() as ep, \
            socket.create_connection(ep.address, timeout=10) as s:
        t0 = time.monotonic()
        while True:  # past idle_timeout in all: kept by each request
            sent = time.monotonic()
            s.sendall(b"GET /livez HTTP/1.1\r\n\r\n")
            assert _readable(s, 5)
            assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
            if time.monotonic() - t0 >= 1.5:
                break
            time.sleep(0.2)
        assert _readable(s, 5)  # closed by the endpoint, idle
        assert s.recv(65536) == b""
        # The endpoint answered the last request after `sent`: its idle timer ran from then.
        assert 0.55 < time.monotonic() - sent < 3.0  # (less a timer's rounding)
    with Endpoint("127.0.0.1:0", pools=[web], idle_timeout=30.0,
                  request_timeout=0.5).start() as ep, \
            socket.create_connection(ep.address, timeout=10) as s:
        s.sendall(b"GET /livez HTTP/1.1\r\n\r\n")
        assert _readable(s, 5) and s.recv(65536).startswith(b"HTTP/1.1 200 ")
        t0 = time.monotonic()
        s.sendall(b"GET /livez HTTP/1.1\r\n")  # and nothing more
        assert _readable(s, 5)
        answer = s.recv(65536)
        assert answer == b"" or answer.startswith(b"HTTP/1.0 408 "), answer
        assert 0.3 < time.monotonic() - t0 < 3.0


def test_date_header_is_the_stdlib_one() -> None:
    import email.utils

    from corral import endpoint as module

    for now in (0, 86399, 951782400, 1780000000, 2**31 + 12345):
        module._date_cache = (-1, "")
        with mock.patch.object(module.time, "time", return_value=now + 0.25):
            assert module._http_date() == email.utils.formatdate(now, usegmt=True)


class GlancingSource(FakeSource):
    """A FakeSource that can be glanced at (as SupervisorSource): its stamp changes with
    ``version``, which the test bumps with every change but the ages."""

    def __init__(self, name: str, workers: list[WorkerStatus]) -> None:
        super().__init__(name, workers)
        self.version = 0
        self.observed = 0

    def observe(self, timeout: float, detail: bool = False) -> PoolView:
        self.observed += 1
        return super().observe(timeout, detail)

    def glance(self, timeout: float) -> tuple[object, float | None, float | None]:
        summary = PoolSummary.of(self.workers, budget_remaining=7)
        return ((self.version, self.stats.snapshot(), self.min_ready, 7), summary.youngest,
                summary.oldest_beat_age)


@pytest.mark.parametrize("accept", ["", "application/openmetrics-text; version=1.0.0"])
def test_quick_scrape_is_what_the_encoder_writes_and_follows_changes(accept: str) -> None:
    """A pool at rest is scraped without a view (its last body, the ages written anew): the
    body stays byte for byte what prometheus_client's encoder writes, and a change (a state,
    a restart counted) shows in the very next scrape."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import choose_encoder

    from corral.events import StopReason
    from corral.metrics import CorralCollector

    sleeper = subprocess.Popen(["sleep", "60"])  # an RSS that stays put between two reads
    proc = psutil.Process(sleeper.pid)
    last = [-1]

    def settled() -> bool:
        rss, before = proc.memory_info().rss, last[0]
        last[0] = rss
        return proc.name() == "sleep" and rss == before
    wait_for(settled, 10, "the sleeping process to settle", interval=0.05)
    pid = sleeper.pid
    src = GlancingSource("web", [worker(0, beat=0.5, pid=pid), worker(1, beat=1.0, pid=pid)])
    ep = Endpoint("127.0.0.1:0", pools=[src]).start()
    try:
        mirror = CollectorRegistry(auto_describe=False)
        mirror.register(CorralCollector([src]))
        encoder, _ = choose_encoder(accept)
        headers = {"Accept": accept} if accept else {}
        quick = 0
        for round_ in range(8):
            if round_ == 4:  # a worker backs off
                src.workers[1] = worker(1, S.BACKOFF, pid=pid)
                src.version += 1
                # ... and the other format is scraped first: this format's last body must not
                # be taken for the new state.
                other = "" if accept else "application/openmetrics-text; version=1.0.0"
                get(ep.address, "/metrics", headers={"Accept": other} if other else {})
            elif round_ == 6:  # a restart is counted (the stats snapshot changes)
                src.stats.restarted(StopReason.KILLED.name.lower(), 0.003)
            else:  # the ages alone move
                src.workers[0] = worker(0, uptime=10.0 + round_, beat=0.5 * round_, pid=pid)
            before = src.observed
            body = get(ep.address, "/metrics", headers=headers).body
            quick += src.observed == before
            expected = encoder(mirror)
            assert body == expected, (round_, [(x, y) for x, y in zip(
                body.decode().splitlines(), expected.decode().splitlines(), strict=False)
                if x != y])
            if round_ == 4:
                assert b'corral_workers{pool="web",state="backoff"} 1.0' in body
            if round_ >= 6:
                assert b'corral_worker_restarts_total{pool="web",reason="killed"} 1.0' in body
        assert quick >= 4, quick  # rounds 1-3, 5 and 7 need no view
    finally:
        ep.close()
        sleeper.kill()
        sleeper.wait()
