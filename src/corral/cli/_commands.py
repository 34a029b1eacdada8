"""The control socket's commands of ``corral run`` (a part of :class:`corral.cli.runner.CorralRun`):
status, start/stop/restart, scale, signal, logs and events streams, and reload (re-read the
file, apply only what changed; ``reload NAME``: a serve's rolling reload). On the loop thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import corral
from corral import _json as schema
from corral._control import (
    CommandError,
    Deferred,
    Peer,
    Stream,
    answer_when_done,
)
from corral._logs import (
    LogRecord,
    record_to_json,
)
from corral._reply import Reply
from corral.cli._programs import ProgramIO, _Program
from corral.cli._schema import MAX_NUMPROCS
from corral.cli._serves import ServesPart
from corral.cli.config import Config, ConfigError, ProgramConfig, diff, load, parse_signal
from corral.cli.preflight import check_commands, check_targets

if TYPE_CHECKING:
    from collections import deque

    from corral._logs import LogHub
    from corral.cli._activation import Activation
    from corral.cli.main import RunOptions
    from corral.cli.runner import CorralRun

    class _Core:
        """What the commands use of CorralRun (for the type checker only)."""

        options: RunOptions
        config: Config
        hub: LogHub
        programs: dict[str, _Program]
        events: deque[dict[str, Any]]
        event_followers: list[Any]
        started_at: float
        stopping: bool
        _pending: list[str]
        _replacing: dict[str, tuple[_Program, _Program]]
        _removing: list[_Program]
        _closing_sinks: list[str]
        _resources: _Resources
        activation: Activation

        def _console_programs(self, config: Config) -> None: ...
        def _replace_file_sink(self, old: ProgramConfig | None,
                               new: ProgramConfig | None) -> None: ...
        def _start_ready_programs(self) -> None: ...
        def _publish(self, data: dict[str, Any]) -> None: ...
        def _sync_endpoint(self) -> None: ...
        def _serve_file_sink(self, name: str, present: bool) -> None: ...
        def listeners_for(self, prog: ProgramConfig) -> list[Any]: ...
        def _sd_reload_begins(self, what: str) -> None: ...
else:
    _Core = object

log = logging.getLogger("corral.run")

__all__ = ["CommandsPart"]


class CommandsPart(ServesPart, _Core):
    """What the control socket can ask of a running corral."""

    def _io_for(self, cfg: ProgramConfig) -> ProgramIO:
        return ProgramIO(cast("CorralRun", self), cfg)

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

    def _program(self, name: Any, command: str = "") -> _Program:
        prog = self.programs.get(name) if isinstance(name, str) else None
        serve = self._serve_named(name)
        if serve is not None:
            self._refuse_for_serve(serve, command)
        if prog is None:
            raise CommandError(f"no program {name!r} (programs: "
                               f"{', '.join(sorted([*self.programs, *self.serves])) or 'none'})",
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
        reply: Reply = prog.monitor.submit(fn, *args)
        return answer_when_done([reply], lambda _results: {"message": message})

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
        for name, serve in {**self._serve_replacing, **self.serves}.items():
            if wanted is None or name in wanted:
                programs.append(self._serve_doc(serve, resources, seen))
        if resources and wanted is None:
            self._resources.keep_only(seen)
        return schema.status_payload(
            programs, pid=os.getpid(), version=corral.__version__,
            uptime=time.monotonic() - self.started_at, config=self.options.config_path,
            socket=self.options.socket)

    def _cmd_restart(self, args: dict[str, Any]) -> Any:
        serve = self._serve_named(args.get("program"))
        if serve is not None:
            if args.get("index") is not None:
                raise CommandError(f"{serve.config.name!r} is a [serve] table: its workers "
                                   "are replaced together, by a rolling reload (no index)",
                                   "unsupported")
            return self._serve_reload(serve, "corral restart")
        prog = self._program(args.get("program"))
        indexes = self._indexes(prog, args.get("index"))
        mon = prog.monitor
        if indexes is None:
            return self._submit(prog, mon.do_restart_all, message=f"{prog.config.name}: "
                                "restarted every worker, one at a time")
        return self._submit(prog, mon.do_restart, indexes[0],
                            message=f"{prog.config.name}:{indexes[0]}: restarted")

    def _cmd_stop(self, args: dict[str, Any]) -> Any:
        prog = self._program(args.get("program"), "stop")
        indexes = self._indexes(prog, args.get("index"))
        return self._submit(prog, prog.monitor.do_hold, indexes,
                            message=f"{_who(prog, indexes)}: stopping")

    def _cmd_start(self, args: dict[str, Any]) -> Any:
        prog = self._program(args.get("program"), "start")
        indexes = self._indexes(prog, args.get("index"))
        return self._submit(prog, prog.monitor.do_release, indexes,
                            message=f"{_who(prog, indexes)}: starting")

    def _cmd_scale(self, args: dict[str, Any]) -> Any:
        serve = self._serve_named(args.get("program"))
        if serve is not None:
            return self._serve_scale(serve, args.get("numprocs"))
        prog = self._program(args.get("program"), "scale")
        n = args.get("numprocs")
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_NUMPROCS:
            # The same bound as the file's numprocs and `corral scale`: a raw client asking
            # for millions would have corral prepare millions of slots first.
            raise CommandError(f"numprocs must be an int between 0 and {MAX_NUMPROCS}, got "
                               f"{n!r}", "bad_args")
        sup = prog.supervisor
        assert sup is not None
        prepared = sup._prepare(n)
        return self._submit(prog, prog.monitor.do_scale, n, prepared,
                            message=f"{prog.config.name}: scaled to {n}")

    def _cmd_signal(self, args: dict[str, Any]) -> Any:
        serve = self._serve_named(args.get("program"))
        if serve is not None:
            return self._serve_signal(serve, args.get("index"), args.get("signal"))
        prog = self._program(args.get("program"), "signal")
        indexes = self._indexes(prog, args.get("index"))
        try:
            sig = parse_signal(args.get("signal"))
        except (ValueError, TypeError) as exc:
            raise CommandError(str(exc), "bad_args") from None
        return self._submit(prog, prog.monitor.do_signal, indexes, int(sig),
                            message=f"{_who(prog, indexes)}: sent {sig.name}")

    def _cmd_logs(self, args: dict[str, Any]) -> Any:
        program = args.get("program")
        if program is not None and program not in self.programs and program not in (
                self.serves):
            raise CommandError(f"no program {program!r}", "unknown_program")
        index = args.get("index")
        if index is not None and (isinstance(index, bool) or not isinstance(index, int)
                                  or index < 0):
            raise CommandError(f"a worker index is an int >= 0, got {index!r}", "bad_args")
        n = args.get("lines", 100)
        records = self.hub.tail(n if isinstance(n, int) else 100, program, index)
        prog = self.programs.get(program) if program is not None else None
        if (index is not None and prog is not None and prog.monitor is not None
                and index not in prog.monitor._slots and not records):
            # Neither a worker now nor one with lines kept (a worker scaled away keeps its).
            raise CommandError(f"program {program!r} has no worker {index!r}",
                               "unknown_worker")
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
        name = args.get("program")
        if name is None:
            return self._reload()
        serve = self._serve_named(name)
        if serve is None:
            hint = (" (a [program]: `corral restart` replaces its workers one at a time)"
                    if name in self.programs else "")
            raise CommandError(f"no [serve] table {name!r}{hint} (serves: "
                               f"{', '.join(sorted(self.serves)) or 'none'})",
                               "unknown_program")
        return self._serve_reload(serve, "corral reload")

    def _reload(self) -> dict[str, Any]:
        """Re-read the file; apply only what changed (supervisord's reread + update):
        removed programs stop, added ones start, a numprocs-only change scales, any other
        change replaces the pool (the old one stops first, then the new one starts)."""
        path = self.options.config_path
        if path is None:
            raise CommandError("this corral runs a command line, not a file: nothing to "
                               "re-read", "not_configured")
        self._sd_reload_begins("the config")  # READY=1 follows once it has settled (or failed)
        try:
            new = load(path)
            problems = check_commands(new) + check_targets(new, self.options.config_dir,
                                                           load=True)
            problems += self.activation.check(new)
            if problems:
                raise ConfigError(problems)
        except ConfigError as exc:
            log.error("reload refused, nothing changed: %s", exc)
            raise CommandError(str(exc), "bad_config") from None
        except (Exception, SystemExit) as exc:
            # Whatever reading, validating or importing the file raised (not KeyboardInterrupt):
            # the file's problem, refused like any other; corral carries on unchanged.
            log.error("reload refused, nothing changed: %s: %s: %s", path,
                      type(exc).__name__, exc)
            raise CommandError(f"{path}: could not be loaded ({type(exc).__name__}: {exc})",
                               "bad_config") from None
        try:
            # New or changed `listen` sockets are bound now (unchanged ones are kept: the same
            # queue across the program's replacement); one that cannot be refuses the reload.
            for cfg in new.programs.values():
                self.listeners_for(cfg)
        except OSError as exc:
            log.error("reload refused, nothing changed: %s", exc)
            raise CommandError(str(exc), "bad_config") from None
        # Added serves bound, changed ones' settings checked (CommandError: nothing changed).
        prepared = self._prepare_serves(new, self.config)
        old_config = self.config
        change = diff(old_config, new)
        self.activation.warn_unmatched(new)
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
                self._replacing[item.name] = (pending[0], _Program(cfg, self._io_for(cfg)))
            elif prog.supervisor is None:
                prog.io.close()  # not started yet (waiting for its dependencies)
                self.programs[item.name] = _Program(cfg, self._io_for(cfg))
            elif item.scale_only and not prog.finished:
                n = cfg.numprocs
                prog.monitor.submit(prog.monitor.do_scale, n, prog.supervisor._prepare(n))
                prog.config = cfg
                prog.io.prog = cfg
            else:
                self._stop_program(prog)
                self._replacing[item.name] = (prog, _Program(cfg, self._io_for(cfg)))
        for name in change.added:
            cfg = new.programs[name]
            self._replace_file_sink(None, cfg)
            self.programs[name] = _Program(cfg, self._io_for(cfg))
            self._pending.append(name)
        for name in change.serve_added:
            self._serve_file_sink(name, True)
        self._apply_serves(change, prepared)
        self._start_ready_programs()
        self._sync_endpoint()
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
                    self._sync_endpoint()


def _describe_diff(d: dict[str, Any]) -> str:
    parts = [f"{k.replace('_', ' ')}: {', '.join(d[k])}"
             for k in ("added", "removed", "serve_added", "serve_removed") if d.get(k)]
    for key in ("changed", "serve_changed"):
        if d.get(key):
            parts.append(key.replace("_", " ") + ": " + ", ".join(
                f"{n} ({', '.join(k)})" for n, k in d[key].items()))
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
