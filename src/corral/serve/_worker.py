"""What runs in a server worker: the app on uvicorn, on sockets corral bound, with readiness
from inside and a drain that loses no request.

- The app is imported once (:func:`preload`): in the zygote before it forks, or in a
  spawn/forkserver worker itself. ASGI runs on uvicorn directly; WSGI through
  ``a2wsgi.WSGIMiddleware`` on the same uvicorn (one server code path: the same socket
  hand-over, readiness hook, drain and HTTP parser; uvicorn's own WSGI middleware is
  deprecated in favour of a2wsgi).
- :class:`CorralServer` is a ``uvicorn.Server``: after uvicorn's start-up (the app's lifespan
  start-up, then ``create_server`` on each listening socket) it calls ``corral.ready()``, so the
  supervisor sees readiness exactly when the worker accepts.
- SIGTERM (the pool's stop signal) starts a drain: stop accepting at once (the worker closes its
  copy of each listener; the shared accept queue stays with the other workers), answer every
  request still in flight or still arriving on a kept-alive connection with ``Connection:
  close``, close idle connections only after they stayed idle for ``idle_grace`` (a request may
  already be on the wire), until none is left or ``graceful_timeout``; then the lifespan
  shutdown, and exit 0.
- ``max_requests`` (with jitter): the worker does not exit by itself; it asks the supervisor to
  recycle it (a status text plus a wake-up), which starts its replacement first.

uvicorn's loop internals used here (``server.servers``, ``server_state.connections``,
``protocol.cycle``, ``cycle.keep_alive``/``response_complete``, ``transport``) are attributes,
not public API: uvicorn is pinned and ``tests/integration/test_serve.py`` tests the drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import logging
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from corral import heartbeat
from corral._bootstrap import OwnWait

__all__ = ["RECYCLE_STATUS", "WorkerInit", "detect_interface", "load_app", "own_listeners",
           "preload", "serve_preloaded", "serve_spawned"]

log = logging.getLogger("corral.serve.worker")

# The status text a worker publishes to be recycled through the surge path.
RECYCLE_STATUS = "corral:recycle"
_TICK = 0.1


@dataclass(frozen=True)
class WorkerInit:
    """What a worker (or a zygote) needs to load and serve the app (picklable).

    Attributes:
        app: "module:attribute" (attribute may be dotted; "module:factory()" calls it).
        interface: "auto", "asgi" or "wsgi".
        app_dir: put first on sys.path before the import ("" for none).
        graceful_timeout: seconds a drain may take before in-flight work is cancelled.
        idle_grace: during a drain, an idle kept-alive connection is closed once it has been
            idle this long (seconds).
        max_requests, max_requests_jitter: recycle after this many requests (0: never).
        wsgi_threads: a2wsgi's thread pool per worker.
        uvicorn: more keyword arguments for ``uvicorn.Config`` (log_level, http, loop...).
        check_threads: a zygote refuses to fork when importing the app started Python threads.
        reuse_port: each worker also listens on a socket of its own (SO_REUSEPORT, the same
            address as each shared TCP listener): see :func:`own_listeners`.
        backlog: the listen backlog of those own sockets.
    """

    app: str
    interface: str = "auto"
    app_dir: str = ""
    graceful_timeout: float = 30.0
    idle_grace: float = 0.5
    max_requests: int = 0
    max_requests_jitter: int = 0
    wsgi_threads: int = 10
    uvicorn: dict[str, Any] = field(default_factory=dict)
    check_threads: bool = True
    reuse_port: bool = False
    backlog: int = 2048


def _import(ref: str) -> Any:
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f'app must be "module:attribute", got {ref!r}')
    call = attr.endswith("()")
    if call:
        attr = attr[:-2]
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AttributeError(f"module {module_name!r} has no attribute {attr!r} "
                                 f"(app {ref!r})") from None
    return obj() if call else obj


def detect_interface(app: Any) -> str:
    """"asgi" or "wsgi" for an app object.

    ASGI 3: a coroutine function (or an object whose ``__call__`` is one) of (scope, receive,
    send). WSGI: a plain callable of (environ, start_response). Anything else is refused.

    Raises:
        TypeError: not callable, or neither shape.
    """
    if not callable(app):
        raise TypeError(f"the app must be an ASGI or WSGI callable, got {app!r}")
    fn = app if inspect.isfunction(app) or inspect.ismethod(app) else type(app).__call__
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(app):
        return "asgi"
    if inspect.isclass(app):
        return "asgi"  # an ASGI 2 class (instantiated with the scope) or ASGI 3 class
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    if len(params) == 2:
        return "wsgi"
    if len(params) == 3:
        return "asgi"
    raise TypeError(f"cannot tell whether {app!r} is ASGI (async (scope, receive, send)) or "
                    "WSGI ((environ, start_response)); pass --interface asgi|wsgi")


def load_app(init: WorkerInit) -> tuple[Any, str]:
    """Import the app; returns (the ASGI app to serve, "asgi" or "wsgi")."""
    if init.app_dir and init.app_dir not in sys.path:
        sys.path.insert(0, init.app_dir)
    app = _import(init.app)
    interface = init.interface if init.interface != "auto" else detect_interface(app)
    if interface == "wsgi":
        from a2wsgi import WSGIMiddleware

        return WSGIMiddleware(app, workers=init.wsgi_threads), "wsgi"
    return app, "asgi"


@dataclass
class Preloaded:
    init: WorkerInit
    config: Any  # uvicorn.Config, loaded
    interface: str
    import_seconds: float


_preloaded: Preloaded | None = None


def preload(init: WorkerInit) -> Preloaded:
    """Import uvicorn and the app and load uvicorn's config once (in a zygote, before forking;
    the forked workers share it copy-on-write)."""
    global _preloaded
    began = time.perf_counter()
    import uvicorn

    app, interface = load_app(init)
    options = {"log_level": "warning", "lifespan": "auto", **init.uvicorn}
    config = uvicorn.Config(app, interface="asgi3", timeout_graceful_shutdown=None,
                            limit_max_requests=None, **options)
    config.load()
    config.get_loop_factory()  # import the event loop module (uvloop) now, not per worker
    _server_class()
    _preloaded = Preloaded(init, config, interface, time.perf_counter() - began)
    return _preloaded


_server_cls: type[Any] | None = None


def _server_class() -> type[Any]:
    """:class:`CorralServer`, made once per process (a zygote makes it before it forks:
    making a class costs a fork child ~0.15 ms)."""
    global _server_cls
    if _server_cls is None:
        _server_cls = _make_server_class()
    return _server_cls


def _make_server_class() -> type[Any]:
    import uvicorn

    class CorralServer(uvicorn.Server):
        """uvicorn's server with readiness from inside and a drain that drops nothing."""

        def __init__(self, config: Any, init: WorkerInit) -> None:
            super().__init__(config)
            self.init = init
            self._wake: asyncio.Event | None = None
            self._limit = 0
            if init.max_requests > 0:
                self._limit = init.max_requests + random.randint(0, init.max_requests_jitter)
            self._recycle_asked = False
            self._warm_lifespan: Any = None
            self._prepared: list[Any] = []  # a standby's servers, created, not serving
            self._standby_got: asyncio.Future[bool] | None = None

        async def prestart(self) -> None:
            """A hot standby's warm-up: the app's lifespan start-up, ahead of the handover
            (which then only creates the servers on the listeners)."""
            lifespan = self.config.lifespan_class(self.config)
            await lifespan.startup()
            if lifespan.should_exit:
                raise SystemExit(3)

            async def started() -> None:
                return None

            lifespan.startup = started  # the handover's startup() must not run it again
            self._warm_lifespan = lifespan

        async def prepare_servers(self, sockets: list[socket.socket]) -> None:
            """A hot standby's warm-up, after :meth:`prestart`: uvicorn's servers on the
            listeners, created but not serving (the handover only starts them)."""
            loop = asyncio.get_running_loop()
            config = self.config
            state = self._warm_lifespan.state

            def create_protocol(_loop: asyncio.AbstractEventLoop | None = None) -> Any:
                protocol: Any = config.http_protocol_class  # uvicorn's own call, typed loosely
                return protocol(config=config, server_state=self.server_state, app_state=state,
                                _loop=_loop)

            for sock in sockets:
                self._prepared.append(await loop.create_server(
                    create_protocol, sock=sock, ssl=config.ssl, backlog=config.backlog,
                    start_serving=False))

        async def serve_standby(self, conn: Any, take: Callable[[bytes], Any],
                                sockets: list[socket.socket]) -> None:
            """A warm standby waits for its handover inside the running loop. The callback
            that reads it starts the prepared servers at once, and nothing else: the loop's
            next poll registers them. The slot (stdio, title, heartbeats) is taken right
            after that poll, in a callback woken by an eventfd made readable here (before any
            request accepted then reaches the app); then the worker serves as usual."""
            with self.capture_signals():
                self.lifespan = self._warm_lifespan
                loop = asyncio.get_running_loop()
                self._arm_signals(loop)
                got: asyncio.Future[bool] = loop.create_future()
                self._standby_got = got
                fd = conn.fileno()
                kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

                def readable() -> None:
                    loop.remove_reader(fd)
                    try:
                        data = conn.recv_bytes()
                    except (EOFError, OSError):
                        data = b""
                    if got.done():
                        return
                    if not data:
                        got.set_result(False)  # told to go
                        return
                    self._standby_got = None  # taken: a stop from now on is a drain
                    try:
                        for server in self._prepared:
                            _start_now(server)
                    except BaseException as exc:
                        got.set_exception(exc)
                        return
                    os.eventfd_write(kick, 1)
                    loop.add_reader(kick, settle, data)

                def settle(data: bytes) -> None:
                    loop.remove_reader(kick)
                    try:
                        take(data)
                    except BaseException as exc:
                        got.set_exception(exc)
                        return
                    got.set_result(True)

                loop.add_reader(fd, readable)
                try:
                    taken = await got
                finally:
                    os.close(kick)
                if not taken:
                    return
                self.servers, self.started = self._prepared, True
                if not self.should_exit:
                    heartbeat.ready()
                    await self.main_loop()
                await self.shutdown(sockets=sockets)

        async def serve(self, sockets: list[socket.socket] | None = None) -> None:
            if self._warm_lifespan is None:
                await super().serve(sockets=sockets)
                return
            with self.capture_signals():  # uvicorn's _serve, minus the lifespan it ran
                self.lifespan = self._warm_lifespan
                await self.startup(sockets=sockets)
                if not self.should_exit:
                    await self.main_loop()
                if self.started:
                    await self.shutdown(sockets=sockets)

        @contextlib.contextmanager
        def capture_signals(self) -> Generator[None, None, None]:
            # Before the loop runs (the lifespan start-up), a stop just sets the flag; once it
            # runs, the loop's own handlers also wake the main loop at once. Nothing is
            # re-raised at the end: a drained worker exits 0.
            previous = {sig: signal.signal(sig, self._on_signal)
                        for sig in (signal.SIGTERM, signal.SIGINT)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def _on_signal(self, sig: int, _frame: Any = None) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            if self._wake is not None:
                self._wake.set()
            got = self._standby_got
            if got is not None and not got.done():
                got.set_result(False)  # a standby told to stop while it waits

        def _arm_signals(self, loop: asyncio.AbstractEventLoop) -> None:
            self._wake = asyncio.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.add_signal_handler(sig, self._on_signal, sig)

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            self._arm_signals(asyncio.get_running_loop())
            await super().startup(sockets=sockets)
            if self.started and not self.should_exit:
                heartbeat.ready()  # accepting from the next loop iteration: tell the monitor

        async def main_loop(self) -> None:
            counter = 0
            assert self._wake is not None
            should_exit = await self.on_tick(counter)
            while not should_exit:
                counter = (counter + 1) % 864000
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), _TICK)
                should_exit = await self.on_tick(counter)

        async def on_tick(self, counter: int) -> bool:
            heartbeat.beat()
            if (self._limit and not self._recycle_asked
                    and self.server_state.total_requests >= self._limit):
                self._recycle_asked = True
                _ask_recycle(f"max_requests {self._limit} reached")
            result: bool = await super().on_tick(counter)
            return result

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            # 1. Stop accepting: close this worker's copies of the listeners. The accept queue
            #    is shared: what waits in it goes to another worker.
            for server in self.servers:
                server.close()
            for sock in sockets or []:
                with contextlib.suppress(OSError):
                    sock.close()
            await self._drain()
            # Whatever is still running past the grace is cancelled, then the lifespan ends.
            for task in list(self.server_state.tasks):
                task.cancel(msg="corral: graceful_timeout exceeded")
            for conn in list(self.server_state.connections):
                with contextlib.suppress(Exception):
                    conn.transport.close()
            if not self.force_exit:
                await self.lifespan.shutdown()

        async def _drain(self) -> None:
            """Until no connection is left or graceful_timeout: Connection: close on every
            response still to come; idle connections closed after idle_grace."""
            deadline = time.monotonic() + self.init.graceful_timeout
            grace = self.init.idle_grace
            idle_since: dict[int, tuple[Any, float]] = {}
            while (self.server_state.connections or self.server_state.tasks) and (
                    time.monotonic() < deadline and not self.force_exit):
                now = time.monotonic()
                for conn in list(self.server_state.connections):
                    cycle = getattr(conn, "cycle", None)
                    key = id(conn)
                    if cycle is not None and not cycle.response_complete:
                        cycle.keep_alive = False  # its response says Connection: close
                        idle_since.pop(key, None)
                        continue
                    seen = idle_since.get(key)
                    if seen is None or seen[0] is not cycle:
                        idle_since[key] = (cycle, now)  # idle since now (or a new request)
                    elif now - seen[1] >= grace:
                        transport = getattr(conn, "transport", None)
                        if transport is not None and not transport.is_closing():
                            transport.close()
                await asyncio.sleep(0.01)

    return CorralServer


def _ask_recycle(why: str) -> None:
    heartbeat.set_status(f"{RECYCLE_STATUS}: {why}")
    fd = heartbeat._wake_fd
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.write(fd, b"r")


_warm: tuple[asyncio.AbstractEventLoop, Any] | None = None  # a standby's loop and server


def _start_now(server: Any) -> None:
    """``await server.start_serving()``, run to its first suspension from a plain callback:
    the listeners are registered with the loop before it returns (uvloop's never suspends;
    asyncio's registers, then yields once, which is not needed)."""
    coro = server.start_serving()
    try:
        coro.send(None)
    except StopIteration:
        return
    coro.close()


def warm_up(sockets: list[socket.socket] | None = None) -> OwnWait | None:
    """A hot standby's warm-up (forked from the zygote): make the event loop, run the app's
    lifespan start-up and create uvicorn's servers on ``sockets`` (not serving) now; the
    standby then waits for its handover inside that loop (the :class:`OwnWait` returned), so
    that it accepts within the loop iteration that reads the handover.

    With ``reuse_port`` (a socket of the worker's own is bound at the handover) or without
    ``sockets``, only the loop and the lifespan are made ahead (None: the bootstrap waits).
    """
    global _warm
    pre = _preloaded
    if pre is None:
        raise RuntimeError("warm_up: no app preloaded in this process")
    factory = pre.config.get_loop_factory()
    loop = factory() if factory is not None else asyncio.new_event_loop()
    server = _server_class()(pre.config, pre.init)
    loop.run_until_complete(server.prestart())
    _warm = (loop, server)
    if sockets is None or pre.init.reuse_port:
        return None
    loop.run_until_complete(server.prepare_servers(sockets))

    def wait(conn: Any, take: Callable[[bytes], Any]) -> None:
        try:
            loop.run_until_complete(server.serve_standby(conn, take, sockets))
        finally:
            loop.close()

    return OwnWait(wait)


def own_listeners(sockets: list[socket.socket], backlog: int) -> list[socket.socket]:
    """``reuse_port``: a listening socket of this worker's own beside each shared TCP listener
    that has SO_REUSEPORT (same address, same option), so the kernel spreads new connections
    over the workers by hash instead of one shared queue. The price: this socket's queue is the
    worker's alone, and connections waiting in it when the worker exits are reset unless
    ``net.ipv4.tcp_migrate_req=1`` (they then move to another socket of the group). The worker
    still accepts on the shared listener too: it stays in the group (corral holds it), and what
    the kernel puts in its queue must be served."""
    out: list[socket.socket] = []
    for shared in sockets:
        if shared.family not in (socket.AF_INET, socket.AF_INET6):
            continue
        try:
            if not shared.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
                continue
            address = shared.getsockname()
        except OSError:
            continue
        own = socket.socket(shared.family, socket.SOCK_STREAM)
        try:
            own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if shared.family == socket.AF_INET6:
                own.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            own.bind(address)
            own.listen(backlog)
        except OSError as exc:
            own.close()
            log.warning("worker pid %d: reuse_port: no socket of its own on %s (%s); it "
                        "accepts on the shared listener only", os.getpid(), address, exc)
            continue
        out.append(own)
    return out


def _run(pre: Preloaded, sockets: list[socket.socket]) -> None:
    from uvicorn._compat import asyncio_run

    if pre.init.reuse_port:
        sockets = [*own_listeners(sockets, pre.init.backlog), *sockets]

    if _warm is not None:
        loop, server = _warm
        try:
            loop.run_until_complete(server.serve(sockets=sockets))
        finally:
            loop.close()
        return
    server = _server_class()(pre.config, pre.init)
    asyncio_run(server.serve(sockets=sockets), loop_factory=pre.config.get_loop_factory())


def serve_preloaded(index: int, sockets: list[socket.socket]) -> None:
    """A zygote child: serve the app the zygote loaded on the sockets it inherited."""
    pre = _preloaded
    if pre is None:
        raise RuntimeError("serve_preloaded: no app preloaded in this process (not a zygote "
                           "child)")
    _run(pre, sockets)


def serve_spawned(index: int, init: WorkerInit, sockets: list[socket.socket]) -> None:
    """A spawn/forkserver worker: import the app itself, then serve (the fallbacks)."""
    _run(preload(init), sockets)
