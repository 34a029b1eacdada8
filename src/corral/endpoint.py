"""The HTTP endpoint of one or more pools: /metrics, /livez, /readyz, /status.

::

    kubelet / Prometheus --TCP--> listening socket --accept--+
                                  connections (non-blocking) +--> epoll (corral's Reactor, one
    close() --call_soon_threadsafe-------------------------->+    thread of its own)
                                                                   |
      request head complete (<= 8 KiB, within request_timeout) ----+
        -> a plain GET/HEAD is parsed here (_plain_request); anything else by
           http.server.BaseHTTPRequestHandler (the stdlib's parser, on the bytes read)
        -> the route reads each pool (observe: what its loop published, a round trip only
           when that is not current; ping for /livez; each bounded by ``timeout``); a
           /metrics of pools at rest reads only their ages and reuses the last body
           (metrics())
        -> the response is written without blocking; the connection is kept for the next
           request (HTTP/1.1 keep-alive, as Prometheus scrapes) or closed.

It runs on a thread of its own, never in a worker and never on a pool's loop: a wedged loop
cannot wedge the endpoint, and /livez can say so (503). The thread sleeps in epoll with no
timeout while nobody connects (no cost when unused). A request has ``request_timeout``
seconds in all from its first byte to send its head (slow clients are cut, whatever their
pace); a kept-alive connection may sit idle ``idle_timeout`` seconds between requests; at most
``max_connections`` are open at once (past that an idle one is closed, or the newcomer gets a
503 at once). Only GET and HEAD of the paths
below are served (405 for other methods, 404 for other paths, absolute URLs included: it is
never a proxy). Bound to a loopback address, it refuses requests whose Host header names
another host (DNS rebinding), with 403.

Paths:
    /metrics          Prometheus text, or OpenMetrics when the Accept header asks for it.
    /livez[/POOL]     200 if every pool's loop answers a ping within ``timeout``, else 503.
    /readyz[/POOL]    200 if every pool has at least ``min_ready`` workers RUNNING and ready
                      (default: all that are meant to run), else 503; one line per pool.
                      (``readiness=`` / ``liveness=`` answer the bare /readyz and /livez
                      for the program as a whole instead: ``corral serve --http``.)
    /status           ``corral.status/1`` JSON, as ``corral status --json`` prints it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import ipaddress
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any

from corral import _validate as v
from corral._observe import PoolSource, PoolView, Sources, parse_address, readiness
from corral._reactor import Reactor, Timer
from corral.process import disown_fd, own_fd

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

    from corral._exposition import Renderer
    from corral.metrics import CorralCollector

__all__ = ["Endpoint"]

log = logging.getLogger("corral.endpoint")

MAX_HEAD = 8192  # bytes of request line + headers
# (status, body, content type, extra headers)
_Answer = tuple[int, "str | bytes", str, tuple[tuple[str, str], ...]]
_ACCEPT_BATCH = 64
_HEADS_KEPT = 32  # parsed request heads kept (bounded: a client may vary its headers)
_LOOPBACK_NAMES = {"localhost", "localhost.", "ip6-localhost"}


class Endpoint:
    """An HTTP endpoint serving one or more pools (see the module docstring).

    ``Supervisor(..., http="127.0.0.1:9100")`` makes one for its pool. A program with several
    pools (the ``corral`` command) makes one and adds each pool::

        endpoint = Endpoint("127.0.0.1:9100", config=path).start()
        endpoint.add(web_supervisor)        # or any PoolSource (name, observe, ping)
        endpoint.add(process_pool)          # a ProcessPool's task metrics
        ...
        endpoint.close()

    Args:
        address: "HOST:PORT", "[IPv6]:PORT", or "PORT" (127.0.0.1). Port 0: any free port
            (see :attr:`address` once started).
        pools: pools to serve from the start (as :meth:`add` takes them).
        per_worker: export per-worker series too (see :mod:`corral.metrics`).
        timeout: seconds a pool's loop gets to answer a probe or a scrape.
        rss_interval: RSS of a worker is re-read at most this often, seconds.
        registry: a ``prometheus_client`` registry to serve at /metrics (your program's own
            metrics beside corral's: ``prometheus_client.REGISTRY``); corral's collector is
            registered in it, and unregistered on close. Default: a registry of its own.
        process_metrics: with the default registry, also export ``process_*`` metrics of this
            process (its CPU, memory, fds: prometheus_client's ProcessCollector, which costs
            about 0.15 ms a scrape, as much as all of corral's own).
        request_timeout: seconds a request gets, from its first byte, to send its head.
        idle_timeout: seconds a kept-alive connection may wait for its next request.
        max_connections: connections open at once.
        config, socket_path: what /status reports as the config file and control socket.
        status: ``status() -> dict``, the ``corral.status/1`` document /status serves (the
            ``corral`` command passes what its control socket answers to ``status``, so both
            are the same); default: built from the pools served. Called on the endpoint's
            thread: it must not block for long; a ``TimeoutError`` it raises is a 503.
        readiness: ``readiness() -> (ready, one-line reason)``, the answer of a bare /readyz
            (the program as a whole: ``corral serve`` is ready on its own terms, not when each
            generation's pool is); /readyz/POOL still asks one pool. Called on the endpoint's
            thread: it must return at once.
        liveness: ``liveness(timeout) -> (alive, one-line reason)``, the answer of a bare
            /livez; bounded by ``timeout`` seconds. /livez/POOL still pings one pool.

    Raises:
        TypeError, ValueError: a bad argument (the message names it).
    """

    def __init__(self, address: str = "127.0.0.1:9100", *, pools: Iterable[Any] = (),
                 per_worker: bool = False, timeout: float = 1.0, rss_interval: float = 10.0,
                 registry: CollectorRegistry | None = None, request_timeout: float = 5.0,
                 idle_timeout: float = 120.0, max_connections: int = 64,
                 process_metrics: bool = False, config: str | None = None,
                 socket_path: str | None = None,
                 status: Callable[[], dict[str, Any]] | None = None,
                 readiness: Callable[[], tuple[bool, str]] | None = None,
                 liveness: Callable[[float], tuple[bool, str]] | None = None) -> None:
        self._host, self._port = parse_address(address, "address")
        self.timeout = v.number("timeout", timeout, strict=True)
        self.request_timeout = v.number("request_timeout", request_timeout, strict=True)
        self.idle_timeout = v.number("idle_timeout", idle_timeout, strict=True)
        v.integer("max_connections", max_connections, minimum=1)
        v.boolean("per_worker", per_worker)
        self._process_metrics = v.boolean("process_metrics", process_metrics)
        v.number("rss_interval", rss_interval)
        self.max_connections = max_connections
        self.config, self.socket_path = config, socket_path
        self._status: Callable[[], dict[str, Any]] | None = v.callable_("status", status,
                                                                        optional=True)
        self._readiness: Callable[[], tuple[bool, str]] | None = v.callable_(
            "readiness", readiness, optional=True)
        self._liveness: Callable[[float], tuple[bool, str]] | None = v.callable_(
            "liveness", liveness, optional=True)
        self.sources = Sources()
        for p in pools:
            self.sources.add(p)
        self._per_worker = per_worker
        self._rss_interval = rss_interval
        self._given_registry = registry
        self._registry: CollectorRegistry | None = None
        self._collector: CorralCollector | None = None
        self._renderer: Renderer | None = None
        self._quick = False
        # request head -> what _plain_request() made of it (a few distinct heads in practice)
        self._heads: dict[bytes, tuple[str, str, dict[str, str], bool]] = {}
        # Host header value -> host_allowed()
        self._hosts: dict[str | None, bool] = {}
        self._listen: socket.socket | None = None
        self._reactor: Reactor[Any] | None = None
        self._thread: threading.Thread | None = None
        self._conns: dict[int, _Conn] = {}
        self._closing = False
        self._lock = threading.Lock()
        self._bound: tuple[str, int] | None = None
        self._loopback = False
        self.started_at = time.time()

    # ---------------------------------------------------------------------- any thread

    def add(self, pool: Any) -> None:
        """Serve ``pool`` too: a Supervisor, a PoolSource, a ProcessPool's task stats.

        Raises:
            TypeError: not something the endpoint can serve.
            ValueError: a pool of that name is served already.
        """
        self.sources.add(pool)

    def remove(self, name: str) -> None:
        """Stop serving the pool called ``name``.

        Raises:
            KeyError: no pool of that name is served.
        """
        self.sources.remove(name)

    def start(self) -> Endpoint:
        """Bind, listen and start serving on a thread of its own; returns ``self``.

        Raises:
            OSError: the address cannot be bound (in use, not ours...); nothing is left open.
            RuntimeError: already started.
        """
        with self._lock:
            if self._thread is not None or self._closing:
                raise RuntimeError("this Endpoint was already started; make a new one")
            from prometheus_client.registry import CollectorRegistry

            from corral._exposition import Renderer
            from corral.metrics import CorralCollector

            self._renderer = Renderer()
            self._collector = CorralCollector(self.sources, per_worker=self._per_worker,
                                              timeout=self.timeout,
                                              rss_interval=self._rss_interval)
            # The quick scrape (see metrics()) needs a registry of corral's collector alone.
            self._quick = self._given_registry is None and not self._process_metrics
            if self._given_registry is None:
                self._registry = CollectorRegistry(auto_describe=False)
                if self._process_metrics:
                    from prometheus_client import ProcessCollector

                    ProcessCollector(registry=self._registry)
            else:
                self._registry = self._given_registry
            self._registry.register(self._collector)
            try:
                self._listen = _bind(self._host, self._port)
                reactor: Reactor[Any] = Reactor(f"endpoint {self._host}:{self._port}")
            except BaseException:
                self._release_registry()
                if self._listen is not None:
                    self._close_listen()
                raise
            self._reactor = reactor
            bound = self._listen.getsockname()
            self._bound = (bound[0], bound[1])
            self._loopback = _is_loopback(self._bound[0])
            reactor.add_reader(self._listen.fileno(), self._accept)
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name=f"corral-http[{self.url}]")
            self._thread.start()
        log.info("serving /metrics /livez /readyz /status at %s", self.url)
        return self

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) bound, once started (port 0 is resolved)."""
        if self._bound is None:
            return self._host, self._port
        return self._bound

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def close(self, wait: bool = True) -> None:
        """Stop serving: close the socket and every connection. Idempotent.

        Args:
            wait: return only once the endpoint's thread has ended.
        """
        with self._lock:
            if self._closing:
                thread = self._thread
            else:
                self._closing = True
                thread = self._thread
                if self._reactor is not None:
                    with contextlib.suppress(RuntimeError):
                        self._reactor.call_soon_threadsafe(lambda: None)  # wake it
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join()

    def __enter__(self) -> Endpoint:
        return self if self._thread is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closing else "serving" if self._thread else "new"
        return f"<corral.Endpoint {self.url} {state}, {len(self.sources.pools())} pool(s)>"

    # ------------------------------------------------------------------ the endpoint thread

    def _run(self) -> None:
        reactor = self._reactor
        assert reactor is not None
        try:
            while not self._closing:
                reactor.run_once()
        except BaseException:
            log.critical("the HTTP endpoint %s failed; it no longer serves", self.url,
                         exc_info=True)
            raise
        finally:
            for conn in list(self._conns.values()):
                self._drop(conn)
            reactor.close()
            self._close_listen()
            self._release_registry()

    def _close_listen(self) -> None:
        listen = self._listen
        if listen is not None:
            disown_fd(listen.fileno())
            listen.close()

    def _release_registry(self) -> None:
        if self._registry is not None and self._collector is not None:
            with contextlib.suppress(KeyError):
                self._registry.unregister(self._collector)

    def _accept(self) -> None:
        assert self._listen is not None and self._reactor is not None
        reactor = self._reactor
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, peer = self._listen.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of fds: stop accepting for a moment instead of spinning on a
                    # readable socket.
                    log.warning("HTTP endpoint %s: cannot accept (%s); pausing 0.1s",
                                self.url, exc)
                    fd = self._listen.fileno()
                    reactor.remove_reader(fd)
                    reactor.call_later(0.1, reactor.add_reader, fd, self._accept)
                return
            if len(self._conns) >= self.max_connections and not self._evict_idle():
                with contextlib.suppress(OSError):
                    sock.setblocking(False)
                    sock.send(_BUSY)
                    sock.recv(65536)  # what came already: a close with unread input resets
                sock.close()
                continue
            sock.setblocking(False)
            own_fd(sock.fileno())
            conn = _Conn(sock, peer)
            conn.since = reactor.clock()
            self._conns[conn.fd] = conn
            self._wait_request(conn, self.request_timeout)

    def _evict_idle(self) -> bool:
        """Close the longest-idle kept-alive connection to make room; False if none is idle."""
        for conn in self._conns.values():  # oldest first
            if conn.idle:
                self._drop(conn)
                return True
        return False

    def _wait_request(self, conn: _Conn, timeout: float) -> None:
        reactor = self._reactor
        assert reactor is not None
        self._arm(conn, reactor.clock() + timeout)
        if not conn.reading:  # registered once: no epoll_ctl per request
            conn.reading = True
            reactor.add_reader(conn.fd, functools.partial(self._on_read, conn))

    def _arm(self, conn: _Conn, deadline: float) -> None:
        """Expire ``conn`` at ``deadline``. One timer a connection, moved only to fire
        earlier: a later deadline (the next idle wait) is only noted, and the timer, when it
        fires, re-arms itself for it. A scrape every second so touches no heap."""
        assert self._reactor is not None
        conn.deadline = deadline
        timer = conn.timer
        if timer is None or timer.when > deadline:
            if timer is not None:
                timer.cancel()
            conn.timer = self._reactor.call_at(deadline, self._expire, conn)

    def _on_read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if not data:
            self._drop(conn)
            return
        if (conn.idle and not conn.buf and data.endswith(b"\r\n\r\n")
                and data.find(b"\r\n\r\n") == len(data) - 4 and len(data) <= MAX_HEAD):
            # One whole request head on an idle connection (a scraper's next request): no
            # buffering, and its timer stays as it is (see _arm).
            conn.idle = False
            assert self._reactor is not None
            conn.since = self._reactor.clock()
            self._respond(conn, *self._handle(data, conn.peer))
            return
        conn.buf += data
        if conn.idle:
            # The first byte of the next request: from now on it has request_timeout (its
            # timer is moved only if the head is not all here: the common case costs none).
            conn.idle = False
            assert self._reactor is not None
            conn.since = self._reactor.clock()
            if _head_end(conn.buf) < 0:
                self._arm(conn, conn.since + self.request_timeout)
        if conn.out is not None:  # still writing the last response: the next one waits
            if len(conn.buf) > 2 * MAX_HEAD:
                self._drop(conn)
            return
        self._next_request(conn)

    def _next_request(self, conn: _Conn) -> None:
        if conn.fd not in self._conns or conn.out is not None:
            return  # gone, or still writing (it comes back here when done)
        end = _head_end(conn.buf)
        if end < 0 and len(conn.buf) <= MAX_HEAD:
            return  # more to come
        if end < 0 or end > MAX_HEAD:
            self._respond(conn, _error_response(
                HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                f"the request head is longer than {MAX_HEAD} bytes"), keep=False)
            return
        head = bytes(conn.buf[:end])
        del conn.buf[:end]
        self._respond(conn, *self._handle(head, conn.peer))

    def _respond(self, conn: _Conn, response: bytes, keep: bool) -> None:
        conn.out = memoryview(response)
        conn.keep = keep and not self._closing
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        assert self._reactor is not None
        out = conn.out
        while out:
            try:
                n = conn.sock.send(out)
            except (BlockingIOError, InterruptedError):
                # The client reads slowly: the request's time runs (from its first byte).
                self._arm(conn, conn.since + self.request_timeout)
                self._reactor.add_writer(conn.fd, functools.partial(self._flush, conn))
                conn.out = out
                return
            except OSError:
                self._drop(conn)
                return
            out = out[n:]
        if not conn.keep:
            # Read what the client sent that we will not use (an oversized head, a body):
            # closing with unread input would reset the connection, and the client might
            # lose the response before reading it.
            with contextlib.suppress(OSError):
                for _ in range(16):
                    if not conn.sock.recv(65536):
                        break
            self._drop(conn)
            return
        self._reactor.remove_writer(conn.fd)
        conn.out = None
        if conn.buf:  # pipelined: the next request is here already (next in this round,
            # not by recursion: a client may send hundreds at once)
            conn.since = self._reactor.clock()
            self._wait_request(conn, self.request_timeout)
            self._reactor.call_soon(self._next_request, conn)
        else:
            conn.idle = True
            self._wait_request(conn, self.idle_timeout)

    def _expire(self, conn: _Conn) -> None:
        if conn.fd not in self._conns:
            return
        assert self._reactor is not None
        conn.timer = None
        if self._reactor.clock() < conn.deadline:  # the deadline moved on meanwhile
            self._arm(conn, conn.deadline)
            return
        if conn.out is None and not conn.idle:  # in the middle of its request
            with contextlib.suppress(OSError):
                conn.sock.send(_error_response(
                    HTTPStatus.REQUEST_TIMEOUT,
                    f"no complete request within {self.request_timeout:g}s"))
        self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        if self._conns.pop(conn.fd, None) is None:
            return
        reactor = self._reactor
        if reactor is not None and not reactor.closed:
            reactor.remove_reader(conn.fd)
            reactor.remove_writer(conn.fd)
        if conn.timer is not None:
            conn.timer.cancel()
        disown_fd(conn.fd)
        conn.sock.close()

    # ------------------------------------------------------------------------------- routes

    def _handle(self, head: bytes, peer: Any) -> tuple[bytes, bool]:
        """The response to one request head, and whether the connection may be kept."""
        # A scraper sends the very same head every time: parsed once.
        request = self._heads.get(head)
        if request is None:
            request = _plain_request(head)
            if request is not None:
                if len(self._heads) >= _HEADS_KEPT:
                    self._heads.clear()
                self._heads[head] = request
        if request is not None:
            try:
                return self._answer(*request, peer)
            except Exception:
                log.exception("HTTP endpoint %s: the request %r failed", self.url, head[:200])
                return (_error_response(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error"),
                        False)
        handler = _Handler.__new__(_Handler)  # the stdlib's parser on bytes, no socket
        handler.endpoint = self
        handler.client_address = peer
        handler.rfile = io.BytesIO(head)
        handler.wfile = io.BytesIO()
        handler.close_connection = True
        try:
            handler.handle_one_request()
        except Exception:
            log.exception("HTTP endpoint %s: the request %r failed", self.url, head[:200])
            return _error_response(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error"), False
        return handler.wfile.getvalue(), not handler.close_connection

    def _answer(self, method: str, target: str, headers: dict[str, str], keep: bool,
                peer: Any) -> tuple[bytes, bool]:
        """The lean path's response (a plain GET or HEAD: see :func:`_plain_request`)."""
        host = headers.get("host")
        answer: _Answer = (_forbidden(host) if not self.host_allowed(host)
                           else self.route(target, headers.get("accept")))
        code, body, ctype, extra = answer
        log.debug("HTTP %s: \"%s %s HTTP/1.1\" %d -", peer, method, target, code)
        return _response(code, body, ctype, extra, keep, method == "HEAD"), keep

    def route(self, target: str, accept: str | None) -> _Answer:
        """(status, body, content type, extra headers) for a GET of ``target``."""
        if not target.startswith("/"):
            return 404, "not found (this endpoint is not a proxy)\n", _TEXT, ()
        path = target.split("?", 1)[0]
        if path == "/metrics":
            body, ctype = self.metrics(accept)
            return 200, body, ctype, ()
        if path == "/status":
            try:
                doc = self.status()
            except TimeoutError as exc:  # the loop behind it did not answer in time
                return 503, f"{exc}\n", _TEXT, ()
            return (200, json.dumps(doc, separators=(",", ":")) + "\n", "application/json",
                    ())
        if path in ("/livez", "/readyz") or path.startswith(("/livez/", "/readyz/")):
            kind, _, name = path[1:].partition("/")
            if "/" in name:
                return 404, "not found\n", _TEXT, ()
            code, text = (self.livez if kind == "livez" else self.readyz)(name or None)
            return code, text, _TEXT, ()
        return 404, "not found; the paths are /metrics /livez /readyz /status\n", _TEXT, ()

    def host_allowed(self, host: str | None) -> bool:
        """Bound to loopback, only loopback Host headers are served (DNS rebinding)."""
        known = self._hosts.get(host)
        if known is None:
            if len(self._hosts) >= _HEADS_KEPT:
                self._hosts.clear()
            known = self._hosts[host] = self._host_allowed(host)
        return known

    def _host_allowed(self, host: str | None) -> bool:
        if not self._loopback or host is None:
            return True
        name = host.strip().lower()
        if name.startswith("["):
            name = name[1:name.find("]")] if "]" in name else name
        else:
            name = name.rpartition(":")[0] if name.count(":") == 1 else name
        return (name in _LOOPBACK_NAMES or name.startswith("127.")  # the common cases, fast
                or _is_loopback(name))

    def metrics(self, accept: str | None) -> tuple[bytes, str]:
        """The /metrics body for this Accept header, and its content type."""
        renderer, collector = self._renderer, self._collector
        assert self._registry is not None and renderer is not None and collector is not None
        accept = accept or ""
        if self._quick:
            # A pool at rest: last scrape's body with the ages written anew (the registry is
            # ours and holds corral's collector alone, so that body is all there is).
            quick = collector.quick()
            if quick is not None:
                out = renderer.quick(accept, *quick)
                if out is not None:
                    return out
        body, content_type = renderer.render(self._registry, accept)
        if self._quick:
            renderer.stamp(content_type, collector.memo_stamp)
        return body, content_type

    def livez(self, name: str | None) -> tuple[int, str]:
        if name is None and self._liveness is not None:
            return _verdict("livez", *self._liveness(self.timeout))
        pools = self._selected(name)
        if pools is None:
            return 404, f"no pool named {name!r}\n"
        lines, ok = [], True
        for src in pools:
            alive = src.ping(self.timeout)
            ok = ok and alive
            lines.append(f"[+] pool {src.name!r}: its loop answers" if alive else
                         f"[-] pool {src.name!r}: its loop did not answer within "
                         f"{self.timeout:g}s (wedged or stopped)")
        lines.append("livez check passed" if ok else "livez check failed")
        return (200 if ok else 503), "\n".join(lines) + "\n"

    def readyz(self, name: str | None) -> tuple[int, str]:
        if name is None and self._readiness is not None:
            return _verdict("readyz", *self._readiness())
        pools = self._selected(name)
        if pools is None:
            return 404, f"no pool named {name!r}\n"
        if not pools:
            return 503, "no pool is served\nreadyz check failed\n"
        lines, ok = [], True
        for src in pools:
            good, why = readiness(src.observe(self.timeout))
            if not good:
                # Name the workers that are not ready (a second, detailed look: only when
                # something is wrong, so a passing probe stays cheap).
                good, why = readiness(src.observe(self.timeout, True))
            ok = ok and good
            lines.append(("[+] " if good else "[-] ") + why)
        lines.append("readyz check passed" if ok else "readyz check failed")
        return (200 if ok else 503), "\n".join(lines) + "\n"

    def status(self) -> dict[str, Any]:
        if self._status is not None:
            return self._status()
        from corral import __version__
        from corral._json import program_to_json, status_payload, worker_to_json

        programs = []
        for src in self.sources.pools():
            view: PoolView = src.observe(self.timeout, True)
            workers = [worker_to_json(w) for w in view.workers or ()]
            prog = program_to_json(view.name, view.kind, workers, gave_up=view.state == "gave up")
            if view.summary is None:
                prog["error"] = f"its loop did not answer within {self.timeout:g}s"
            programs.append(prog)
        return status_payload(programs, pid=os.getpid(), version=__version__,
                              uptime=time.time() - self.started_at, config=self.config,
                              socket=self.socket_path)

    def _selected(self, name: str | None) -> list[PoolSource] | None:
        if name is None:
            return self.sources.pools()
        src = self.sources.pool(name)
        return None if src is None else [src]


class _Conn:
    __slots__ = ("buf", "deadline", "fd", "idle", "keep", "out", "peer", "reading", "since",
                 "sock", "timer")

    def __init__(self, sock: socket.socket, peer: Any) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.buf = bytearray()
        self.out: memoryview | None = None  # a response being written
        self.keep = False  # keep the connection once the response is written
        self.idle = False  # kept alive, waiting for the next request
        self.reading = False  # its reader is registered
        self.timer: Timer | None = None
        self.deadline = 0.0  # when it expires (its timer fires at or before it)
        self.since = 0.0  # the first byte of the request being read or answered


class _Handler(BaseHTTPRequestHandler):
    """The stdlib's request parsing and response writing, on bytes already read."""

    endpoint: Endpoint
    protocol_version = "HTTP/1.1"  # keep-alive unless the client says otherwise
    default_request_version = "HTTP/1.0"  # errors get a status line, even for junk
    server_version = "corral"
    sys_version = ""
    error_message_format = "%(code)d %(message)s: %(explain)s\n"
    error_content_type = "text/plain; charset=utf-8"

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if self.headers.get("Transfer-Encoding") or self.headers.get("Content-Length",
                                                                      "0") != "0":
            # A body is never read: the connection cannot be reused after it.
            self.close_connection = True
        if self.command not in ("GET", "HEAD"):
            self._send(405, f"{self.command} is not allowed here; use GET or HEAD\n",
                       extra=(("Allow", "GET, HEAD"),))
            return False
        if not self.endpoint.host_allowed(self.headers.get("Host")):
            self._send(*_forbidden(self.headers.get("Host")))
            return False
        return True

    def do_GET(self) -> None:
        self._send(*self.endpoint.route(self.path, self.headers.get("Accept")))

    do_HEAD = do_GET

    def _send(self, code: int, body: str | bytes, ctype: str = "text/plain; charset=utf-8",
              extra: tuple[tuple[str, str], ...] = ()) -> None:
        self.log_request(code)
        self.wfile.write(_response(code, body, ctype, extra, not self.close_connection,
                                   self.command == "HEAD"))

    def version_string(self) -> str:
        return self.server_version  # "corral", not "corral " (no Python version: less to probe)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("HTTP %s: " + format, self.client_address, *args)


def _verdict(kind: str, ok: bool, why: str) -> tuple[int, str]:
    """A probe's answer from a whole program's verdict: the pools' format, one line."""
    return (200 if ok else 503), (f"[{'+' if ok else '-'}] {why}\n{kind} check "
                                  f"{'passed' if ok else 'failed'}\n")


def _head_end(buf: bytearray) -> int:
    """The length of the request head in ``buf`` (through its blank line), or -1."""
    i = buf.find(b"\r\n\r\n")
    if i >= 0:
        return i + 4
    i = buf.find(b"\n\n")
    return i + 2 if i >= 0 else -1


_TEXT = "text/plain; charset=utf-8"
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_VISIBLE = bytes(range(0x21, 0x7F))  # what a request target may hold
_FIELD = _VISIBLE + b" \t"  # what a header value may hold
_SPECIAL = frozenset(("expect", "content-length", "transfer-encoding"))


def _plain_request(head: bytes) -> tuple[str, str, dict[str, str], bool] | None:
    """``(method, target, headers, keep-alive)`` of a plain request, or None for anything else.

    Plain: ``GET`` or ``HEAD``, ``HTTP/1.1``, CRLF line ends, ASCII, at most 100 header
    lines of ``token: value`` (no folding), no body, no ``Expect``, each of Host, Accept and
    Connection at most once. That is every request Prometheus, the kubelet and curl send; the
    rest (errors included) goes through the stdlib's parser, as before. Header names are
    lower-cased in ``headers``.
    """
    if not head.isascii() or not head.endswith(b"\r\n\r\n"):
        return None
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if (len(parts) != 3 or parts[2] != b"HTTP/1.1" or parts[0] not in (b"GET", b"HEAD")
            or len(lines) > 101):
        return None
    target = parts[1]
    if not target or target.translate(None, _VISIBLE):
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or not _TOKEN.issuperset(name) or value.translate(None,
                                                                                   _FIELD):
            return None
        key = name.decode().lower()
        if key in headers or key in _SPECIAL:
            return None  # repeated, or a body / Expect: the stdlib decides
        headers[key] = value.strip(b" \t").decode()
    conn = headers.get("connection", "").lower()
    return parts[0].decode(), target.decode(), headers, conn != "close"


def _response(code: int, body: str | bytes, ctype: str, extra: tuple[tuple[str, str], ...],
              keep: bool, head_only: bool) -> bytes:
    """A complete response: status line, headers, and the body unless ``head_only``."""
    data = body.encode() if isinstance(body, str) else body
    # The status line and the headers around Date and Content-Length, made once per kind of
    # response (a scrape every second builds one line of them).
    key = (code, ctype, extra, keep)
    parts = _heads.get(key)
    if parts is None:
        if len(_heads) >= 64:
            _heads.clear()
        tail = [f"\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
                f"Connection: {'keep-alive' if keep else 'close'}\r\n"]
        tail.extend(f"{name}: {value}\r\n" for name, value in extra)
        tail.append("\r\n")
        parts = _heads[key] = (
            f"HTTP/1.1 {code} {HTTPStatus(code).phrase}\r\nServer: corral\r\nDate: ",
            f"\r\nContent-Type: {ctype}\r\nContent-Length: ", "".join(tail))
    out = (parts[0] + _http_date() + parts[1] + str(len(data)) + parts[2]).encode("latin-1")
    return out if head_only else out + data


# (code, content type, extra headers, keep) -> the response head's fixed parts
_heads: dict[tuple[int, str, tuple[tuple[str, str], ...], bool], tuple[str, str, str]] = {}


_date_cache: tuple[int, str] = (0, "")


def _http_date() -> str:
    """The Date header's value (formatted once a second)."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        # What email.utils.formatdate(now, usegmt=True) writes, at a fraction of its cost (a
        # scrape every second formats a new one every time).
        t = time.gmtime(now)
        _date_cache = (now, f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} "
                            f"{t.tm_year:04d} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT")
    return _date_cache[1]


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _forbidden(host: str | None) -> _Answer:
    return (403, "this endpoint serves requests for localhost only (Host header "
                 f"{host!r})\n", _TEXT, ())


def _error_response(code: HTTPStatus, text: str) -> bytes:
    body = f"{code.value} {code.phrase}: {text}\n".encode()
    return (f"HTTP/1.0 {code.value} {code.phrase}\r\nContent-Type: text/plain; charset=utf-8"
            f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


_BUSY = _error_response(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(f"cannot serve HTTP on {host}:{port}: unknown host ({exc})") from exc
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            hint = (" (another process listens there: pick another port, or port 0 for any "
                    "free one)" if exc.errno == errno.EADDRINUSE else "")
            raise OSError(exc.errno, f"cannot serve HTTP on {host}:{port}: "
                                     f"{exc.strerror}{hint}") from exc
        sock.listen(64)
        sock.setblocking(False)
        own_fd(sock.fileno())
    except BaseException:
        sock.close()
        raise
    return sock
