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
        env: dict[str, str] = {}
        if self.prog.needs_notify_socket:
            env["NOTIFY_SOCKET"] = self._notify_socket(index, name).address
            if self.prog.heartbeat_timeout is not None:
                env["WATCHDOG_USEC"] = str(int(self.prog.heartbeat_timeout * 1e6))
        return Launch(env=env, stdout=out_w, stderr=err_w, readers=(out_r, err_r))

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
        mon = self.monitor
        if mon is None:
            return False
        return all(w.state.value == "running" for w in mon._slots.values())


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
        self.hub = LogHub(self.reactor, self._sinks(self.config, options.json_logs))
        self.programs: dict[str, _Program] = {}
        self.events: deque[dict[str, Any]] = deque(maxlen=_EVENTS_KEPT)
        self.event_followers: list[Any] = []
        self.started_at = time.monotonic()
        self.stopping = False
        self.control: ControlServer | None = None
        self._pending: list[str] = []  # programs waiting for their dependencies
        self._replacing: list[tuple[_Program, _Program]] = []  # (old, new) on a reload
        self._signals: list[int] = []

    # ------------------------------------------------------------------------------ set-up

    def _sinks(self, config: Config, json_logs: bool) -> list[Any]:
        sinks: list[Any] = [JsonLinesSink(self.reactor) if json_logs
                            else ConsoleSink(self.reactor, timestamps=True)]
        for prog in config.programs.values():
            path = prog.log.file_for(prog.name)
            if path:
                sinks.append(FileSink(path, self.reactor, max_bytes=prog.log.max_bytes,
                                      backups=prog.log.backups, json=prog.log.file_json,
                                      programs=[prog.name]))
        return sinks

    def run(self) -> int:
        _console_logging(self.options.json_logs)
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
                if self._replacing:
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
        return all(p.supervisor is None or p.finished for p in self.programs.values())

    def _drain_until_finished(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all(
                p.supervisor is None or p.finished for p in self.programs.values()):
            self.reactor.run_once(extra=time.monotonic() + 0.1)

    def _shutdown(self) -> None:
        if self.control is not None:
            self.control.close()
        # Whatever the hub has not read yet, then close it.
        self.hub.close()
        _kill_adopted()
        for sig in self._signals:
            with contextlib.suppress(ValueError, OSError):
                signal.signal(sig, signal.SIG_DFL)
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
        data = schema.event_to_json(ev)
        self.events.append(data)
        for channel in list(self.event_followers):
            if not channel.send({"events": [data]}):
                pass  # a slow follower loses events (the channel counts them), never us
        if ev.kind is EventKind.READY:
            self._start_ready_programs()

    # -------------------------------------------------------------------------- stopping

    def stop_all(self, why: str) -> None:
        if not self.stopping:
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
        handlers = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT",
                    signal.SIGHUP: "SIGHUP", signal.SIGCHLD: "SIGCHLD"}
        for sig in handlers:
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
            _reap_adopted(self._known_pids())

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
        log.info("control: %s %s from uid %d pid %d", command, args or "", peer.uid, peer.pid)
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
        for name, prog in self.programs.items():
            if wanted is not None and name not in wanted:
                continue
            workers = []
            mon = prog.monitor
            statuses = mon._build_status() if mon is not None else ()
            for ws in statuses:
                rss = cpu = None
                if resources and ws.pid is not None:
                    rss, cpu = _resources(ws.pid)
                workers.append(schema.worker_to_json(ws, rss=rss, cpu_percent=cpu))
            programs.append(schema.program_to_json(
                name, prog.config.kind, workers, numprocs=len(workers) or prog.config.numprocs,
                gave_up=mon is not None and mon.gave_up is not None))
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
        path = self.options.config_path
        if path is None:
            raise CommandError("this corral runs a command line, not a file: nothing to "
                               "re-read", "not_configured")
        try:
            new = load(path)
        except ConfigError as exc:
            log.error("reload: %s", exc)
            raise CommandError(str(exc), "bad_config") from None
        change = diff(self.config, new)
        self.config = new
        for name in change.removed:
            prog = self.programs.get(name)
            if prog is not None and prog.monitor is not None and not prog.finished:
                prog.stop_requested = True
                prog.monitor.request_stop(prog.config.stop_timeout,
                                          int(prog.config.stop_signal))
        for item in change.changed:
            prog = self.programs[item.name]
            if item.scale_only and prog.supervisor is not None:
                n = new.programs[item.name].numprocs
                prog.monitor.submit(prog.monitor.do_scale, n, prog.supervisor._prepare(n))
                prog.config = new.programs[item.name]
            elif prog.monitor is not None:
                # Anything else is a new pool: stop the old one, start the new one after.
                self._replace(prog, new.programs[item.name])
        for name in change.added:
            self.programs[name] = _Program(new.programs[name], ProgramIO(self, new.programs[name]))
            self._pending.append(name)
        self._start_ready_programs()
        log.info("reload: %s", change.to_json())
        return {"diff": change.to_json()}

    def _replace(self, old: _Program, config: ProgramConfig) -> None:
        old.stop_requested = True
        old.monitor.request_stop(old.config.stop_timeout, int(old.config.stop_signal))
        self._replacing.append((old, _Program(config, ProgramIO(self, config))))

    def _advance_replacing(self) -> None:
        """A changed program starts anew once its old pool has finished."""
        for old, fresh in list(self._replacing):
            if old.finished:
                self._replacing.remove((old, fresh))
                self.programs[fresh.config.name] = fresh
                if not self.stopping:
                    self._pending.append(fresh.config.name)


def _who(prog: _Program, indexes: list[int] | None) -> str:
    return prog.config.name if indexes is None else f"{prog.config.name}:{indexes[0]}"


def _resources(pid: int) -> tuple[int | None, float | None]:
    try:
        import psutil

        proc = psutil.Process(pid)
        return proc.memory_info().rss, proc.cpu_percent(interval=None)
    except Exception:
        return None, None


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


def _children() -> set[int]:
    out: set[int] = set()
    with contextlib.suppress(OSError):
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/children") as fh:
                out.update(int(p) for p in fh.read().split())
    return out


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


def _reap_adopted(known: set[int]) -> None:
    """Reap exited children that are not ours to watch (adopted orphans), by pid: never
    waitpid(-1), which would steal the status of a worker the monitor waits for."""
    for pid in _children() - known:
        if _zombie(pid) and not _is_helper(pid):
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)


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


def _kill_adopted() -> None:
    """At exit: whatever is still below us (adopted orphans, setsid() escapees) is killed."""
    for pid in _children():
        if _is_helper(pid):
            continue
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, 0)

