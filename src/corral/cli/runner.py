"""``corral run``: every program of a config supervised from one loop thread.

One :class:`~corral._reactor.Reactor`, driven by the main thread, carries everything of a running
corral: every program's pool (its monitor hosted on the reactor), every ``[serve.NAME]``'s
server (:mod:`corral.cli._serves`: its generations' pools, its rolling reloads), the workers' log
pipes (one :class:`~corral._logs.LogHub`), their notify sockets and readiness probes, and the
control socket.
Each pool keeps its own spawner thread (processes are started off the loop). Signal handlers
only hand work to the loop.

    SIGTERM/SIGINT: stop every program (dependents first) and drain every serve, then exit
    SIGHUP: reload the config (like `corral reload`)
    SIGCHLD: reap adopted orphans (corral is a child subreaper, or PID 1 in a container)

Under systemd it tells ``$NOTIFY_SOCKET`` about the whole config (:mod:`corral.cli._sdnotify`)
and takes systemd's sockets by name for its serves and programs
(:mod:`corral.cli._activation`).

With ``--http HOST:PORT`` (or ``http = "HOST:PORT"`` in the file) a
:class:`~corral.endpoint.Endpoint`, on a thread of its own, serves /metrics /livez /readyz
/status for every program and serve: one source per name (:class:`_ProgramSource`,
:class:`~corral.cli._serves._ServeSource`), which asks whichever pool runs it now, so reloads
and scaling need no re-registration.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import corral
from corral import _json as schema
from corral._control import (
    CommandError,
    ControlServer,
    ControlSocketError,
)
from corral._logs import (
    LOG_SCHEMA,
    ConsoleSink,
    FileSink,
    JsonLinesSink,
    LogHub,
)
from corral._reactor import Reactor
from corral.cli._activation import Activation
from corral.cli._commands import CommandsPart, _Resources
from corral.cli._orphans import _Adopted, _become_subreaper, _kill_adopted
from corral.cli._programs import ProgramIO, _Program, _ProgramSource
from corral.cli._sdnotify import SystemdPart
from corral.cli._serves import _ServeSource
from corral.cli.config import Config, ConfigError, LogConfig, ProgramConfig
from corral.cli.main import RunOptions
from corral.cli.preflight import check_targets
from corral.events import Event, EventKind

if TYPE_CHECKING:
    from corral.endpoint import Endpoint

__all__ = ["run"]

log = logging.getLogger("corral.run")

_PR_SET_CHILD_SUBREAPER = 36
_EVENTS_KEPT = 1000
# At shutdown, how long the workers' output corral has read (or that waits in their pipes)
# may take to reach a slow console or log FIFO before what is left is dropped (and counted).
LOG_FLUSH_TIMEOUT = 5.0


def run(options: RunOptions) -> int:
    """``corral run``: supervise until stopped; the exit code (0, or 1 if a program gave up)."""
    return CorralRun(options).run()


@dataclass
class _Follower:
    channel: Any
    programs: set[str] | None = None
    json: bool = field(default=True)


class CorralRun(CommandsPart, SystemdPart):
    """A running ``corral run`` (one per process)."""

    def __init__(self, options: RunOptions) -> None:
        self.options = options
        self.config = options.config
        self.reactor: Reactor[Any] = Reactor("corral")
        self.hub = LogHub(self.reactor, self._sinks(self.config, options.json_logs),
                          ring_lines=self.config.log.ring_lines,
                          ring_bytes=self.config.log.ring_bytes)
        self.programs: dict[str, _Program] = {}
        # A program's listening sockets, by (name, its listen setting): bound once, kept across
        # its restarts and a config reload that does not change them, closed last.
        self._listeners: dict[tuple[str, tuple[tuple[str, str], ...]], list[Any]] = {}
        self.events: deque[dict[str, Any]] = deque(maxlen=_EVENTS_KEPT)
        self.event_followers: list[Any] = []
        self.started_at = time.monotonic()
        self.stopping = False
        self.control: ControlServer | None = None
        self._pending: list[str] = []  # programs waiting for their dependencies
        # A reload: changed programs (old pool, new program) until the old one has ended,
        # removed ones until theirs has.
        self._replacing: dict[str, tuple[_Program, _Program]] = {}
        self._removing: list[_Program] = []
        self._closing_sinks: list[str] = []
        self._signals: list[int] = []
        self._signals_seen: deque[int] = deque()  # appended by the handler, drained by the loop
        self._resources = _Resources()
        self._adopted = _Adopted()
        self._sweep_timer: Any = None
        self._wakeup_set = False
        self.endpoint: Endpoint | None = None
        self._served: set[str] = set()  # the program (and serve) names the endpoint serves
        self._stop_why = ""
        self._init_serves()
        self.activation = Activation()  # systemd's sockets, adopted as run() begins
        self._init_systemd()

    # ------------------------------------------------------------------------------ set-up

    def _sinks(self, config: Config, json_logs: bool) -> list[Any]:
        console: ConsoleSink | JsonLinesSink = (
            JsonLinesSink(self.reactor) if json_logs
            else ConsoleSink(self.reactor, timestamps=config.log.timestamps))
        self.console = console
        self._console_programs(config)
        sinks: list[Any] = [console]
        self.file_sinks: dict[str, FileSink] = {}
        for prog in config.programs.values():
            sink = self._file_sink(prog.name, prog.log)
            if sink is not None:
                sinks.append(sink)
        for name in config.serve:  # a serve takes the [log] defaults
            sink = self._file_sink(name, config.log)
            if sink is not None:
                sinks.append(sink)
        return sinks

    def _console_programs(self, config: Config) -> None:
        """The console takes the programs whose ``log.console`` is on (reloads change it),
        and the serves when ``[log] console`` is."""
        self.console.programs = frozenset(
            [name for name, prog in config.programs.items() if prog.log.console]
            + ([*config.serve] if config.log.console else []))

    def _file_sink(self, name: str, settings: LogConfig) -> FileSink | None:
        path = settings.file_for(name)
        if not path:
            return None
        try:
            sink = FileSink(path, self.reactor, max_bytes=settings.max_bytes,
                            backups=settings.backups, json=settings.file_json,
                            programs=[name])
        except OSError as exc:
            log.error("%s: cannot open its log file %s (%s); its output goes to the console "
                      "and the ring only", name, path, exc.strerror or exc)
            return None
        self.file_sinks[name] = sink
        return sink

    def _serve_file_sink(self, name: str, present: bool) -> None:
        """A serve added (its file opened) or gone (its file closed) by a reload."""
        sink = self.file_sinks.pop(name, None)
        if sink is not None:
            self.hub.remove_sink(sink)
            sink.close()
        if present:
            fresh = self._file_sink(name, self.config.log)
            if fresh is not None:
                self.hub.add_sink(fresh)

    def _replace_file_sink(self, old: ProgramConfig | None, new: ProgramConfig | None) -> None:
        """On a reload: a program's log file settings changed (or it came or went)."""
        if old is not None and new is not None and old.log == new.log:
            return
        name = (old or new).name  # type: ignore[union-attr]
        sink = self.file_sinks.pop(name, None)
        if sink is not None:
            self.hub.remove_sink(sink)
            sink.close()
        if new is not None:
            fresh = self._file_sink(new.name, new.log)
            if fresh is not None:
                self.hub.add_sink(fresh)

    def run(self) -> int:
        _console_logging(self.options.json_logs)
        try:
            self.activation = Activation.from_environment()
        except OSError as exc:
            log.error("socket activation: %s", exc)
            self.hub.close()
            self.reactor.close()
            return 6
        # Every target imported before anything starts (a missing module is named now).
        problems = check_targets(self.config, self.options.config_dir, load=True)
        problems += self.activation.check(self.config)
        if problems:
            self.activation.close()
            log.error("%s", ConfigError(problems))
            self.hub.close()
            self.reactor.close()
            return 6  # LSB: not configured
        self.activation.warn_unmatched(self.config)
        _become_subreaper()
        self.control = ControlServer(self.reactor, self.options.socket, self.dispatch,
                                     allow_uids=self.config.allow_uids,
                                     allow_gids=self.config.allow_gids)
        try:
            self.control.start()
        except ControlSocketError as exc:
            log.error("%s", exc)
            self.activation.close()
            self.reactor.close()
            return 1
        except OSError as exc:  # cannot be bound (a path too long, a read-only directory...)
            log.error("control socket %s: %s", self.options.socket, exc.strerror or exc)
            self.activation.close()
            self.reactor.close()
            return 1
        try:
            for config in self.config.programs.values():
                self.listeners_for(config)
            for serve_cfg in self.config.serve.values():
                self.serves[serve_cfg.name] = self._make_serve(serve_cfg)
        except (OSError, ValueError) as exc:
            log.error("%s", exc)
            listening = False
        else:
            listening = True
        if not listening or not self._start_endpoint():
            self._close_serves()
            self._close_listeners()
            self.activation.close()
            self.control.close()
            self.hub.close()
            self.reactor.close()
            return 1
        self._install_signals()
        for name in self.config.start_order():
            if name in self.config.programs:
                self.programs[name] = _Program(self.config.programs[name],
                                               ProgramIO(self, self.config.programs[name]))
                self._pending.append(name)
        self._sync_endpoint()
        try:
            self._sd_begin()
            for serve in self.serves.values():  # no dependencies: they start at once
                self._begin_serve(serve)
            self._start_ready_programs()
            while not self._done():
                self.reactor.run_once()
                self._advance_serves()
                if self.stopping:
                    self._advance_stop()
                if self._replacing or self._removing:
                    self._advance_replacing()
                self._start_ready_programs()
                self._advance_systemd()
        except BaseException:
            log.critical("corral's loop failed; stopping every program", exc_info=True)
            for prog in self.programs.values():
                if prog.monitor is not None and not prog.finished:
                    prog.monitor.request_stop(0.0, signal.SIGKILL)
            for serve in self.serves.values():
                with contextlib.suppress(Exception):
                    self._stop_serve(serve, "corral's loop failed", quick=True)
            self._drain_until_finished(10.0)
            raise
        finally:
            self._shutdown()
        return 1 if any(p.monitor is not None and p.monitor.gave_up is not None
                        for p in self.programs.values()) or any(
            s.server.exit_code != 0 for s in self.serves.values()) else 0

    def _done(self) -> bool:
        if not self.stopping:
            return False
        progs = [*self.programs.values(), *self._removing,
                 *(old for old, _ in self._replacing.values())]
        return all(p.supervisor is None or p.finished for p in progs) and self._serves_done()

    def _drain_until_finished(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all(
                p.supervisor is None or p.finished for p in self.programs.values()):
            self.reactor.run_once(extra=time.monotonic() + 0.1)

    def listeners_for(self, prog: ProgramConfig) -> list[Any]:
        """The program's ``listen`` sockets, bound on first use (then kept).

        Raises:
            OSError: an address could not be bound.
        """
        if not prog.listen:
            return []
        key = (prog.name, prog.listen)
        if key not in self._listeners:
            from corral.serve._listeners import bind, close_all

            got: list[Any] = []
            try:
                for name, addr in prog.listen:
                    # systemd's socket named PROGRAM.NAME, if it passed one: never bound.
                    adopted = self.activation.for_listen(prog.name, name)
                    got.append(adopted if adopted is not None else bind(addr, name=name))
            except BaseException:
                close_all([x for x in got if x.origin == "bound"])
                raise
            self._listeners[key] = got
            log.info("%s: listening on %s (handed over as systemd does)", prog.name,
                     ", ".join(f"{x.name}={x.address}"
                               + (" (from systemd)" if x.origin == "systemd" else "")
                               for x in got))
        return self._listeners[key]

    def _close_listeners(self) -> None:
        if self._listeners:
            from corral.serve._listeners import close_all

            for listeners in self._listeners.values():
                # systemd's own are closed with the rest of them (Activation.close), last.
                close_all([x for x in listeners if x.origin != "systemd"])
            self._listeners.clear()

    def _shutdown(self) -> None:
        if self.endpoint is not None:
            # Before the loop goes: a request in flight may wait for it (1 s at most).
            self.endpoint.close()
            self.endpoint = None
        if self.control is not None:
            self.control.close()
        self._close_serves()  # each one's listeners closed after its workers have drained
        self._close_listeners()  # after every program has stopped: closed last
        self.activation.close()
        # Whatever the hub has not read or written yet (a slow console), for a bounded time:
        # the workers' last lines are often why they stopped. Then close it.
        try:
            flushed = self.hub.flush(lambda until: self.reactor.run_once(extra=until),
                                     LOG_FLUSH_TIMEOUT)
        except Exception:  # the loop itself failed (we may be here because of it)
            log.warning("logs: could not flush the workers' output at shutdown", exc_info=True)
        else:
            if not flushed:
                log.warning("logs: the workers' output is not all written %.0f s into the "
                            "shutdown; what is left is dropped", LOG_FLUSH_TIMEOUT)
        self.hub.close()
        _kill_adopted()
        for sig in self._signals:
            with contextlib.suppress(ValueError, OSError):
                signal.signal(sig, signal.SIG_DFL)
        if self._wakeup_set:
            signal.set_wakeup_fd(-1)
        self.reactor.close()

    # -------------------------------------------------------------------------- programs

    def _build(self, prog: ProgramConfig, io: ProgramIO) -> corral.Supervisor:
        kwargs = prog.pool_spec_kwargs()
        if prog.kind == "command":
            assert prog.command is not None
            kwargs.update(command=list(prog.command), env=prog.full_env(), cwd=prog.cwd,
                          user=prog.uid, group=prog.gid, umask=prog.umask)
            return corral.Supervisor(_host=self.reactor, _io=io, **kwargs)
        assert prog.target is not None
        module, _, attr = prog.target.partition(":")
        if self.options.config_dir and self.options.config_dir not in sys.path:
            sys.path.insert(0, self.options.config_dir)
        target = getattr(importlib.import_module(module), attr)
        # Where and as whom: applied in the worker after corral's bootstrap (corral._identity).
        kwargs.update(env=prog.full_env() if prog.env else None, cwd=prog.cwd,
                      user=prog.uid, group=prog.gid, umask=prog.umask)
        return corral.Supervisor(target, _host=self.reactor, _io=io, args=prog.target_args(),
                                 **kwargs)

    def _start_ready_programs(self) -> None:
        if self.stopping:
            return
        for name in list(self._pending):
            prog = self.programs[name]
            if all(self._dependency_ready(dep) for dep in prog.config.depends_on):
                self._pending.remove(name)
                self._start_program(prog)

    def _dependency_ready(self, name: str) -> bool:
        prog = self.programs.get(name)
        if prog is not None:
            return prog.ready
        serve = self.serves.get(name)
        return serve is not None and serve.ready

    def _start_program(self, prog: _Program) -> None:
        try:
            sup = self._build(prog.config, prog.io)
        except Exception as exc:
            log.error("program %r could not be set up: %s: %s", prog.config.name,
                      type(exc).__name__, exc)
            raise
        prog.supervisor = sup
        prog.io.supervisor = sup
        sup.subscribe(lambda ev: self._hand(self._on_event, ev))
        sup.start()
        prog.started = True

    def _hand(self, fn: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody to tell
            self.reactor.call_soon_threadsafe(fn, *args)

    def _on_event(self, ev: Event) -> None:
        self._publish(schema.event_to_json(ev))
        if ev.kind is EventKind.READY:
            self._start_ready_programs()

    def _publish(self, data: dict[str, Any]) -> None:
        self.events.append(data)
        for channel in list(self.event_followers):
            # A slow follower loses events (its channel counts them and tells it), never
            # slows us down.
            channel.send({"events": [data]})

    # ----------------------------------------------------------------------- http endpoint

    def _start_endpoint(self) -> bool:
        """``--http`` (or the file's ``http``): serve every program; False if it cannot."""
        address = self.options.http or self.config.http
        if address is None:
            return True
        from corral.endpoint import Endpoint

        try:
            self.endpoint = Endpoint(address, config=self.options.config_path,
                                     socket_path=self.options.socket,
                                     status=self._http_status).start()
        except (OSError, TypeError, ValueError) as exc:
            log.error("cannot serve /metrics: %s", exc)
            return False
        return True

    def _sync_endpoint(self) -> None:
        """The endpoint serves the programs of the config now (after a start or a reload;
        a removed program goes once its pool has ended)."""
        endpoint = self.endpoint
        if endpoint is None:
            return
        names = set(self.programs) | set(self.serves) | set(self._serve_replacing)
        for name in self._served - names:
            with contextlib.suppress(KeyError):
                endpoint.remove(name)
        for name in names - self._served:
            endpoint.add(_ProgramSource(self, name) if name in self.programs
                         else _ServeSource(self, name))
        self._served = names

    def _http_status(self) -> dict[str, Any]:
        """/status (the endpoint's thread): what ``corral status --json`` gets, built on the
        loop thread like every control command."""
        timeout = self.endpoint.timeout if self.endpoint is not None else 1.0
        done = threading.Event()
        box: list[Any] = []

        def build() -> None:
            try:
                box.append(self._cmd_status({}))
            except BaseException as exc:  # handed to the endpoint's thread, which logs it
                box.append(exc)
            finally:
                done.set()

        try:
            self.reactor.call_soon_threadsafe(build)
        except RuntimeError:
            raise TimeoutError("corral is shutting down") from None
        if not done.wait(timeout):
            raise TimeoutError(f"corral's loop did not answer within {timeout:g}s")
        if isinstance(box[0], BaseException):
            raise box[0]
        doc: dict[str, Any] = box[0]
        return doc

    # -------------------------------------------------------------------------- stopping

    def stop_all(self, why: str) -> None:
        if self.stopping:
            # Asked again (a second Ctrl-C): no more grace for anyone.
            log.warning("stopping every program now, with SIGKILL (%s again)", why)
            for prog in [*self.programs.values(), *self._removing,
                         *(old for old, _ in self._replacing.values())]:
                if prog.monitor is not None and not prog.finished:
                    prog.stop_requested = True
                    prog.monitor.request_stop(0.0, signal.SIGKILL)
            for serve in [*self.serves.values(), *self._serve_removing,
                          *self._serve_replacing.values()]:
                self._stop_serve(serve, why, quick=True)
            return
        log.info("stopping every program (%s)", why)
        self.stopping = True
        self._sd_stopping(why)
        self._stop_why = why
        self._pending.clear()
        self._advance_stop()

    def _advance_stop(self) -> None:
        """Stop each program once every program that depends on it has finished."""
        for prog in self.programs.values():
            if prog.supervisor is None or prog.stop_requested or prog.finished:
                continue
            dependents = [p for p in self.programs.values()
                          if prog.config.name in p.config.depends_on]
            if all(p.supervisor is None or p.finished for p in dependents):
                prog.stop_requested = True
                prog.monitor.request_stop(prog.config.stop_timeout,
                                          int(prog.config.stop_signal))
        for name, serve in self.serves.items():
            if serve.server.stopping:
                continue
            dependents = [p for p in self.programs.values() if name in p.config.depends_on]
            if all(p.supervisor is None or p.finished for p in dependents):
                # shutdown_delay, then the drain; its listeners are closed at exit.
                self._stop_serve(serve, self._stop_why)

    # --------------------------------------------------------------------------- signals

    def _install_signals(self) -> None:
        # The kernel may deliver a signal to any thread (a spawner, the events thread): the
        # main thread, blocked in epoll, would then only run the Python handler at its next
        # wake-up, maybe never. The C-level handler writes to the wake pipe instead.
        signal.set_wakeup_fd(self.reactor.wake_fd, warn_on_full_buffer=False)
        self._wakeup_set = True
        self.reactor.add_wake_callback(self._drain_signals)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)
            self._signals.append(sig)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        # Runs in the main thread between two bytecodes, which is also the loop thread: maybe
        # in the middle of call_soon_threadsafe, holding the reactor's lock (taking it again
        # here deadlocked `corral run -n 64` on SIGTERM, a SIGCHLD landing there). So only a
        # lock-free append: the C-level handler has already written to the wake pipe, and the
        # loop drains this after that batch (_drain_signals, a wake callback).
        self._signals_seen.append(signum)

    def _drain_signals(self) -> None:
        chld = False  # 64 workers ending at once are 64 SIGCHLDs: one sweep is enough
        while self._signals_seen:
            signum = self._signals_seen.popleft()
            if signum == signal.SIGCHLD:
                chld = True
            else:
                self._handle_signal(signum)
        if chld:
            self._handle_signal(signal.SIGCHLD)

    def _handle_signal(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stop_all(signal.Signals(signum).name)
        elif signum == signal.SIGHUP:
            try:
                self._reload()
            except CommandError:
                pass  # refused, and already logged: nothing changed
            except Exception:
                # A reload never takes corral (and every worker) down with it.
                log.exception("reload on SIGHUP failed; corral carries on")
        elif signum == signal.SIGCHLD:
            self._sweep_adopted()

    def _sweep_adopted(self) -> None:
        self._sweep_timer = None
        if self._adopted.sweep(self._known_pids(), time.monotonic()):
            self._sweep_timer = self.reactor.call_later(_Adopted.GRACE, self._sweep_adopted)

    def _known_pids(self) -> set[int]:
        pids: set[int] = set()
        for prog in self.programs.values():
            mon = prog.monitor
            if mon is not None:
                with mon._live_lock:
                    pids.update(mon._live)
        return pids | self._serve_pids()


def _console_logging(json_lines: bool) -> None:
    """corral's own lines (one per worker start, exit, restart...) on stderr, INFO and up,
    unless the environment configured logging already."""
    root = logging.getLogger("corral")
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s corral | %(message)s",
                                               datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        import json

        # corral.log/1 like the workers' lines, plus the level and the logger's name.
        return json.dumps({"schema": LOG_SCHEMA, "ts": round(record.created, 6),
                           "program": "corral", "index": None, "pid": os.getpid(),
                           "stream": "stderr", "line": record.getMessage(),
                           "level": record.levelname, "logger": record.name})


# ---------------------------------------------------------------------- orphans, PID 1
