"""``corral serve``: a web app's workers, generations and rolling reloads on one loop thread.

Each code generation is its own pool (a hosted :class:`corral.Supervisor`) whose workers are
forked by that generation's zygote. A reload starts a new zygote (the new code), then grows the
new pool and shrinks the old one under ``max_surge`` / ``max_unavailable`` (:func:`plan`): a new
worker counts only once its server really accepts (``corral.ready()`` from inside the worker,
after uvicorn's start-up); an old worker leaves through a drain (SIGTERM: stop accepting, finish
in-flight requests within ``graceful_timeout``), then its group is killed. Processes alive never
exceed N + max_surge workers (+ the zygotes)::

    HUP ──> new zygote imports the code ──(import error: abort, old keeps serving)
              │
              ├─> new worker 1 ── ready ──> old worker 1 drains ── exits ─┐
              │                                                         │
              ├─> new worker 2 ── ready ──> old worker 2 drains ── exits ─┤ ... N slots
              │      (not ready within ready_timeout, or died: abort; the old pool is
              │       scaled back to N, the new one drained, `corral reload` exits 1)
              └─> old pool stopped, old zygote retired, READY=1

The listeners are bound once (or adopted from systemd) and closed last, after every worker.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from corral import _validate as v
from corral._notify import Notifier
from corral._observe import parse_address
from corral._reactor import Reactor
from corral.serve import _listeners
from corral.serve._listeners import Listener
from corral.serve._probe import ServerProbe, ServerState
from corral.serve._worker import RECYCLE_STATUS, WorkerInit, serve_spawned
from corral.serve._zygote import Zygote, ZygoteError

__all__ = ["ServeOptions", "Server", "plan"]

log = logging.getLogger("corral.serve")

START_METHODS = ("zygote", "forkserver", "spawn")
MAX_WORKERS = 4096


@dataclass(frozen=True)
class ServeOptions:
    """A validated ``corral serve`` (command line or ``[serve.NAME]``).

    Args:
        app: "module:attribute" of the ASGI or WSGI app.
        bind: addresses (HOST:PORT, [IPv6]:PORT, unix:/path, fd://N); () with systemd
            socket activation.
        workers: N.
        interface: "auto" (detected), "asgi" or "wsgi".
        start_method: "zygote" (default), "forkserver" or "spawn" (each worker imports the
            app itself).
        max_surge, max_unavailable: a reload's room above / below N workers.
        graceful_timeout: seconds an old worker gets to finish its requests.
        ready_timeout: seconds a new worker gets to accept; past it the reload is aborted.
        shutdown_delay: on SIGTERM, seconds to keep serving before the drain begins.
        reuse_port: SO_REUSEPORT on the listeners, and each worker listens on a socket of its
            own beside the shared one (see the README's trade-off).
        max_requests, max_requests_jitter: recycle a worker after that many requests.
        max_memory, max_age: recycle a worker past an RSS (bytes) or an age (seconds).
        min_ready: workers ready before READY=1 (default N).
        idle_grace: during a drain, idle kept-alive connections are closed after this long.
        app_dir: put first on sys.path (default: the current directory).
        uvicorn: more ``uvicorn.Config`` keywords (log_level, http, loop, ...).
        name: the program's name (logs, process titles, systemd units).
        standby: hot standbys per generation, forked from the zygote with the app's lifespan
            start-up already run: a killed or recycled worker is replaced by one that accepts
            within about a millisecond. Each costs a process (mostly shared memory).
        http: "HOST:PORT" of an HTTP endpoint (/metrics /livez /readyz /status) whose /readyz
            answers for the server: 503 while starting, short of ``min_ready`` workers, and
            from SIGTERM on (through ``shutdown_delay``); None: no endpoint.
    """

    app: str
    bind: tuple[str, ...] = ("127.0.0.1:8000",)
    workers: int = 1
    interface: str = "auto"
    start_method: str = "zygote"
    max_surge: int = 1
    max_unavailable: int = 0
    graceful_timeout: float = 30.0
    ready_timeout: float = 60.0
    shutdown_delay: float = 0.0
    reuse_port: bool = False
    max_requests: int = 0
    max_requests_jitter: int = 0
    max_memory: int | None = None
    max_age: float | None = None
    min_ready: int | None = None
    idle_grace: float = 0.5
    app_dir: str = ""
    uvicorn: dict[str, Any] = field(default_factory=dict)
    name: str = "web"
    backlog: int = _listeners.DEFAULT_BACKLOG
    standby: int = 0
    http: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.app, str) or ":" not in self.app:
            raise ValueError(f'app must be "module:attribute", got {self.app!r}')
        if isinstance(self.bind, str):
            object.__setattr__(self, "bind", (self.bind,))
        for b in self.bind:
            _listeners.parse_bind(b)
        v.count("workers", self.workers, minimum=1)
        v.choice("interface", self.interface, ("auto", "asgi", "wsgi"))
        v.choice("start_method", self.start_method, START_METHODS)
        v.integer("max_surge", self.max_surge)
        v.integer("max_unavailable", self.max_unavailable)
        if self.max_surge == 0 and self.max_unavailable == 0:
            raise ValueError("max_surge and max_unavailable cannot both be 0: a rolling "
                             "reload must add or remove a worker to make progress")
        v.number("graceful_timeout", self.graceful_timeout)
        v.number("ready_timeout", self.ready_timeout, strict=True)
        v.number("shutdown_delay", self.shutdown_delay)
        v.boolean("reuse_port", self.reuse_port)
        v.integer("max_requests", self.max_requests)
        v.integer("max_requests_jitter", self.max_requests_jitter)
        if self.max_memory is not None:
            v.integer("max_memory", self.max_memory, minimum=1)
        v.optional_number("max_age", self.max_age, strict=True)
        if self.min_ready is not None:
            v.integer("min_ready", self.min_ready, minimum=1)
            if self.min_ready > self.workers:
                raise ValueError(f"min_ready must be <= workers ({self.workers}), got "
                                 f"{self.min_ready}")
        v.number("idle_grace", self.idle_grace)
        v.integer("standby", self.standby)
        if self.standby and self.start_method != "zygote":
            raise ValueError("standby needs start_method='zygote' (a standby is forked from "
                             f"the generation's zygote), got {self.start_method!r}")
        if self.http is not None:
            parse_address(self.http, "http")
        if not self.app_dir:
            object.__setattr__(self, "app_dir", os.getcwd())

    @property
    def wanted_ready(self) -> int:
        return self.min_ready or self.workers

    def worker_init(self) -> WorkerInit:
        return WorkerInit(app=self.app, interface=self.interface, app_dir=self.app_dir,
                          graceful_timeout=self.graceful_timeout, idle_grace=self.idle_grace,
                          max_requests=self.max_requests,
                          max_requests_jitter=self.max_requests_jitter,
                          uvicorn=dict(self.uvicorn), reuse_port=self.reuse_port,
                          backlog=self.backlog)


def from_config(cfg: Any, **extra: Any) -> ServeOptions:
    """ServeOptions from a ``[serve.NAME]`` (:class:`corral.cli._model.ServeConfig`)."""
    return ServeOptions(app=cfg.app, bind=tuple(cfg.bind), workers=cfg.workers,
                        interface=cfg.interface, max_surge=cfg.max_surge,
                        max_unavailable=cfg.max_unavailable,
                        graceful_timeout=cfg.graceful_timeout, ready_timeout=cfg.ready_timeout,
                        shutdown_delay=cfg.shutdown_delay, reuse_port=cfg.reuse_port,
                        max_requests=cfg.max_requests,
                        max_requests_jitter=cfg.max_requests_jitter, name=cfg.name,
                        start_method=cfg.start_method, standby=cfg.standby,
                        min_ready=cfg.min_ready, max_memory=cfg.max_memory,
                        max_age=cfg.max_age, idle_grace=cfg.idle_grace, http=cfg.http,
                        **extra)


# ------------------------------------------------------------------------------- the policy


def plan(n: int, surge: int, unavailable: int, *, old_alive: int, old_target: int,
         new_target: int, new_ready: int) -> tuple[int, int]:
    """One step of a rolling reload: the new pool's and the old pool's target sizes.

    Args:
        n: the workers wanted.
        old_alive: old-generation processes still alive (draining ones included).
        old_target: old workers not told to leave yet.
        new_target: new workers started (ready or not).
        new_ready: new workers accepting.

    The old pool shrinks only while ``old_target + new_ready`` stays >= n - unavailable; the new
    pool grows only while every live process (old draining ones included) stays < n + surge.
    """
    while old_target > 0 and (old_target - 1) + new_ready >= n - unavailable:
        old_target -= 1
    while new_target < n and new_target + max(old_alive, old_target) < n + surge:
        new_target += 1
    return new_target, old_target


# ------------------------------------------------------------------------------ generations


@dataclass(eq=False)
class Generation:
    """One code generation: its zygote (None for spawn/forkserver) and its pool."""

    number: int
    zygote: Zygote | None = None
    sup: Any = None  # corral.Supervisor, hosted on the server's reactor
    target: int = 0
    wanted_at: dict[int, float] = field(default_factory=dict)  # slot -> when it was asked for
    zygote_error: str | None = None
    zygote_done: bool = False
    stopping: bool = False

    @property
    def monitor(self) -> Any:
        return self.sup._monitor if self.sup is not None else None

    def counts(self) -> tuple[int, int]:
        """(ready, alive): workers accepting; processes alive or being started."""
        mon = self.monitor
        if mon is None:
            return 0, 0
        ready = alive = 0
        for w in mon._slots.values():
            if w.ready and w.state.value == "running":
                ready += 1
            if w.proc is not None or w.state.value == "pending":
                alive += 1
        return ready, alive

    @property
    def finished(self) -> bool:
        mon = self.monitor
        return mon is None or mon.finished.is_set()


@dataclass
class Reload:
    old: Generation | None
    new: Generation
    began: float
    why: str
    waiters: list[Callable[[str | None], None]] = field(default_factory=list)
    failed: str | None = None
    restoring_since: float = 0.0


class Server:
    """A running ``corral serve`` (one per process; everything on the calling thread).

    Args:
        options: what to serve.
        reactor: the loop to run on (default: a new one, driven by :meth:`run`).
        io: hosted: ``io(pool_name)`` gives each generation's pool its WorkerIO.
        notifier: systemd messages (default: from the environment).
        control_socket: a path for ``corral reload``/``status`` (None: no control socket).
    """

    def __init__(self, options: ServeOptions, *, reactor: Reactor[Any] | None = None,
                 notifier: Notifier | None = None, control_socket: str | None = None,
                 listeners: list[Listener] | None = None,
                 io: Callable[[str], Any] | None = None) -> None:
        self.options = options
        # Hosted (`corral run` with [serve.NAME]): the host drives the reactor and calls
        # advance() after each round; the reactor stays the host's.
        self._own_reactor = reactor is None
        self.reactor: Reactor[Any] = reactor or Reactor(f"serve {options.name}")
        self.notifier = notifier or Notifier()
        self.control_socket = control_socket
        self.listeners: list[Listener] = listeners or []
        # Hosted: io(pool_name) -> the WorkerIO of a generation's pool (log pipes: a zygote's
        # workers open them through /proc like every worker).
        self._io = io
        self.generations: list[Generation] = []
        self.current: Generation | None = None
        self.reload_state: Reload | None = None
        self.stopping = False
        self.exit_code = 0
        self.max_workers_alive = 0  # the most worker processes seen alive at once
        self.started_at = time.time()
        self._numbers = 0
        self._announced_ready = False
        self._stop_deadline = math.inf
        self._signals: list[int] = []
        self._wakeup_set = False
        self._control: Any = None
        self._recycle_wanted: set[int] = set()
        self._recycling: dict[str, Any] | None = None
        self._retiring: list[threading.Thread] = []
        self._memory_at = 0.0
        self._probe: ServerProbe | None = None  # --http
        self._stop_why = ""
        self._drain_at: float | None = None  # monotonic: the end of shutdown_delay
        self.on_change: Callable[[], None] | None = None  # tests: called after each round
        # Hosted: called with each generation's pool before it starts (the host subscribes
        # to its events).
        self.on_pool: Callable[[Any], None] | None = None
        # Hosted: called as a rolling reload begins (corral run tells systemd RELOADING=1).
        self.on_roll: Callable[[], None] | None = None
        self._look_timer: Any = None

    # ------------------------------------------------------------------------------- set-up

    def open_listeners(self) -> None:
        """Adopt systemd's sockets if it passed any, else bind ``options.bind``."""
        if self.listeners:
            return
        adopted = _listeners.adopt_systemd()
        if adopted:
            self.listeners = adopted
            log.info("serve %s: adopted %d socket(s) from systemd: %s", self.options.name,
                     len(adopted), ", ".join(f"{x.name}={x.address}" for x in adopted))
            return
        if self.options.reuse_port:
            warning = _listeners.warn_reuse_port(_listeners.check_migrate_req())
            if warning:
                log.warning("%s", warning)
        self.listeners = _listeners.bind_all(self.options.bind,
                                             reuse_port=self.options.reuse_port,
                                             backlog=self.options.backlog)
        log.info("serve %s: listening on %s", self.options.name,
                 ", ".join(x.address for x in self.listeners))

    def start_http(self) -> None:
        """``options.http``: serve /metrics /livez /readyz /status (a thread of its own).

        Raises:
            OSError: the address cannot be bound.
        """
        if self.options.http is None or self._probe is not None:
            return
        self._probe = ServerProbe(self.options.http, self.reactor, self._probe_state(),
                                  self.status).start()

    def _publish(self) -> None:
        """The state the endpoint's /readyz reads (after each round; nothing without it)."""
        if self._probe is not None:
            self._probe.publish(self._probe_state())

    def _probe_state(self) -> ServerState:
        opts = self.options
        ready = alive = 0
        for gen in self.generations:
            r, a = gen.counts()
            ready += r
            alive += a
        state = self.reload_state
        current = self.current
        if current is None and state is not None and state.new.sup is not None:
            current = state.new  # the first start
        # Once READY=1 was sent, the first start is over (a later shortfall is judged on the
        # count alone).
        phase = ("stopping" if self.stopping else "serving" if self._announced_ready
                 else "starting")
        reloading = state is not None and state.old is not None
        return ServerState(
            name=opts.name, phase=phase, ready=ready, needed=opts.wanted_ready,
            workers=opts.workers, generation=current.number if current is not None else None,
            reloading_to=state.new.number if state is not None and reloading else None,
            alive=alive, why=self._stop_why, shutdown_delay=opts.shutdown_delay,
            drain_at=self._drain_at)

    def install_signals(self) -> None:
        """TERM/INT: drain and stop; HUP: rolling reload (handlers only hand work over)."""
        # The kernel may deliver a signal to any thread (the --http endpoint's, a spawner):
        # the main thread, asleep in epoll, would run the Python handler only at its next
        # wake-up, maybe never. The C-level handler writes to the wake pipe instead.
        signal.set_wakeup_fd(self.reactor.wake_fd, warn_on_full_buffer=False)
        self._wakeup_set = True
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
            self._signals.append(sig)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        with contextlib.suppress(RuntimeError):
            self.reactor.call_soon_threadsafe(self._handle_signal, signum)

    def _handle_signal(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            self.reload("SIGHUP")
        else:
            self.stop(signal.Signals(signum).name, quick=signum == signal.SIGINT
                      and self.stopping)

    def start_control(self) -> None:
        if self.control_socket is None:
            return
        from corral._control import ControlServer, ControlSocketError

        self._control = ControlServer(self.reactor, self.control_socket, self._dispatch)
        try:
            self._control.start()
        except ControlSocketError as exc:
            log.warning("serve %s: no control socket (%s); SIGHUP still reloads",
                        self.options.name, exc)
            self._control = None

    # -------------------------------------------------------------------------------- run

    def begin(self) -> None:
        """Hosted use: bind (or adopt), then start generation 1; the host then calls
        :meth:`advance` after each round of its reactor, :meth:`reload`, :meth:`stop`, and
        :meth:`close` once :attr:`done`.

        Raises:
            OSError, ValueError: a listener could not be bound.
        """
        self.open_listeners()
        self.start_http()
        self._start_watchdog()
        self._arm_recycle_look()
        self.reload("start")

    @property
    def ready(self) -> bool:
        """Serving: the first start announced ready, and not stopping."""
        return self._announced_ready and not self.stopping

    def reconfigure(self, options: ServeOptions) -> bool:
        """Hosted: take new settings for the next generation (start it with :meth:`reload`).

        False, changing nothing, when the listeners would differ (``bind``, ``reuse_port``,
        ``backlog``): that takes a new Server. A failed reload keeps the old generation
        serving; the new settings stay for the next one.
        """
        old = self.options
        if (old.bind, old.reuse_port, old.backlog) != (options.bind, options.reuse_port,
                                                       options.backlog):
            return False
        self.options = options
        if options.http != old.http and self._probe is not None:
            self._probe.close()
            self._probe = None
        if options.http != old.http:
            try:
                self.start_http()
            except OSError as exc:
                log.error("serve %s: http: %s; no endpoint", options.name, exc)
            else:
                for gen in self.generations:
                    if gen.sup is not None and self._probe is not None:
                        self._probe.add(gen.sup)
        self._arm_recycle_look()
        return True

    def run(self) -> int:
        """Bind, start generation 1, serve until stopped; the exit code."""
        try:
            self.open_listeners()
        except (OSError, ValueError) as exc:
            log.error("serve %s: %s", self.options.name, exc)
            return 1
        try:
            self.start_http()
        except OSError as exc:
            # The endpoint's message names the address and why ("[Errno 98]" says less).
            log.error("serve %s: --http: %s", self.options.name,
                      exc.strerror if exc.errno is not None and exc.strerror else exc)
            _listeners.close_all(self.listeners)
            self.listeners = []
            return 1
        self.install_signals()
        self.start_control()
        self._start_watchdog()
        self.notifier.status(f"starting {self.options.workers} worker(s)")
        self._arm_recycle_look()
        try:
            self.reload("start")
            while not self.done:
                self.reactor.run_once()
                self.advance()
        finally:
            self.close()
        return self.exit_code

    @property
    def done(self) -> bool:
        return self.stopping and all(g.finished for g in self.generations) and (
            self.reload_state is None or self.reload_state.new.finished)

    def close(self) -> None:
        """Release everything; the listeners last."""
        for gen in self.generations:
            if gen.monitor is not None and not gen.finished:
                gen.monitor.request_stop(0.0, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not all(g.finished for g in self.generations) and time.monotonic() < deadline:
            self.reactor.run_once(extra=time.monotonic() + 0.05)
        for gen in self.generations:
            if gen.zygote is not None:
                gen.zygote.retire()
        for thread in self._retiring:
            thread.join(10)
        if self._control is not None:
            self._control.close()
            self._control = None
        for sig in self._signals:
            with contextlib.suppress(ValueError, OSError):
                signal.signal(sig, signal.SIG_DFL)
        self._signals.clear()
        if self._wakeup_set:
            with contextlib.suppress(ValueError):
                signal.set_wakeup_fd(-1)
            self._wakeup_set = False
        self._publish()
        _listeners.close_all(self.listeners)
        self.listeners = []
        if self._probe is not None:
            # After the listeners: until the app's sockets are gone, a probe gets an answer
            # (503, and why) rather than a refused connection; the process exits right after.
            self._probe.close()
            self._probe = None
        if self._own_reactor:
            with contextlib.suppress(Exception):
                self.reactor.close()

    # -------------------------------------------------------------------------- generations

    def _new_generation(self) -> Generation:
        self._numbers += 1
        gen = Generation(self._numbers)
        self.generations.append(gen)
        return gen

    def _pool_name(self, gen: Generation) -> str:
        return f"{self.options.name}@{gen.number}"

    def _begin_zygote(self, gen: Generation) -> None:
        """Start the generation's zygote on a helper thread: importing the app must not hold
        up the loop (the old generation is supervised on it meanwhile)."""
        if self.options.start_method != "zygote":
            gen.zygote_done = True
            return
        zygote = Zygote(self._pool_name(gen), self.options.worker_init(),
                        [x.fd for x in self.listeners], reactor=self.reactor)
        gen.zygote = zygote

        def boot() -> None:
            error: str | None = None
            try:
                info = zygote.start(self.options.ready_timeout)
                if info.threads:
                    log.warning("zygote %s: native thread(s) %s were running when it began "
                                "to fork (a BLAS pool?); they are not copied into workers",
                                zygote.name, ", ".join(info.threads))
            except (ZygoteError, OSError) as exc:
                error = str(exc)
            except Exception as exc:  # a bug of ours must still end the reload
                log.exception("zygote %s: start failed", zygote.name)
                error = f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(RuntimeError):
                self.reactor.call_soon_threadsafe(self._zygote_booted, gen, error)

        threading.Thread(target=boot, name=f"corral-zygote-boot[{zygote.name}]",
                         daemon=True).start()

    def _zygote_booted(self, gen: Generation, error: str | None) -> None:
        gen.zygote_done = True
        gen.zygote_error = error
        if error is None and gen.zygote is not None and gen.zygote.info is not None:
            log.info("zygote %s (pid %s) imported the app in %.3fs (%s)", gen.zygote.name,
                     gen.zygote.pid, gen.zygote.info.import_seconds,
                     gen.zygote.info.interface)
        self.advance()

    def _start_pool(self, gen: Generation, workers: int) -> None:
        import corral

        opts = self.options
        zygote = gen.zygote
        listeners = [x.sock for x in self.listeners]
        init = opts.worker_init()
        method = "spawn" if opts.start_method == "zygote" else opts.start_method

        def start_process(req: Any) -> Any:
            if zygote is not None and req.standby is not None:
                import multiprocessing

                from corral.process import own_fd

                ours, theirs = multiprocessing.Pipe(duplex=True)
                own_fd(ours.fileno())
                try:
                    child = zygote.fork(req.boot, (), fds=[theirs.fileno()])
                except BaseException:
                    ours.close()
                    raise
                finally:
                    theirs.close()
                req.standby.pending_conn = ours
                return child
            if zygote is not None:
                return zygote.fork(req.boot, ())
            import multiprocessing

            from corral._bootstrap import run_worker
            from corral.process import WorkerProcess

            ctx = multiprocessing.get_context(method)
            return WorkerProcess.start(ctx, run_worker,
                                       (req.boot, serve_spawned, (init, listeners)),
                                       req.boot.name, False)

        name = self._pool_name(gen)
        if method == "forkserver":
            import multiprocessing

            from corral._spawner import preload_for_forkserver

            preload_for_forkserver(multiprocessing.get_context("forkserver"),
                                   ["corral.serve._worker", "uvicorn"])
        gen.sup = corral.Supervisor(
            serve_spawned, workers=workers, name=name, start_method=method,
            names=_Names(opts.name, gen.number), ready_when="ready",
            startup_timeout=opts.ready_timeout, stop_timeout=opts.graceful_timeout + 5.0,
            stop_signal=signal.SIGTERM, max_memory=None, max_age=None,
            standby=opts.standby,
            # A worker that served for a second and died is replaced at once (a server's
            # workers live long; a crash loop still backs off and meets the budget).
            backoff=corral.Backoff(initial=0.1, cap=10.0, reset_after=1.0),
            _host=self.reactor, _start_process=start_process,
            _io=self._io(name) if self._io is not None else None)
        gen.target = workers
        now = time.monotonic()
        gen.wanted_at = dict.fromkeys(range(workers), now)
        if self.on_pool is not None:
            self.on_pool(gen.sup)
        gen.sup.start()
        if self._probe is not None:
            self._probe.add(gen.sup)

    def _scale(self, gen: Generation, n: int) -> None:
        mon = gen.monitor
        if mon is None or n == gen.target:
            return
        now = time.monotonic()
        for i in range(gen.target, n):
            gen.wanted_at[i] = now
        for i in range(n, gen.target):
            gen.wanted_at.pop(i, None)
        gen.target = n
        mon.submit(mon.do_scale, n, gen.sup._prepare(n))

    # ---------------------------------------------------------------------- scale, signal

    def scale(self, n: int) -> None:
        """Run ``n`` workers of the serving generation: new ones are forked from its zygote,
        the highest-numbered ones drain (SIGTERM, within graceful_timeout) and their process
        groups are then killed. Later generations (reloads) start with ``n`` too.

        Raises:
            TypeError, ValueError: ``n`` is not an int in 1..4096, or below ``min_ready``.
            RuntimeError: not serving now (starting, stopping, a reload or a recycle under
                way): nothing changed; try again once it is over.
        """
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"workers must be an int, got {n!r} ({type(n).__name__})")
        if not 1 <= n <= MAX_WORKERS:
            raise ValueError(f"workers must be between 1 and {MAX_WORKERS}, got {n}")
        opts = self.options
        if opts.min_ready is not None and n < opts.min_ready:
            raise ValueError(f"workers must be >= min_ready ({opts.min_ready}), got {n}")
        gen = self.current
        state = self.reload_state
        if self.stopping:
            raise RuntimeError(f"serve {opts.name!r} is stopping")
        if state is not None or gen is None or gen.monitor is None:
            what = ("its first start" if gen is None else
                    f"a reload to generation {state.new.number}" if state is not None
                    else "its start")
            raise RuntimeError(f"serve {opts.name!r}: {what} is under way; scale once it "
                               "is over")
        if self._recycling is not None:
            raise RuntimeError(f"serve {opts.name!r}: a worker is being recycled (through "
                               "an extra worker); scale once it is over, in a moment")
        if n != opts.workers:
            log.info("serve %s: scaling generation %d from %d to %d worker(s)", opts.name,
                     gen.number, opts.workers, n)
        self.options = replace(opts, workers=n)
        self._scale(gen, n)
        self.advance()

    def signal_workers(self, index: int | None, sig: int) -> list[Any]:
        """Send ``sig`` to the process group of worker ``index`` of the serving generation
        (None: every worker of every live generation); the monitors' replies (each answers
        how many groups it reached).

        Raises:
            ValueError: no such worker; RuntimeError: no generation serves yet.
        """
        if index is None:
            gens = [g for g in self.generations if g.monitor is not None and not g.finished]
            if not gens:
                raise RuntimeError(f"serve {self.options.name!r} has no worker running")
            return [g.monitor.submit(g.monitor.do_signal, None, sig) for g in gens]
        gen = self.current
        if gen is None or gen.monitor is None:
            raise RuntimeError(f"serve {self.options.name!r} has no serving generation yet")
        if isinstance(index, bool) or not isinstance(index, int) or (
                index not in gen.monitor._slots):
            raise ValueError(f"serve {self.options.name!r} has no worker {index!r} (workers "
                             f"0..{len(gen.monitor._slots) - 1} of generation {gen.number})")
        return [gen.monitor.submit(gen.monitor.do_signal, [index], sig)]

    # ------------------------------------------------------------------------------ reload

    def reload(self, why: str, done: Callable[[str | None], None] | None = None) -> None:
        """Begin a rolling reload (or the first start); ``done(error)`` when it ends."""
        if self.stopping:
            if done is not None:
                done("corral serve is stopping")
            return
        state = self.reload_state
        if state is not None:
            # One at a time: this caller waits for the reload under way.
            if done is not None:
                state.waiters.append(done)
            return
        gen = self._new_generation()
        state = Reload(self.current, gen, time.monotonic(), why)
        if done is not None:
            state.waiters.append(done)
        self.reload_state = state
        if self.current is not None:
            log.info("serve %s: reload (%s): generation %d -> %d", self.options.name, why,
                     self.current.number, gen.number)
            self.notifier.reloading(f"reloading: generation {gen.number}")
            if self.on_roll is not None:
                self.on_roll()
        self._begin_zygote(gen)
        self._arm_reload_deadline(state)
        self.advance()

    def _arm_reload_deadline(self, state: Reload) -> None:
        # Woken at the next readiness deadline even when nothing else happens.
        self.reactor.call_later(self.options.ready_timeout + 0.01, self.advance)

    def advance(self) -> None:
        """Move a reload, a stop and recycling along (after each loop round; idempotent)."""
        state = self.reload_state
        if state is not None:
            self._advance_reload(state)
        self._retire_finished()
        self._count_processes()
        if not self.stopping and self.reload_state is None:
            current = self.current
            zygote = current.zygote if current is not None else None
            if current is not None and zygote is not None and zygote.dead and (
                    not zygote.retiring):
                # Its workers died with it (their parent-death signal): a new generation
                # from a new zygote, through the same path as a reload.
                log.error("serve %s: the zygote of generation %d (pid %s) died; starting a "
                          "new generation", self.options.name, current.number, zygote.pid)
                zygote.retiring = True
                self.reload("the zygote died")
                return
            self._advance_recycling()
        self._publish()
        if self.on_change is not None:
            self.on_change()

    def _advance_reload(self, state: Reload) -> None:
        opts = self.options
        new, old = state.new, state.old
        now = time.monotonic()
        if state.failed is not None:
            self._advance_abort(state, now)
            return
        if not new.zygote_done:
            if now - state.began > opts.ready_timeout:
                self._abort(state, f"the new code was not imported within "
                                   f"{opts.ready_timeout:g}s")
            return
        if new.zygote_error is not None:
            self._abort(state, new.zygote_error)
            return
        if new.sup is None:
            old_alive = old.counts()[1] if old is not None else 0
            first, _ = plan(opts.workers, opts.max_surge, opts.max_unavailable,
                            old_alive=old_alive, old_target=old.target if old else 0,
                            new_target=0, new_ready=0)
            try:
                self._start_pool(new, first if old is not None else opts.workers)
            except Exception as exc:
                self._abort(state, f"the new pool could not start: {exc}")
            return
        mon = new.monitor
        # A new worker that died, or is not accepting within ready_timeout: abort.
        for index, w in mon._slots.items():
            if w.last_exit is not None:
                self._abort(state, f"new worker {w.name} (pid {w.last_exit.pid}) "
                                   f"{w.last_exit.describe()}")
                return
            asked = new.wanted_at.get(index)
            if not w.ready and asked is not None and now - asked > opts.ready_timeout:
                self._abort(state, f"new worker {w.name} (pid "
                                   f"{w.proc.pid if w.proc else None}) did not accept "
                                   f"within ready_timeout={opts.ready_timeout:g}s")
                return
        new_ready, _ = new.counts()
        old_alive = old.counts()[1] if old is not None else 0
        new_target, old_target = plan(
            opts.workers, opts.max_surge, opts.max_unavailable, old_alive=old_alive,
            old_target=old.target if old is not None else 0, new_target=new.target,
            new_ready=new_ready)
        if old is not None and old_target < old.target:
            self._scale(old, old_target)
        if new_target > new.target:
            self._scale(new, new_target)
        if not self._announced_ready and new_ready >= opts.wanted_ready and old is None:
            self._announce_ready(new_ready)
        self.notifier.status(self._status_line())
        if new_ready >= opts.workers and (old is None or (old.target == 0 and old_alive == 0)):
            self._finish_reload(state)

    def _finish_reload(self, state: Reload) -> None:
        old, new = state.old, state.new
        self.reload_state = None
        self.current = new
        if old is not None:
            old.stopping = True
            if old.monitor is not None and not old.finished:
                old.monitor.request_stop(self.options.graceful_timeout + 5.0, signal.SIGTERM)
            log.info("serve %s: reload done in %.2fs: generation %d serves (%d workers)",
                     self.options.name, time.monotonic() - state.began, new.number,
                     self.options.workers)
        if old is not None or not self._announced_ready:
            self._announce_ready(self.options.workers)
        else:
            self.notifier.status(self._status_line())
        for waiter in state.waiters:
            waiter(None)

    def _announce_ready(self, ready: int) -> None:
        self._announced_ready = True
        self.notifier.ready(self._status_line(ready))

    def _abort(self, state: Reload, reason: str) -> None:
        """The new generation failed: the old one keeps serving (scaled back to N)."""
        state.failed = reason
        state.restoring_since = time.monotonic()
        first = state.old is None
        log.log(logging.INFO if self.stopping else logging.ERROR,
                "serve %s: %s of generation %d failed: %s%s", self.options.name,
                  "start" if first else "reload", state.new.number, reason,
                  "" if first else f"; generation {state.old.number} keeps serving"
                  if state.old else "")
        for waiter in state.waiters:
            waiter(reason)
        state.waiters.clear()
        if state.old is not None:
            self._scale(state.old, self.options.workers)
        else:
            if not self.stopping:  # a stop during the first start ends its workers: no failure
                self.exit_code = 1
            self.stop("the first start failed")
        self._advance_abort(state, time.monotonic())

    def _advance_abort(self, state: Reload, now: float) -> None:
        """The old pool back at N ready (or a ready_timeout spent trying): drain the new one."""
        old, new = state.old, state.new
        if old is not None:
            old_ready, _ = old.counts()
            if old_ready < self.options.workers and (
                    now - state.restoring_since < self.options.ready_timeout):
                # Its ready workers serve until the old ones are back.
                return
        if new.monitor is not None and not new.finished and not new.stopping:
            new.stopping = True
            new.monitor.request_stop(self.options.graceful_timeout + 5.0, signal.SIGTERM)
        if new.sup is None:
            new.stopping = True
        self.reload_state = None
        if old is not None:
            self._announce_ready(old.counts()[0])

    def _retire_finished(self) -> None:
        """Generations whose pool has ended: retire their zygotes (off the loop thread)."""
        state = self.reload_state
        for gen in list(self.generations):
            in_use = (gen is self.current and not self.stopping) or (
                state is not None and gen is state.new and not gen.stopping)
            if in_use or not gen.zygote_done or not gen.finished:
                continue
            if gen.sup is None and not (gen.stopping or self.stopping):
                continue
            self.generations.remove(gen)
            if self._probe is not None and gen.sup is not None:
                # Its series leave /metrics with it: the pool label stays bounded.
                self._probe.remove(self._pool_name(gen))
            zygote = gen.zygote
            if zygote is not None:
                thread = threading.Thread(target=zygote.retire, daemon=True,
                                          name=f"corral-zygote-retire[{zygote.name}]")
                thread.start()
                self._retiring.append(thread)

    def _count_processes(self) -> None:
        alive = sum(g.counts()[1] for g in self.generations)
        self.max_workers_alive = max(self.max_workers_alive, alive)

    def _status_line(self, ready: int | None = None) -> str:
        gen = self.current
        state = self.reload_state
        if ready is None:
            ready = gen.counts()[0] if gen is not None else 0
        text = (f"{ready}/{self.options.workers} workers ready, generation "
                f"{gen.number if gen else '-'}")
        if state is not None and state.old is not None:
            text += f"; reloading to generation {state.new.number} ({state.new.counts()[0]} ready)"
        return text

    # ------------------------------------------------------------------------------ recycling

    def _advance_recycling(self) -> None:
        """max_requests / max_memory / max_age go through the surge path: an extra worker is
        started and ready before the one to recycle is restarted, then the extra one leaves."""
        gen = self.current
        if gen is None or gen.monitor is None:
            return
        rec = self._recycling
        mon = gen.monitor
        n = self.options.workers
        if rec is None:
            index = self._pick_recycle(gen)
            if index is None:
                return
            self._recycling = {"index": index, "phase": "surge", "since": time.monotonic()}
            self._scale(gen, n + 1)
            return
        index, phase = rec["index"], rec["phase"]
        slots = mon._slots
        if phase == "surge":
            extra = slots.get(n)
            if extra is not None and extra.ready:
                rec["phase"] = "restart"
                w = slots.get(index)
                if w is not None:
                    mon.submit(mon.do_restart, index)
                rec["since"] = time.monotonic()
            elif time.monotonic() - rec["since"] > self.options.ready_timeout:
                self._scale(gen, n)
                self._recycling = None
        elif phase == "restart":
            w = slots.get(index)
            if w is None or (w.ready and w.proc is not None
                             and w.proc.started > rec["since"]) or (
                    time.monotonic() - rec["since"] > self.options.ready_timeout
                    + self.options.graceful_timeout + 5):
                self._scale(gen, n)
                self._recycling = None

    def _arm_recycle_look(self) -> None:
        if self._look_timer is None and (self.options.max_age is not None
                                         or self.options.max_memory is not None):
            self._recycle_look()

    def _recycle_look(self) -> None:
        # Age and memory need a look now and then (max_requests wakes the loop itself);
        # not once stopping (a host's loop outlives this server).
        self._look_timer = None if self.stopping else self.reactor.call_later(
            1.0, self._recycle_look)

    def _pick_recycle(self, gen: Generation) -> int | None:
        mon = gen.monitor
        now = time.monotonic()
        opts = self.options
        for index, w in sorted(mon._slots.items()):
            if index >= opts.workers or not w.ready or w.proc is None:
                continue
            reading = mon._hb.read(index)
            why = None
            if reading.status.startswith(RECYCLE_STATUS):
                why = reading.status[len(RECYCLE_STATUS) + 2:]
            elif opts.max_age is not None and now - w.proc.started > opts.max_age * (
                    1 + 0.1 * ((index * 7919) % 11 - 5) / 5):
                why = f"age > max_age {opts.max_age:g}s"
            elif (opts.max_memory is not None and now - self._memory_at >= 1.0
                  and _rss(w.proc.pid) > opts.max_memory):
                why = f"RSS > max_memory {opts.max_memory}"
            if why is not None:
                log.info("serve %s: recycling %s: %s (its replacement starts first)",
                         opts.name, w.who, why)
                return int(index)
        if opts.max_memory is not None and now - self._memory_at >= 1.0:
            self._memory_at = now
        return None

    # ---------------------------------------------------------------------------- stopping

    def stop(self, why: str, quick: bool = False) -> None:
        """Drain every worker, then close the listeners (last). ``shutdown_delay`` first."""
        if self.stopping and not quick:
            return
        first = not self.stopping
        self.stopping = True
        if first:
            self._stop_why = why
            log.info("serve %s: stopping (%s)", self.options.name, why)
            self.notifier.stopping(f"stopping ({why})")
        delay = 0.0 if quick else self.options.shutdown_delay
        if delay > 0 and first:
            log.info("serve %s: still accepting for shutdown_delay=%gs before the drain",
                     self.options.name, delay)
            self.notifier.extend_timeout(delay + self.options.graceful_timeout + 10)
            self._drain_at = time.monotonic() + delay
            self.reactor.call_later(delay, self._drain_all, quick)
            self._publish()  # /readyz says 503 from now on, while the workers still accept
        else:
            self._drain_all(quick)

    def _drain_all(self, quick: bool) -> None:
        grace = 0.0 if quick else self.options.graceful_timeout + 5.0
        self._stop_deadline = time.monotonic() + grace
        self._drain_at = None
        state = self.reload_state
        if state is not None and state.waiters:
            for waiter in state.waiters:
                waiter("corral serve is stopping")
            state.waiters.clear()
        for gen in self.generations:
            mon = gen.monitor
            if mon is not None and not gen.finished:
                mon.request_stop(grace, signal.SIGKILL if quick else signal.SIGTERM)
        if grace > 5:
            self.notifier.keep_extending(self.reactor, self.stop_left)
        self._publish()

    def stop_left(self) -> float | None:
        """A bound on the seconds a stop may still take (for EXTEND_TIMEOUT_USEC): the rest of
        shutdown_delay and the drain, or all of them if not stopping yet; None once every
        worker has ended."""
        if all(g.finished for g in self.generations):
            return None
        now = time.monotonic()
        drain = self.options.graceful_timeout + 5.0
        if self._drain_at is not None:  # still in shutdown_delay
            return self._drain_at - now + drain
        if self._stop_deadline < math.inf:
            return self._stop_deadline - now
        return self.options.shutdown_delay + drain

    def _start_watchdog(self) -> None:
        self.notifier.start_watchdog(self.reactor)

    # ---------------------------------------------------------------------- control socket

    def _dispatch(self, command: str, args: dict[str, Any], peer: Any) -> Any:
        from corral._control import CommandError, Deferred

        if command == "reload":
            deferred = Deferred()

            def done(error: str | None) -> None:
                if error is None:
                    gen = self.current
                    deferred.resolve({"message": f"{self.options.name}: reloaded: generation "
                                                 f"{gen.number if gen else '-'} serves"})
                else:
                    deferred.fail(f"{self.options.name}: reload failed: {error}",
                                  "reload_failed")

            log.info("control: reload from uid %s pid %s", peer.uid, peer.pid)
            self.reload("corral reload", done)
            return deferred
        if command == "status":
            return self.status()
        if command in ("scale", "signal"):
            return self._dispatch_workers(command, args, peer)
        raise CommandError(f"corral serve knows reload, status, scale and signal, not "
                           f"{command!r}", "unknown_command")

    def _dispatch_workers(self, command: str, args: dict[str, Any], peer: Any) -> Any:
        """``corral scale NAME N`` and ``corral signal NAME[:INDEX] SIG``."""
        from corral._control import CommandError

        name = args.get("program")
        if name != self.options.name:
            raise CommandError(f"no program {name!r} (this corral serve serves "
                               f"{self.options.name!r})", "unknown_program")
        log.info("control: %s %s from uid %s pid %s", command,
                 {k: v for k, v in args.items() if k != "program"}, peer.uid, peer.pid)
        if command == "scale":
            return self.scale_command(args.get("numprocs"))
        return self.signal_command(args.get("index"), args.get("signal"))

    def scale_command(self, n: Any) -> dict[str, Any]:
        """:meth:`scale` for a control socket (``corral serve``'s, ``corral run``'s): its
        answer, or CommandError."""
        from corral._control import CommandError

        try:
            self.scale(n)
        except (TypeError, ValueError) as exc:
            raise CommandError(f"{self.options.name}: {exc}", "bad_args") from None
        except RuntimeError as exc:
            raise CommandError(str(exc), "refused") from None
        gen = self.current
        return {"message": f"{self.options.name}: scaled to {n} (generation "
                           f"{gen.number if gen is not None else '-'})"}

    def signal_command(self, index: Any, sig_text: Any) -> Any:
        """:meth:`signal_workers` for a control socket: a Deferred answered once the signal
        was sent, or CommandError."""
        from corral._control import CommandError, answer_when_done
        from corral.cli.config import parse_signal

        try:
            sig = parse_signal(sig_text)
        except (TypeError, ValueError) as exc:
            raise CommandError(str(exc), "bad_args") from None
        try:
            replies = self.signal_workers(index, int(sig))
        except ValueError as exc:
            raise CommandError(str(exc), "unknown_worker") from None
        except RuntimeError as exc:
            raise CommandError(str(exc), "not_started") from None
        who = self.options.name if index is None else f"{self.options.name}:{index}"
        return answer_when_done(replies, lambda counts: {
            "message": f"{who}: sent {sig.name} to {sum(counts)} worker(s)"})

    def status(self) -> dict[str, Any]:
        """A small JSON view: generations, workers, listeners."""
        from corral import _json as schema

        programs = []
        for gen in self.generations:
            mon = gen.monitor
            workers = [schema.worker_to_json(ws) for ws in
                       (mon._build_status() if mon is not None else ())]
            programs.append(schema.program_to_json(self._pool_name(gen), "serve", workers,
                                                   numprocs=gen.target, gave_up=False))
        import corral

        return schema.status_payload(programs, pid=os.getpid(), version=corral.__version__,
                                     uptime=time.time() - self.started_at, config=None,
                                     socket=self.control_socket)


class _Names:
    """``PoolSpec.names``: ``web.N`` (the generation is in the pool's name)."""

    def __init__(self, name: str, generation: int) -> None:
        self.name = name
        self.generation = generation

    def __call__(self, index: int) -> str:
        return f"{self.name}.{index}"


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def options_with(options: ServeOptions, **changes: Any) -> ServeOptions:
    return replace(options, **changes)
