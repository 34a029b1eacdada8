"""``corral run``: every program of a config supervised from one loop thread.

One :class:`~corral._reactor.Reactor`, driven by the main thread, carries everything of a running
corral: every program's pool (its monitor hosted on the reactor), the workers' log pipes (one
:class:`~corral._logs.LogHub`), their notify sockets and readiness probes, and the control socket.
Each pool keeps its own spawner thread (processes are started off the loop). Signal handlers
only hand work to the loop.

    SIGTERM/SIGINT: stop every program (dependents first), then exit
    SIGHUP: reload the config (like `corral reload`)
    SIGCHLD: reap adopted orphans (corral is a child subreaper, or PID 1 in a container)
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import corral
from corral._command import Launch
from corral._control import (
    CommandError,
    ControlServer,
    ControlSocketError,
    Deferred,
    Peer,
    Stream,
)
from corral._logs import ConsoleSink, FileSink, JsonLinesSink, LogHub, LogRecord, record_to_json
from corral._notify import NotifyMessage, NotifySocket
from corral._reactor import Reactor
from corral._readiness import LogMatcher, Prober, ReadyHttp, ReadyLog, ReadyNotify, ReadyTcp
from corral._reply import Reply
from corral.cli import schema
from corral.cli.config import Config, ConfigError, ProgramConfig, diff, load, parse_signal
from corral.cli.main import RunOptions
from corral.cli.preflight import check_commands, check_targets
from corral.events import Event, EventKind
from corral.process import ProcessLike, own_fd

__all__ = ["run"]

log = logging.getLogger("corral.run")

_PR_SET_CHILD_SUBREAPER = 36
_EVENTS_KEPT = 1000


def run(options: RunOptions) -> int:
    """``corral run``: supervise until stopped; the exit code (0, or 1 if a program gave up)."""
    return CorralRun(options).run()


class ProgramIO:
    """The worker IO of one program: log pipes, a notify socket per worker, readiness probes.

    Runs on the loop thread (the monitor calls it there, hosted on the same reactor).
    """

    def __init__(self, run: CorralRun, prog: ProgramConfig) -> None:
        self.run = run
        self.prog = prog
        self.pids: dict[int, int] = {}  # index -> the pid of its current process
        self.notify: dict[int, NotifySocket] = {}
        self.probes: dict[int, Prober] = {}
        self.kept: dict[int, Launch] = {}  # target workers: pipe ends kept until they exit
        self.supervisor: corral.Supervisor | None = None
        self._unfollow: Callable[[], None] | None = None
        if isinstance(prog.ready, ReadyLog):
            self._matcher = LogMatcher(prog.ready)
            self._unfollow = run.hub.follow(self._on_log, programs=[prog.name])

    @property
    def _monitor(self) -> Any:
        return self.supervisor._monitor if self.supervisor is not None else None

    # WorkerIO
    def launch(self, index: int, name: str) -> Launch:
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        for fd in (out_r, err_r):
            own_fd(fd)  # a fork-started sibling must not hold our read ends
        # Like supervisord's process_num: a command can tell which worker it is (a port
        # offset, a shard).
        env = {"CORRAL_PROGRAM": self.prog.name, "CORRAL_INDEX": str(index),
               "CORRAL_WORKER": name}
        if self.prog.needs_notify_socket:
            env["NOTIFY_SOCKET"] = self._notify_socket(index, name).address
            if self.prog.heartbeat_timeout is not None:
                env["WATCHDOG_USEC"] = str(int(self.prog.heartbeat_timeout * 1e6))
        return Launch(env=env, stdout=out_w, stderr=err_w, readers=(out_r, err_r),
                      listeners=tuple(self.run.listeners_for(self.prog)))

    def started(self, index: int, name: str, proc: ProcessLike, launch: Launch) -> None:
        self.pids[index] = proc.pid
        out_r, err_r = launch.readers
        launch.readers = ()  # the hub owns (and closes) them from here on
        self.run.hub.attach(out_r, self.prog.name, index, proc.pid, "stdout")
        self.run.hub.attach(err_r, self.prog.name, index, proc.pid, "stderr")
        if self.prog.kind == "target":
            self.kept[index] = launch  # the worker opens them through /proc as it boots
        ready = self.prog.ready
        if isinstance(ready, ReadyTcp | ReadyHttp):
            pid = proc.pid
            self.probes[index] = Prober(self.run.reactor, ready,
                                        lambda: self._ready(index, pid))

    def not_started(self, launch: Launch) -> None:
        launch.close_child_ends()
        launch.close_readers()

    def ended(self, index: int, pid: int) -> None:
        if self.pids.get(index) == pid:
            del self.pids[index]
        probe = self.probes.pop(index, None)
        if probe is not None:
            probe.cancel()
        kept = self.kept.pop(index, None)
        if kept is not None:
            kept.close_child_ends()

    def close(self) -> None:
        for probe in self.probes.values():
            probe.cancel()
        self.probes.clear()
        for sock in self.notify.values():
            sock.close()
        self.notify.clear()
        for kept in self.kept.values():
            kept.close_child_ends()
        self.kept.clear()
        if self._unfollow is not None:
            self._unfollow()
            self._unfollow = None

    # readiness and heartbeats
    def _notify_socket(self, index: int, name: str) -> NotifySocket:
        sock = self.notify.get(index)
        if sock is None:
            def accept(pid: int) -> bool:
                current = self.pids.get(index)
                if current is None:
                    return False
                try:
                    return pid == current or os.getpgid(pid) == current
                except OSError:
                    return False

            sock = self.notify[index] = NotifySocket(
                self.run.reactor, lambda msg: self._on_notify(index, msg), accept_pid=accept,
                name=name)
        return sock

    def _on_notify(self, index: int, msg: NotifyMessage) -> None:
        pid = self.pids.get(index)
        monitor = self._monitor
        if pid is None or monitor is None:
            return
        if msg.status is not None:
            monitor.mark_status(index, pid, msg.status)
        if msg.watchdog:
            monitor.mark_beat(index, pid)
        if msg.ready and isinstance(self.prog.ready, ReadyNotify):
            monitor.mark_ready(index, pid)
        if msg.stopping:
            log.info("%s.%d (pid %d) says it is stopping", self.prog.name, index, pid)

    def _ready(self, index: int, pid: int) -> None:
        monitor = self._monitor
        if monitor is not None:
            monitor.mark_ready(index, pid)
        self.probes.pop(index, None)

    def _on_log(self, records: Sequence[LogRecord], dropped: int) -> None:
        for rec in records:
            if rec.pid is not None and self.pids.get(rec.index) == rec.pid and (
                    self._matcher.feed(rec.text.decode("utf-8", "replace"))):
                self._ready(rec.index, rec.pid)


@dataclass
class _Program:
    config: ProgramConfig
    io: ProgramIO
    supervisor: corral.Supervisor | None = None
    started: bool = False
    stop_requested: bool = False

    @property
    def monitor(self) -> Any:
        return self.supervisor._monitor if self.supervisor is not None else None

    @property
    def finished(self) -> bool:
        mon = self.monitor
        return mon is not None and mon.finished.is_set()

    @property
    def ready(self) -> bool:
        """Every worker RUNNING (ready): what its dependents wait for."""
        mon = self.monitor
        if mon is None or mon.finished.is_set():
            return False
        slots = mon._slots
        # Hosted, the pool's slots appear when the loop runs its begin(): none yet is not
        # "all ready" (unless it has no worker at all).
        if not slots and self.config.numprocs:
            return False
        return all(w.state.value == "running" and w.ready for w in slots.values())


@dataclass
class _Follower:
    channel: Any
    programs: set[str] | None = None
    json: bool = field(default=True)


class CorralRun:
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
        self._resources = _Resources()
        self._adopted = _Adopted()
        self._sweep_timer: Any = None
        self._wakeup_set = False

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
            sink = self._file_sink(prog)
            if sink is not None:
                sinks.append(sink)
        return sinks

    def _console_programs(self, config: Config) -> None:
        """The console takes the programs whose ``log.console`` is on (reloads change it)."""
        self.console.programs = frozenset(
            name for name, prog in config.programs.items() if prog.log.console)

    def _file_sink(self, prog: ProgramConfig) -> FileSink | None:
        path = prog.log.file_for(prog.name)
        if not path:
            return None
        try:
            sink = FileSink(path, self.reactor, max_bytes=prog.log.max_bytes,
                            backups=prog.log.backups, json=prog.log.file_json,
                            programs=[prog.name])
        except OSError as exc:
            log.error("%s: cannot open its log file %s (%s); its output goes to the console "
                      "and the ring only", prog.name, path, exc.strerror or exc)
            return None
        self.file_sinks[prog.name] = sink
        return sink

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
            fresh = self._file_sink(new)
            if fresh is not None:
                self.hub.add_sink(fresh)

    def run(self) -> int:
        _console_logging(self.options.json_logs)
        # Every target imported before anything starts (a missing module is named now).
        problems = check_targets(self.config, self.options.config_dir, load=True)
        if problems:
            log.error("%s", ConfigError(problems))
            self.hub.close()
            self.reactor.close()
            return 6  # LSB: not configured
        _become_subreaper()
        self.control = ControlServer(self.reactor, self.options.socket, self.dispatch,
                                     allow_uids=self.config.allow_uids,
                                     allow_gids=self.config.allow_gids)
        try:
            self.control.start()
        except ControlSocketError as exc:
            log.error("%s", exc)
            self.reactor.close()
            return 1
        try:
            for config in self.config.programs.values():
                self.listeners_for(config)
        except (OSError, ValueError) as exc:
            log.error("%s", exc)
            self._close_listeners()
            self.control.close()
            self.hub.close()
            self.reactor.close()
            return 1
        self._install_signals()
        for name in self.config.start_order():
            self.programs[name] = _Program(self.config.programs[name],
                                           ProgramIO(self, self.config.programs[name]))
            self._pending.append(name)
        try:
            self._start_ready_programs()
            while not self._done():
                self.reactor.run_once()
                if self.stopping:
                    self._advance_stop()
                if self._replacing or self._removing:
                    self._advance_replacing()
                self._start_ready_programs()
        except BaseException:
            log.critical("corral's loop failed; stopping every program", exc_info=True)
            for prog in self.programs.values():
                if prog.monitor is not None and not prog.finished:
                    prog.monitor.request_stop(0.0, signal.SIGKILL)
            self._drain_until_finished(10.0)
            raise
        finally:
            self._shutdown()
        return 1 if any(p.monitor is not None and p.monitor.gave_up is not None
                        for p in self.programs.values()) else 0

    def _done(self) -> bool:
        if not self.stopping:
            return False
        progs = [*self.programs.values(), *self._removing,
                 *(old for old, _ in self._replacing.values())]
        return all(p.supervisor is None or p.finished for p in progs)

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
            from corral.serve._listeners import bind_all

            names = [name for name, _ in prog.listen]
            self._listeners[key] = bind_all([addr for _, addr in prog.listen], names=names)
            log.info("%s: listening on %s (handed over as systemd does)", prog.name,
                     ", ".join(f"{x.name}={x.address}" for x in self._listeners[key]))
        return self._listeners[key]

    def _close_listeners(self) -> None:
        if self._listeners:
            from corral.serve._listeners import close_all

            for listeners in self._listeners.values():
                close_all(listeners)
            self._listeners.clear()

    def _shutdown(self) -> None:
        if self.control is not None:
            self.control.close()
        self._close_listeners()  # after every program has stopped: closed last
        # Whatever the hub has not read yet, then close it.
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
        return corral.Supervisor(target, _host=self.reactor, _io=io, args=prog.target_args(),
                                 **kwargs)

    def _start_ready_programs(self) -> None:
        if self.stopping:
            return
        for name in list(self._pending):
            prog = self.programs[name]
            if all(self.programs[dep].ready for dep in prog.config.depends_on):
                self._pending.remove(name)
                self._start_program(prog)

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
            return
        log.info("stopping every program (%s)", why)
        self.stopping = True
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

    # --------------------------------------------------------------------------- signals

    def _install_signals(self) -> None:
        # The kernel may deliver a signal to any thread (a spawner, the events thread): the
        # main thread, blocked in epoll, would then only run the Python handler at its next
        # wake-up, maybe never. The C-level handler writes to the wake pipe instead.
        signal.set_wakeup_fd(self.reactor.wake_fd, warn_on_full_buffer=False)
        self._wakeup_set = True
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)
            self._signals.append(sig)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        # Runs in the main thread between two bytecodes: only hand the work to the loop.
        self._hand(self._handle_signal, signum)

    def _handle_signal(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stop_all(signal.Signals(signum).name)
        elif signum == signal.SIGHUP:
            with contextlib.suppress(CommandError):
                self._reload()
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
        return pids

    # ------------------------------------------------------------------- control commands

    def dispatch(self, command: str, args: dict[str, Any], peer: Peer) -> Any:
        handler = getattr(self, f"_cmd_{command}", None)
        if handler is None:
            raise CommandError(f"unknown command {command!r}", "unknown_command")
        if command in _QUERIES:
            # `corral top` asks every second: queries are not worth a line or an event.
            log.debug("control: %s %s from uid %d pid %d", command, args or "", peer.uid,
                      peer.pid)
        else:
            log.info("control: %s%s from uid %d pid %d", command, _describe_args(args),
                     peer.uid, peer.pid)
            self._publish(schema.command_event(command, args, uid=peer.uid, gid=peer.gid,
                                               pid=peer.pid))
        return handler(args)

    def _program(self, name: Any) -> _Program:
        prog = self.programs.get(name) if isinstance(name, str) else None
        if prog is None:
            raise CommandError(f"no program {name!r} (programs: "
                               f"{', '.join(sorted(self.programs)) or 'none'})",
                               "unknown_program")
        if prog.supervisor is None:
            raise CommandError(f"program {name!r} has not started yet (waiting for "
                               f"{', '.join(prog.config.depends_on)})", "not_started")
        return prog

    def _indexes(self, prog: _Program, index: Any) -> list[int] | None:
        if index is None:
            return None
        if isinstance(index, bool) or not isinstance(index, int) or index not in (
                prog.monitor._slots):
            raise CommandError(f"program {prog.config.name!r} has no worker {index!r}",
                               "unknown_worker")
        return [index]

    def _submit(self, prog: _Program, fn: Callable[..., None], *args: Any,
                message: str) -> Deferred:
        deferred = Deferred()
        reply: Reply = prog.monitor.submit(fn, *args)

        def done(r: Reply) -> None:
            if r.error is not None:
                deferred.fail(f"{type(r.error).__name__}: {r.error}", "failed")
            else:
                deferred.resolve({"message": message})

        reply.add_done_callback(done)
        return deferred

    def _cmd_status(self, args: dict[str, Any]) -> Any:
        wanted = args.get("programs") or None
        resources = bool(args.get("resources"))
        programs = []
        seen: set[int] = set()
        for name, prog in self.programs.items():
            if wanted is not None and name not in wanted:
                continue
            workers = []
            mon = prog.monitor
            statuses = mon._build_status() if mon is not None else ()
            for ws in statuses:
                rss = cpu = None
                if resources and ws.pid is not None:
                    seen.add(ws.pid)
                    rss, cpu = self._resources.of(ws.pid)
                doc = schema.worker_to_json(ws, rss=rss, cpu_percent=cpu)
                if prog.config.kind == "command" and prog.config.heartbeat_timeout is None:
                    doc["heartbeat_age"] = None  # it never beats: no age to show
                workers.append(doc)
            programs.append(schema.program_to_json(
                name, prog.config.kind, workers, numprocs=len(workers) or prog.config.numprocs,
                gave_up=mon is not None and mon.gave_up is not None))
        if resources and wanted is None:
            self._resources.keep_only(seen)
        return schema.status_payload(
            programs, pid=os.getpid(), version=corral.__version__,
            uptime=time.monotonic() - self.started_at, config=self.options.config_path,
            socket=self.options.socket)

    def _cmd_restart(self, args: dict[str, Any]) -> Any:
        prog = self._program(args.get("program"))
        indexes = self._indexes(prog, args.get("index"))
        mon = prog.monitor
        if indexes is None:
            return self._submit(prog, mon.do_restart_all, message=f"{prog.config.name}: "
                                "restarted every worker, one at a time")
        return self._submit(prog, mon.do_restart, indexes[0],
                            message=f"{prog.config.name}:{indexes[0]}: restarted")

    def _cmd_stop(self, args: dict[str, Any]) -> Any:
        prog = self._program(args.get("program"))
        indexes = self._indexes(prog, args.get("index"))
        return self._submit(prog, prog.monitor.do_hold, indexes,
                            message=f"{_who(prog, indexes)}: stopping")

    def _cmd_start(self, args: dict[str, Any]) -> Any:
        prog = self._program(args.get("program"))
        indexes = self._indexes(prog, args.get("index"))
        return self._submit(prog, prog.monitor.do_release, indexes,
                            message=f"{_who(prog, indexes)}: starting")

    def _cmd_scale(self, args: dict[str, Any]) -> Any:
        prog = self._program(args.get("program"))
        n = args.get("numprocs")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise CommandError(f"numprocs must be an int >= 0, got {n!r}", "bad_args")
        sup = prog.supervisor
        assert sup is not None
        prepared = sup._prepare(n)
        return self._submit(prog, prog.monitor.do_scale, n, prepared,
                            message=f"{prog.config.name}: scaled to {n}")

    def _cmd_signal(self, args: dict[str, Any]) -> Any:
        prog = self._program(args.get("program"))
        indexes = self._indexes(prog, args.get("index"))
        try:
            sig = parse_signal(args.get("signal"))
        except (ValueError, TypeError) as exc:
            raise CommandError(str(exc), "bad_args") from None
        return self._submit(prog, prog.monitor.do_signal, indexes, int(sig),
                            message=f"{_who(prog, indexes)}: sent {sig.name}")

    def _cmd_logs(self, args: dict[str, Any]) -> Any:
        program = args.get("program")
        if program is not None and program not in self.programs:
            raise CommandError(f"no program {program!r}", "unknown_program")
        index = args.get("index")
        n = args.get("lines", 100)
        records = self.hub.tail(n if isinstance(n, int) else 100, program, index)
        lines = [record_to_json(r) for r in records]
        if not args.get("follow"):
            return {"lines": lines}
        unfollow: list[Callable[[], None]] = []

        def start(channel: Any) -> None:
            channel.send({"lines": lines})

            def more(recs: Sequence[LogRecord], dropped: int) -> None:
                chosen = [record_to_json(r) for r in recs
                          if index is None or r.index == index]
                if chosen or dropped:
                    channel.send({"lines": chosen, "dropped": dropped})

            unfollow.append(self.hub.follow(more, None if program is None else [program]))

        def cancel() -> None:
            for u in unfollow:
                u()

        return Stream(start, cancel)

    def _cmd_events(self, args: dict[str, Any]) -> Any:
        limit = args.get("limit", 50)
        recent = list(self.events)[-limit:] if isinstance(limit, int) and limit > 0 else []
        if not args.get("follow"):
            return {"events": recent}
        holder: list[Any] = []

        def start(channel: Any) -> None:
            holder.append(channel)
            channel.send({"events": recent})
            self.event_followers.append(channel)

        def cancel() -> None:
            for ch in holder:
                with contextlib.suppress(ValueError):
                    self.event_followers.remove(ch)

        return Stream(start, cancel)

    def _cmd_reload(self, args: dict[str, Any]) -> Any:
        return self._reload()

    def _reload(self) -> dict[str, Any]:
        """Re-read the file; apply only what changed (supervisord's reread + update):
        removed programs stop, added ones start, a numprocs-only change scales, any other
        change replaces the pool (the old one stops first, then the new one starts)."""
        path = self.options.config_path
        if path is None:
            raise CommandError("this corral runs a command line, not a file: nothing to "
                               "re-read", "not_configured")
        try:
            new = load(path)
            problems = check_commands(new) + check_targets(new, self.options.config_dir,
                                                           load=True)
            if problems:
                raise ConfigError(problems)
        except ConfigError as exc:
            log.error("reload refused, nothing changed: %s", exc)
            raise CommandError(str(exc), "bad_config") from None
        try:
            # New or changed `listen` sockets are bound now (unchanged ones are kept: the same
            # queue across the program's replacement); one that cannot be refuses the reload.
            for cfg in new.programs.values():
                self.listeners_for(cfg)
        except OSError as exc:
            log.error("reload refused, nothing changed: %s", exc)
            raise CommandError(str(exc), "bad_config") from None
        old_config = self.config
        change = diff(old_config, new)
        self.config = new
        self._console_programs(new)
        if change.globals_changed:
            log.warning("reload: %s changed; that takes a restart of corral",
                        ", ".join(change.globals_changed))
        for name in change.removed:
            self._replace_file_sink_later(name)
            fresh = self._replacing.pop(name, None)
            prog = self.programs.get(name)
            if name in self._pending:
                self._pending.remove(name)
            if fresh is not None:
                fresh[1].io.close()
            if prog is None:
                continue
            if prog.supervisor is None:
                prog.io.close()
                del self.programs[name]
                continue
            self._stop_program(prog)
            self._removing.append(prog)
        for item in change.changed:
            cfg = new.programs[item.name]
            prog = self.programs[item.name]
            pending = self._replacing.get(item.name)
            self._replace_file_sink(old_config.programs[item.name], cfg)
            if pending is not None:
                # Still waiting for its old pool to end: the newest settings win.
                pending[1].io.close()
                self._replacing[item.name] = (pending[0], _Program(cfg, ProgramIO(self, cfg)))
            elif prog.supervisor is None:
                prog.io.close()  # not started yet (waiting for its dependencies)
                self.programs[item.name] = _Program(cfg, ProgramIO(self, cfg))
            elif item.scale_only and not prog.finished:
                n = cfg.numprocs
                prog.monitor.submit(prog.monitor.do_scale, n, prog.supervisor._prepare(n))
                prog.config = cfg
                prog.io.prog = cfg
            else:
                self._stop_program(prog)
                self._replacing[item.name] = (prog, _Program(cfg, ProgramIO(self, cfg)))
        for name in change.added:
            cfg = new.programs[name]
            self._replace_file_sink(None, cfg)
            self.programs[name] = _Program(cfg, ProgramIO(self, cfg))
            self._pending.append(name)
        self._start_ready_programs()
        log.info("reload: %s", _describe_diff(change.to_json()))
        return {"diff": change.to_json()}

    def _stop_program(self, prog: _Program) -> None:
        if prog.monitor is not None and not prog.finished and not prog.stop_requested:
            prog.stop_requested = True
            prog.monitor.request_stop(prog.config.stop_timeout, int(prog.config.stop_signal))

    def _replace_file_sink_later(self, name: str) -> None:
        """A removed program keeps its log file until its last worker's pipes are drained."""
        self._closing_sinks.append(name)

    def _advance_replacing(self) -> None:
        """A changed program starts anew once its old pool has finished; a removed program
        leaves once its pool has finished."""
        for name, (old, fresh) in list(self._replacing.items()):
            if old.finished:
                del self._replacing[name]
                self.programs[name] = fresh
                if not self.stopping:
                    self._pending.append(name)
        for prog in list(self._removing):
            if prog.finished:
                self._removing.remove(prog)
                name = prog.config.name
                if self.programs.get(name) is prog:
                    del self.programs[name]
                    self.hub.forget(name)
                    if name in self._closing_sinks:
                        self._closing_sinks.remove(name)
                        self._replace_file_sink(prog.config, None)


def _describe_diff(d: dict[str, Any]) -> str:
    parts = [f"{k}: {', '.join(d[k])}" for k in ("added", "removed") if d.get(k)]
    if d.get("changed"):
        parts.append("changed: " + ", ".join(f"{n} ({', '.join(k)})"
                                             for n, k in d["changed"].items()))
    return "; ".join(parts) or "nothing changed"


_QUERIES = frozenset({"status", "logs", "events"})


def _describe_args(args: dict[str, Any]) -> str:
    program, index = args.get("program"), args.get("index")
    words = [] if program is None else [program if index is None else f"{program}:{index}"]
    words += [f"{k}={v}" for k, v in args.items() if k not in ("program", "index")]
    return (" " + " ".join(str(w) for w in words)) if words else ""


def _who(prog: _Program, indexes: list[int] | None) -> str:
    return prog.config.name if indexes is None else f"{prog.config.name}:{indexes[0]}"


class _Resources:
    """RSS and CPU% of workers for ``corral top``. A psutil.Process is kept per pid: its
    ``cpu_percent`` is the share since the previous call (the first call says 0.0)."""

    def __init__(self) -> None:
        self._procs: dict[int, Any] = {}

    def of(self, pid: int) -> tuple[int | None, float | None]:
        import psutil

        try:
            proc = self._procs.get(pid)
            if proc is None:
                proc = self._procs[pid] = psutil.Process(pid)
            with proc.oneshot():
                return proc.memory_info().rss, proc.cpu_percent(interval=None)
        except psutil.Error:
            self._procs.pop(pid, None)
            return None, None

    def keep_only(self, pids: set[int]) -> None:
        for pid in [p for p in self._procs if p not in pids]:
            del self._procs[pid]


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

        return json.dumps({"ts": record.created, "program": "corral", "level": record.levelname,
                           "logger": record.name, "line": record.getMessage()})


# ---------------------------------------------------------------------- orphans, PID 1


def _become_subreaper() -> None:
    """Orphans below us (a worker's child that called setsid(), say) are reparented to us
    instead of init: we reap them, and kill what is left when we exit."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _children(pid: int | str = "self") -> set[int]:
    out: set[int] = set()
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as fh:
                out.update(int(p) for p in fh.read().split())
    return out


def _below(roots: set[int]) -> set[int]:
    """``roots`` and every process below them."""
    out: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo.extend(_children(pid))
    return out


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


class _Adopted:
    """Zombies of processes that are not ours to watch: orphans the kernel handed us (we are
    a child subreaper, or PID 1 in a container), reaped quietly, by pid.

    Never ``waitpid(-1)``: it would steal the status of a worker its monitor waits for. A
    zombie that is not a known worker is only reaped when it is still unknown a moment later:
    a command that exits at once can be a zombie before the spawner thread has handed its
    process to the monitor.
    """

    GRACE = 0.5

    def __init__(self) -> None:
        self._suspects: dict[int, float] = {}
        self.reaped = 0

    def sweep(self, known: set[int], now: float) -> bool:
        """Reap what has been an unknown zombie for GRACE; True if a look is due later."""
        suspects: dict[int, float] = {}
        for pid in _children() - known:
            if not _zombie(pid) or _is_helper(pid):
                continue
            first = self._suspects.get(pid, now)
            if now - first >= self.GRACE:
                with contextlib.suppress(ChildProcessError, OSError):
                    if os.waitpid(pid, os.WNOHANG)[0]:
                        self.reaped += 1
                        log.debug("reaped adopted orphan pid %d", pid)
                        continue
            suspects[pid] = first
        self._suspects = suspects
        return bool(suspects)


def _is_helper(pid: int) -> bool:
    from corral._keeper import keeper

    if pid == keeper.pid:
        return True
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmd = fh.read()
    except OSError:
        return False
    return b"forkserver" in cmd or b"resource_tracker" in cmd


def _kill_adopted(deadline: float = 5.0) -> int:
    """At exit: whatever is still below us (adopted orphans, setsid() escapees, their own
    children) is killed and reaped; helpers (the keeper, the forkserver) end by themselves.
    Returns how many were killed."""
    killed = 0
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        helpers = {p for p in _children() if _is_helper(p)}
        victims = _below(_children() - helpers) - helpers
        live = [p for p in victims if not _zombie(p)]
        for pid in live:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        killed += len(live)
        # Reap ours (killing an escapee hands its children to us: the next round takes them).
        for pid in _children() - helpers:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, 0)
        if not live and not (_children() - helpers):
            break
    if killed:
        log.warning("killed %d process(es) left below corral at exit (orphans or setsid() "
                    "escapees of the workers)", killed)
    return killed
