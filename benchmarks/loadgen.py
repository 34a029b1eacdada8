#!/usr/bin/env python3
"""An open-loop HTTP/1.1 load generator: a fixed request rate, every failure classified.

    python benchmarks/loadgen.py --url http://127.0.0.1:8000/ --rate 300 --duration 20 \
        [--keepalive] [--connections 64] [--unix /run/app.sock] [--json out.json] [--records]

Requests are launched on schedule whether or not earlier ones have finished (open loop), and
latency is measured from the *scheduled* send time, so a stalled server shows up as latency
instead of silently lowering the rate (no coordinated omission). Nothing is ever retried.

Two modes:
- new connection per request (default): connect, send with ``Connection: close``, read the
  response, close;
- ``--keepalive``: a LIFO pool of up to ``--connections`` persistent connections. A pooled
  connection the server has visibly closed already (EOF seen while idle) is dropped before use,
  as any HTTP client does; a request that fails on a connection the server closes while the
  request is in flight is counted as failed, and tallied as ``on_reused`` (the keep-alive close
  race), never resent.

Every request ends as one of: ok (2xx), refused, reset, premature_close (EOF before a full
response), timeout, non_2xx, other (a malformed response or an unexpected OS error; the first
messages are kept as samples). Latency percentiles are over 2xx responses, overall and per time
window of ``--window`` seconds (by scheduled time), so a reload window can be set against the
steady state; ``LoadResult.stats_between`` does the same for any interval.

Library use: ``result = await run_load(LoadConfig(url=..., rate=300, duration=20))``.
Stdlib only; uses uvloop when it is importable (``--loop asyncio`` to refuse it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import math
import signal
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

OUTCOMES = ("ok", "refused", "reset", "premature_close", "timeout", "non_2xx", "other")
FAILURES = OUTCOMES[1:]
OK, REFUSED, RESET, PREMATURE, TIMEOUT, NON_2XX, OTHER = range(len(OUTCOMES))

_MAX_LINE = 16 * 1024
_MAX_HEADERS = 100
_MAX_SAMPLES = 10


class ProtocolError(Exception):
    """The server's bytes are not an HTTP/1.x response we can read."""


class PrematureClose(Exception):
    """EOF before the response was complete."""


# ----------------------------------------------------------------------------------- wire


@dataclass(frozen=True)
class Response:
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    body_length: int
    keep_alive: bool  # whether the connection may carry another request


def build_request(path: str, host: str, *, keep_alive: bool, method: str = "GET") -> bytes:
    """The bytes of a body-less HTTP/1.1 request."""
    conn = "keep-alive" if keep_alive else "close"
    return (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: corral-loadgen\r\n"
            f"Accept: */*\r\nConnection: {conn}\r\n\r\n").encode("latin-1")


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        raise PrematureClose(f"EOF after {len(exc.partial)} bytes of a line") from None
    except asyncio.LimitOverrunError:
        raise ProtocolError("line too long") from None
    return line.rstrip(b"\r\n")


async def _read_exactly(reader: asyncio.StreamReader, n: int) -> None:
    try:
        await reader.readexactly(n)
    except asyncio.IncompleteReadError as exc:
        raise PrematureClose(f"EOF after {len(exc.partial)} of {n} body bytes") from None


async def read_response(reader: asyncio.StreamReader, method: str = "GET") -> Response:
    """Read one full response (1xx interim responses skipped).

    Raises:
        PrematureClose: EOF before the response was complete (including before its first byte).
        ProtocolError: a malformed status line, header or chunk.
    """
    while True:
        line = await _read_line(reader)
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ProtocolError(f"bad status line {line[:80]!r}")
        version, status = parts[0], int(parts[1])
        reason = parts[2].decode("latin-1") if len(parts) > 2 else ""
        headers: list[tuple[str, str]] = []
        while True:
            hline = await _read_line(reader)
            if not hline:
                break
            name, sep, value = hline.partition(b":")
            if not sep or not name or name != name.strip():
                raise ProtocolError(f"bad header line {hline[:80]!r}")
            headers.append((name.decode("latin-1").lower(), value.strip().decode("latin-1")))
            if len(headers) > _MAX_HEADERS:
                raise ProtocolError("too many headers")
        if 100 <= status < 200 and status != 101:
            continue  # e.g. 100 Continue: the real response follows
        break
    fields = dict(headers)  # a repeated header: the last wins (enough for these few fields)
    conn_tokens = {t.strip().lower() for t in fields.get("connection", "").split(",")}
    keep_alive = ("close" not in conn_tokens
                  and (version != b"HTTP/1.0" or "keep-alive" in conn_tokens))
    length = 0
    te = fields.get("transfer-encoding", "").lower()
    if method == "HEAD" or status in (101, 204, 304):
        pass
    elif "chunked" in te:
        length = await _read_chunked(reader)
    elif "content-length" in fields:
        cl = fields["content-length"]
        if not cl.isdigit():
            raise ProtocolError(f"bad Content-Length {cl!r}")
        length = int(cl)
        await _read_exactly(reader, length)
    else:
        # No framing: the body runs to EOF, and the connection cannot be reused.
        body = await reader.read()
        length, keep_alive = len(body), False
    return Response(status, reason, tuple(headers), length, keep_alive)


async def _read_chunked(reader: asyncio.StreamReader) -> int:
    total = 0
    while True:
        line = await _read_line(reader)
        size_text = line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise ProtocolError(f"bad chunk size {line[:40]!r}") from None
        if size < 0:
            raise ProtocolError(f"bad chunk size {line[:40]!r}")
        if size == 0:
            while await _read_line(reader):  # trailers, up to the blank line
                pass
            return total
        await _read_exactly(reader, size)
        total += size
        if await _read_line(reader):
            raise ProtocolError("chunk not followed by CRLF")


def classify(exc: BaseException) -> int:
    """The outcome code for an exception raised while making a request."""
    if isinstance(exc, TimeoutError):
        return TIMEOUT
    if isinstance(exc, PrematureClose | asyncio.IncompleteReadError):
        return PREMATURE
    if isinstance(exc, ConnectionRefusedError):
        return REFUSED
    if isinstance(exc, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return RESET
    # A unix socket path that is gone, or a unix listener whose backlog is full (EAGAIN):
    # the connection was not accepted.
    if isinstance(exc, FileNotFoundError) or (
            isinstance(exc, OSError) and exc.errno in (errno.ECONNREFUSED, errno.EAGAIN)):
        return REFUSED
    if isinstance(exc, OSError) and exc.errno == errno.ECONNRESET:
        return RESET
    return OTHER


# ----------------------------------------------------------------------------- statistics


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100), nearest-rank, of already sorted values; None if empty."""
    if not sorted_values:
        return None
    k = max(0, math.ceil(q / 100 * len(sorted_values)) - 1)
    return sorted_values[min(k, len(sorted_values) - 1)]


@dataclass
class Stats:
    """Counts and 2xx latency (seconds) of the requests scheduled in [start, end)."""

    start: float
    end: float
    sent: int
    ok: int
    failures: dict[str, int]
    on_reused: int  # failures on a reused keep-alive connection
    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def to_dict(self) -> dict[str, Any]:
        ms = {k: None if v is None else round(v * 1000, 3)
              for k, v in (("p50_ms", self.p50), ("p90_ms", self.p90), ("p99_ms", self.p99),
                           ("max_ms", self.max))}
        return {"start": round(self.start, 3), "end": round(self.end, 3), "sent": self.sent,
                "ok": self.ok, "failed": self.failed, "failures": dict(self.failures),
                "on_reused": self.on_reused, **ms}


@dataclass
class LoadResult:
    """Every request of a run, and summaries of them.

    Times in ``sched`` are seconds after ``t0`` (CLOCK_MONOTONIC, comparable across processes).
    """

    url: str
    rate: float
    duration: float
    keepalive: bool
    t0: float
    sched: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    outcome: list[int] = field(default_factory=list)
    reused: list[bool] = field(default_factory=list)
    elapsed: float = 0.0
    cpu_seconds: float = 0.0
    connections_opened: int = 0
    stale_dropped: int = 0  # pooled connections found closed by the server before use
    max_in_flight: int = 0
    lag_p99: float = 0.0  # how late requests were launched (the generator's own health)
    lag_max: float = 0.0
    error_samples: list[str] = field(default_factory=list)

    def stats_between(self, start: float = 0.0, end: float = math.inf) -> Stats:
        """Stats of the requests scheduled in [start, end), seconds after t0."""
        counts = [0] * len(OUTCOMES)
        on_reused = 0
        lat: list[float] = []
        for s, lt, o, r in zip(self.sched, self.latency, self.outcome, self.reused, strict=True):
            if start <= s < end:
                counts[o] += 1
                if o == OK:
                    lat.append(lt)
                elif r:
                    on_reused += 1
        lat.sort()
        return Stats(start, min(end, self.duration), sum(counts), counts[OK],
                     {name: counts[i] for i, name in enumerate(OUTCOMES) if i != OK},
                     on_reused, percentile(lat, 50), percentile(lat, 90), percentile(lat, 99),
                     lat[-1] if lat else None)

    def windows(self, width: float = 1.0) -> list[Stats]:
        n = max(1, math.ceil(self.duration / width - 1e-9))
        return [self.stats_between(i * width, (i + 1) * width) for i in range(n)]

    @property
    def cpu_percent(self) -> float:
        return 100.0 * self.cpu_seconds / self.elapsed if self.elapsed > 0 else 0.0

    def to_dict(self, window: float = 1.0, records: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "url": self.url, "rate": self.rate, "duration": self.duration,
            "keepalive": self.keepalive, "t0": self.t0, "elapsed": round(self.elapsed, 3),
            "cpu_seconds": round(self.cpu_seconds, 3), "cpu_percent": round(self.cpu_percent, 1),
            "connections_opened": self.connections_opened, "stale_dropped": self.stale_dropped,
            "max_in_flight": self.max_in_flight, "lag_p99_ms": round(self.lag_p99 * 1000, 3),
            "lag_max_ms": round(self.lag_max * 1000, 3), "error_samples": self.error_samples,
            "overall": self.stats_between().to_dict(), "window": window,
            "windows": [w.to_dict() for w in self.windows(window)],
        }
        if records:
            out["records"] = {"sched": [round(x, 6) for x in self.sched],
                              "latency": [round(x, 6) for x in self.latency],
                              "outcome": self.outcome, "reused": [int(x) for x in self.reused]}
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoadResult:
        """Rebuild a result written with ``records=True`` (summaries are recomputed)."""
        rec = d.get("records")
        if rec is None:
            raise ValueError("from_dict needs a result written with records=True")
        return cls(url=d["url"], rate=d["rate"], duration=d["duration"],
                   keepalive=d["keepalive"], t0=d["t0"], sched=rec["sched"],
                   latency=rec["latency"], outcome=rec["outcome"],
                   reused=[bool(x) for x in rec["reused"]], elapsed=d["elapsed"],
                   cpu_seconds=d["cpu_seconds"], connections_opened=d["connections_opened"],
                   stale_dropped=d["stale_dropped"], max_in_flight=d["max_in_flight"],
                   lag_p99=d["lag_p99_ms"] / 1000, lag_max=d["lag_max_ms"] / 1000,
                   error_samples=d["error_samples"])

    def line(self) -> str:
        """One line for a human."""
        st = self.stats_between()
        fails = " ".join(f"{k} {v}" for k, v in st.failures.items())
        reused = f", {st.on_reused} on reused conns" if self.keepalive else ""

        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v * 1000:.1f}"

        mode = "keep-alive" if self.keepalive else "new conn/request"
        return (f"{st.sent} requests at {self.rate:g}/s over {self.elapsed:.1f} s ({mode}): "
                f"ok {st.ok}, failed {st.failed} [{fails}{reused}]; latency ms p50 {ms(st.p50)} "
                f"p90 {ms(st.p90)} p99 {ms(st.p99)} max {ms(st.max)}; "
                f"{self.connections_opened} connections; loadgen CPU {self.cpu_percent:.0f}% "
                f"of a core, launch lag p99 {self.lag_p99 * 1000:.1f} ms")


# --------------------------------------------------------------------------------- client


@dataclass(frozen=True)
class LoadConfig:
    """What to run. ``unix`` (a socket path) overrides the URL's host and port for connecting.

    Raises:
        ValueError: a bad URL, rate, duration, timeout or connection count.
    """

    url: str
    rate: float
    duration: float
    keepalive: bool = False
    connections: int = 64  # keep-alive pool size; a request waits (late) when all are busy
    timeout: float = 5.0  # per request, from its launch
    unix: str | None = None
    method: str = "GET"

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"url: expected http://HOST[:PORT]/PATH, got {self.url!r}")
        for name in ("rate", "duration", "timeout"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not value > 0 or not math.isfinite(value):
                raise ValueError(f"{name}: expected a positive number, got {value!r}")
        if not isinstance(self.connections, int) or self.connections < 1:
            raise ValueError(f"connections: expected an int >= 1, got {self.connections!r}")


class _Conn:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    def usable(self) -> bool:
        return not (self.reader.at_eof() or self.writer.is_closing()
                    or self.reader.exception() is not None)

    def close(self) -> None:
        self.writer.close()


class _Client:
    def __init__(self, cfg: LoadConfig, result: LoadResult, t0: float) -> None:
        self.cfg, self.result, self.t0 = cfg, result, t0
        parts = urlsplit(cfg.url)
        self.host = parts.hostname or ""
        self.port = parts.port or 80
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        self.request = build_request(path, parts.netloc, keep_alive=cfg.keepalive,
                                     method=cfg.method)
        self.idle: list[_Conn] = []  # LIFO: the most recently used connection first
        self.open_count = 0
        self.waiters: deque[asyncio.Future[None]] = deque()  # requests waiting for a connection
        self.in_flight = 0
        self.tasks: set[asyncio.Task[None]] = set()

    async def _connect(self) -> _Conn:
        self.result.connections_opened += 1
        if self.cfg.unix is not None:
            reader, writer = await asyncio.open_unix_connection(self.cfg.unix, limit=_MAX_LINE)
        else:
            reader, writer = await asyncio.open_connection(self.host, self.port, limit=_MAX_LINE)
        return _Conn(reader, writer)

    async def _acquire(self) -> tuple[_Conn, bool]:
        """A connection for one request, and whether it carried one before."""
        if not self.cfg.keepalive:
            return await self._connect(), False
        loop = asyncio.get_running_loop()
        while True:
            while self.idle:
                conn = self.idle.pop()
                if conn.usable():
                    return conn, True
                self.result.stale_dropped += 1
                conn.close()
                self.open_count -= 1
            if self.open_count < self.cfg.connections:
                self.open_count += 1
                try:
                    return await self._connect(), False
                except BaseException:
                    self.open_count -= 1
                    self._wake_one()
                    raise
            waiter = loop.create_future()
            self.waiters.append(waiter)
            try:
                await waiter
            finally:
                with contextlib.suppress(ValueError):
                    self.waiters.remove(waiter)

    def _wake_one(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _release(self, conn: _Conn, reusable: bool) -> None:
        if self.cfg.keepalive and reusable and conn.usable():
            self.idle.append(conn)
        else:
            conn.close()
            if self.cfg.keepalive:
                self.open_count -= 1
        if self.cfg.keepalive:
            self._wake_one()

    async def one(self, sched: float) -> None:
        """One request, scheduled at ``sched`` (time.monotonic()); records its outcome."""
        res = self.result
        self.in_flight += 1
        res.max_in_flight = max(res.max_in_flight, self.in_flight)
        conn: _Conn | None = None
        reused = False
        reusable = False
        outcome = OTHER
        try:
            # Relative, on time.monotonic(): uvloop's loop.time() is cached per iteration
            # with millisecond resolution, too coarse for latencies.
            async with asyncio.timeout(max(0.0, sched + self.cfg.timeout - time.monotonic())):
                conn, reused = await self._acquire()
                conn.writer.write(self.request)
                await conn.writer.drain()
                resp = await read_response(conn.reader, self.cfg.method)
            outcome = OK if 200 <= resp.status < 300 else NON_2XX
            reusable = resp.keep_alive
        except Exception as exc:  # every failure is recorded, none escapes the task
            outcome = classify(exc)
            if outcome == OTHER and len(res.error_samples) < _MAX_SAMPLES:
                res.error_samples.append(f"{type(exc).__name__}: {exc}")
        finally:
            if conn is not None:
                self._release(conn, reusable)
            self.in_flight -= 1
            res.sched.append(sched - self.t0)
            res.latency.append(time.monotonic() - sched)
            res.outcome.append(outcome)
            res.reused.append(reused)

    def close_all(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


async def run_load(cfg: LoadConfig, stop: asyncio.Event | None = None) -> LoadResult:
    """Run ``cfg`` on the running loop and return every request's outcome.

    Launching stops after ``cfg.duration`` s or when ``stop`` is set; requests in flight then
    get until their own timeout to finish.
    """
    loop = asyncio.get_running_loop()
    result = LoadResult(cfg.url, cfg.rate, cfg.duration, cfg.keepalive, t0=0.0)
    interval = 1.0 / cfg.rate
    total = math.ceil(cfg.rate * cfg.duration - 1e-9)
    lags: list[float] = []
    cpu0, wall0 = time.process_time(), time.monotonic()
    t0 = result.t0 = time.monotonic()
    client = _Client(cfg, result, t0)
    stopped = stop if stop is not None else asyncio.Event()
    for i in range(total):
        sched = t0 + i * interval
        delay = sched - time.monotonic()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stopped.wait()
        if stopped.is_set():
            break
        lags.append(max(0.0, time.monotonic() - sched))
        task = loop.create_task(client.one(sched))
        client.tasks.add(task)
        task.add_done_callback(client.tasks.discard)
    launched_for = time.monotonic() - t0
    while client.tasks:
        await asyncio.wait(list(client.tasks))
    client.close_all()
    await asyncio.sleep(0)  # let the transports' close callbacks run
    result.elapsed = time.monotonic() - wall0
    result.cpu_seconds = time.process_time() - cpu0
    result.duration = min(cfg.duration, max(launched_for, interval))
    lags.sort()
    result.lag_p99 = percentile(lags, 99) or 0.0
    result.lag_max = lags[-1] if lags else 0.0
    # Records in scheduled order (tasks finish out of order).
    order = sorted(range(len(result.sched)), key=result.sched.__getitem__)
    for name in ("sched", "latency", "outcome", "reused"):
        values = getattr(result, name)
        setattr(result, name, [values[k] for k in order])
    return result


# ------------------------------------------------------------------------------------ CLI


def _loop_factory(name: str) -> Any:
    if name in ("auto", "uvloop"):
        try:
            import uvloop  # type: ignore[import-not-found, unused-ignore]
        except ImportError:
            if name == "uvloop":
                raise
            return None
        return uvloop.new_event_loop
    return None


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="http://HOST[:PORT]/PATH")
    ap.add_argument("--rate", type=float, required=True, help="requests per second")
    ap.add_argument("--duration", type=float, required=True,
                    help="seconds of launching (SIGINT/SIGTERM end it early)")
    ap.add_argument("--keepalive", action="store_true", help="reuse a pool of connections")
    ap.add_argument("--connections", type=int, default=64, help="keep-alive pool size")
    ap.add_argument("--timeout", type=float, default=5.0, help="per request, seconds")
    ap.add_argument("--unix", default=None, help="connect to this unix socket path instead")
    ap.add_argument("--window", type=float, default=1.0, help="window width for stats, s")
    ap.add_argument("--json", default=None, help="write the result here ('-' = stdout)")
    ap.add_argument("--records", action="store_true", help="include every request in the JSON")
    ap.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every window too")
    args = ap.parse_args(argv)
    try:
        cfg = LoadConfig(url=args.url, rate=args.rate, duration=args.duration,
                         keepalive=args.keepalive, connections=args.connections,
                         timeout=args.timeout, unix=args.unix)
    except ValueError as exc:
        ap.error(str(exc))

    async def go() -> LoadResult:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await run_load(cfg, stop)

    with asyncio.Runner(loop_factory=_loop_factory(args.loop)) as runner:
        result = runner.run(go())
    if args.json:
        text = json.dumps(result.to_dict(args.window, args.records))
        if args.json == "-":
            sys.stdout.write(text + "\n")
        else:
            with open(args.json, "w") as f:
                f.write(text)
    out = sys.stderr if args.json == "-" else sys.stdout
    print(result.line(), file=out)
    if args.verbose:
        for w in result.windows(args.window):
            d = w.to_dict()
            fails = {k: v for k, v in w.failures.items() if v}
            print(f"  [{w.start:7.2f}, {w.end:7.2f}) sent {w.sent:5} ok {w.ok:5} "
                  f"p50 {d['p50_ms']} p99 {d['p99_ms']} max {d['max_ms']} ms"
                  + (f" FAIL {fails}" if fails else ""), file=out)
    for sample in result.error_samples:
        print(f"  other: {sample}", file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
