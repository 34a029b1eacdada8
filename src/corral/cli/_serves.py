"""The ``[serve.NAME]`` tables of ``corral run``: each one a :class:`~corral.serve._server.Server`
hosted on corral's reactor (a part of :class:`corral.cli.runner.CorralRun`), on the loop thread.

A serve's listeners are bound when it is set up (a taken address fails the start, or refuses a
reload) and closed by its Server, last, once its workers have drained. Its workers' output goes
through the log hub under the serve's name; its pools' events into corral's events.

``corral scale NAME N`` and ``corral signal NAME[:INDEX] SIG`` act on its serving generation
(:meth:`Server.scale_command`, :meth:`Server.signal_command`, shared with ``corral serve``).

``corral reload NAME`` (or ``restart NAME``) is its rolling reload; a config reload starts an
added table, drains a removed one, and rolls a changed one to a new generation with the new
settings (a changed ``bind``/``reuse_port`` takes a new Server: the old one drains and closes
its sockets, then the new one binds and starts).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from corral import _json as schema
from corral._command import Launch
from corral._control import CommandError, Deferred
from corral._observe import PoolSummary, PoolView, SupervisorSource
from corral.cli._model import Config, ServeConfig
from corral.cli._programs import KeptPipes, _ProgramSource, attach_pipes, log_pipes
from corral.process import ProcessLike

if TYPE_CHECKING:
    from corral.cli.runner import CorralRun
    from corral.serve._server import ServeOptions, Server

log = logging.getLogger("corral.run")

__all__ = ["ServeIO", "ServesPart"]

# The listeners' keys: changing one takes a new Server (its sockets are bound once).
_LISTENER_KEYS = frozenset({"bind", "reuse_port"})


class ServeIO(KeptPipes):
    """The worker IO of one generation's pool: each worker's stdout/stderr into the hub,
    under the serve's name (the worker opens the pipes through /proc as it boots)."""

    def __init__(self, run: CorralRun, name: str) -> None:
        super().__init__()
        self.run = run
        self.name = name

    def launch(self, index: int, name: str) -> Launch:
        return log_pipes()

    def started(self, index: int, name: str, proc: ProcessLike, launch: Launch) -> None:
        attach_pipes(self.run, launch, self.name, index, proc.pid)
        self.keep(index, launch)

    def ended(self, index: int, pid: int) -> None:
        self.release(index)

    def close(self) -> None:
        self.release_all()


@dataclass
class _Serve:
    """One [serve.NAME] of the running config and its Server."""

    config: ServeConfig
    server: Server
    begun: bool = False
    closed: bool = False

    @property
    def done(self) -> bool:
        return not self.begun or self.server.done

    @property
    def ready(self) -> bool:
        return self.begun and self.server.ready


class _ServeSource(_ProgramSource):
    """A serve as the HTTP endpoint of ``corral run --http`` sees it: its serving generation's
    pool, named after the serve (called on the endpoint's thread: attribute reads only)."""

    def _current(self) -> SupervisorSource | None:
        s = self._run.serves.get(self._name)
        if s is None:
            return None
        server = s.server
        gen = server.current
        state = server.reload_state
        if gen is None and state is not None:
            gen = state.new
        if gen is None or gen.sup is None:
            return None
        return SupervisorSource(gen.sup, "serve")

    def observe(self, timeout: float, detail: bool = False) -> PoolView:
        src = self._current()
        if src is None:
            return PoolView(name=self._name, kind="serve", state="new",
                            summary=PoolSummary.of(()), workers=(), timeout=timeout)
        return replace(src.observe(timeout, detail), name=self._name)


class ServesPart:
    """What ``corral run`` does with its [serve.NAME] tables (mixed into CorralRun)."""

    serves: dict[str, _Serve]
    _serve_removing: list[_Serve]
    _serve_replacing: dict[str, _Serve]  # name -> the old one, draining before the new begins

    def _init_serves(self) -> None:
        self.serves = {}
        self._serve_removing = []
        self._serve_replacing = {}

    def _run(self) -> CorralRun:
        return self  # type: ignore[return-value]

    # ------------------------------------------------------------------------------ set-up

    def _serve_options(self, cfg: ServeConfig) -> ServeOptions:
        """Raises ValueError (a setting the server refuses)."""
        from corral.serve._server import from_config

        run = self._run()
        return from_config(cfg, app_dir=run.options.config_dir or os.getcwd(),
                           uvicorn={"log_level": "warning"})

    def _make_serve(self, cfg: ServeConfig) -> _Serve:
        """A Server for ``cfg``, its listeners bound and its own endpoint (``http``) up.

        Raises:
            OSError: an address could not be bound; ValueError: a bad setting.
        """
        from corral._notify import Notifier
        from corral.serve import _listeners
        from corral.serve._server import Server

        run = self._run()
        options = self._serve_options(cfg)
        if options.reuse_port:
            warning = _listeners.warn_reuse_port(_listeners.check_migrate_req())
            if warning:
                log.warning("%s", warning)
        name = cfg.name
        # systemd's sockets named after the serve, if it passed any: its bind is not bound.
        listeners = run.activation.for_serve(name) or _listeners.bind_all(
            options.bind, reuse_port=options.reuse_port, backlog=options.backlog)
        # corral run speaks to systemd for itself (nothing yet): a serve never does.
        server = Server(options, reactor=run.reactor, notifier=Notifier(env={}),
                        listeners=listeners, io=lambda _pool: ServeIO(run, name))
        server.on_pool = lambda sup: sup.subscribe(lambda ev: run._hand(run._on_event, ev))
        server.on_roll = lambda: run._sd_reload_begins(f"serve {name}")
        try:
            server.start_http()
        except OSError as exc:
            _listeners.close_all(listeners)
            raise OSError(exc.errno, f"serve.{name}.http: {exc.strerror or exc}") from None
        log.info("%s: listening on %s%s", name, ", ".join(x.address for x in listeners),
                 " (systemd's sockets)" if any(x.origin == "systemd" for x in listeners) else "")
        return _Serve(cfg, server)

    def _begin_serve(self, s: _Serve) -> None:
        s.begun = True
        s.server.begin()

    # ----------------------------------------------------------------------------- the loop

    def _advance_serves(self) -> None:
        """After each loop round: every Server moves along; a removed one that has drained is
        closed (its listeners last); a replaced one's successor begins once it has."""
        run = self._run()
        for s in [*self.serves.values(), *self._serve_removing,
                  *self._serve_replacing.values()]:
            if s.begun and not s.closed:
                s.server.advance()
        for s in list(self._serve_removing):
            if s.done:
                self._serve_removing.remove(s)
                self._close_serve(s)
                if s.config.name not in self.serves:  # not added back meanwhile
                    run.hub.forget(s.config.name)
                    run._serve_file_sink(s.config.name, False)
                run._sync_endpoint()
        for name, old in list(self._serve_replacing.items()):
            if not old.done:
                continue
            del self._serve_replacing[name]
            self._close_serve(old)
            cfg = run.config.serve.get(name)
            if cfg is None or run.stopping:
                continue
            try:
                fresh = self._make_serve(cfg)
            except (OSError, ValueError) as exc:
                log.error("%s: cannot start with its new settings: %s", name, exc)
                self.serves.pop(name, None)
                run._sync_endpoint()
                continue
            self.serves[name] = fresh
            self._begin_serve(fresh)

    def _close_serve(self, s: _Serve) -> None:
        if not s.closed:
            s.closed = True
            s.server.close()

    def _serves_done(self) -> bool:
        return all(s.done for s in [*self.serves.values(), *self._serve_removing,
                                    *self._serve_replacing.values()])

    def _stop_serve(self, s: _Serve, why: str, quick: bool = False) -> None:
        if s.begun and not s.closed:
            s.server.stop(why, quick=quick)

    def _close_serves(self) -> None:
        """At exit (every serve has drained, or was told to die): listeners closed last."""
        for s in [*self.serves.values(), *self._serve_removing,
                  *self._serve_replacing.values()]:
            self._close_serve(s)

    def _serve_pids(self) -> set[int]:
        """Our children that serves own (spawn workers, zygotes): never an orphan's."""
        pids: set[int] = set()
        for s in [*self.serves.values(), *self._serve_removing,
                  *self._serve_replacing.values()]:
            for gen in s.server.generations:
                mon = gen.monitor
                if mon is not None:
                    with mon._live_lock:
                        pids.update(mon._live)
                zygote = gen.zygote
                if zygote is not None and zygote.pid is not None:
                    pids.add(zygote.pid)
        return pids

    # ---------------------------------------------------------------------------- commands

    def _serve_doc(self, s: _Serve, resources: bool, seen: set[int]) -> dict[str, Any]:
        """A serve in ``corral.status/1``: its generations' workers (an old generation's while
        they drain), each with its ``generation``; the state is the serving generation's."""
        run = self._run()
        server = s.server
        state = server.reload_state
        current = server.current
        if current is None and state is not None and state.old is None:
            current = state.new  # the first start
        workers: list[dict[str, Any]] = []
        serving: list[dict[str, Any]] = []
        for gen in list(server.generations):
            mon = gen.monitor
            if mon is None:
                continue
            for ws in mon._build_status():
                if gen is not current and ws.pid is None:
                    continue  # an old (or aborted) generation's worker already gone
                rss = cpu = None
                if resources and ws.pid is not None:
                    seen.add(ws.pid)
                    rss, cpu = run._resources.of(ws.pid)
                doc = schema.worker_to_json(ws, rss=rss, cpu_percent=cpu)
                doc["generation"] = gen.number
                workers.append(doc)
                if gen is current:
                    serving.append(doc)
        doc = schema.program_to_json(s.config.name, "serve", serving,
                                     numprocs=server.options.workers,
                                     gave_up=server.exit_code != 0)
        doc["workers"] = workers
        doc["generation"] = current.number if current is not None else None
        doc["reloading_to"] = (state.new.number if state is not None and state.old is not None
                               else None)
        return doc

    def _serve_named(self, name: Any) -> _Serve | None:
        return self.serves.get(name) if isinstance(name, str) else None

    def _serve_reload(self, s: _Serve, why: str) -> Deferred:
        """A rolling reload of a serve; the reply once it is done (or failed)."""
        deferred = Deferred()
        name = s.config.name

        def done(error: str | None) -> None:
            if error is None:
                gen = s.server.current
                deferred.resolve({"message": f"{name}: reloaded: generation "
                                             f"{gen.number if gen else '-'} serves"})
            else:
                deferred.fail(f"{name}: reload failed: {error}", "reload_failed")

        if not s.begun or s.closed:
            raise CommandError(f"serve {name!r} is not running", "not_started")
        if s.server.stopping:
            # Its first start failed (it stopped): start it anew, as a new Server.
            if not s.done:
                raise CommandError(f"serve {name!r} is stopping", "not_started")
            self._close_serve(s)
            try:
                s = self._make_serve(s.config)
            except (OSError, ValueError) as exc:
                raise CommandError(f"{name}: {exc}", "failed") from None
            self.serves[name] = s
            self._begin_serve(s)
        s.server.reload(why, done)  # during a start: told when that start is done
        return deferred

    def _serve_scale(self, s: _Serve, n: Any) -> dict[str, Any]:
        """``corral scale SERVE N``: the serving generation grows (forked from its zygote) or
        its highest-numbered workers drain; refused during a reload, a recycle or a stop."""
        self._serve_running(s)
        return s.server.scale_command(n)

    def _serve_signal(self, s: _Serve, index: Any, sig: Any) -> Any:
        """``corral signal SERVE[:INDEX] SIG``: to the workers' process groups (INDEX: of the
        serving generation; none: every worker of every live generation)."""
        self._serve_running(s)
        return s.server.signal_command(index, sig)

    def _serve_running(self, s: _Serve) -> None:
        if not s.begun or s.closed:
            raise CommandError(f"serve {s.config.name!r} is not running", "not_started")

    def _refuse_for_serve(self, s: _Serve, command: str) -> None:
        raise CommandError(f"{s.config.name!r} is a [serve] table: `corral reload "
                           f"{s.config.name}` (or restart) rolls it to a new generation; "
                           f"{command} is for [program] tables", "unsupported")

    # ------------------------------------------------------------------------------ reload

    def _prepare_serves(self, new: Config, old: Config) -> dict[str, Any]:
        """Before a config reload changes anything: added serves bound (and their own
        endpoints up), changed ones' settings checked. Raises CommandError (nothing is kept)."""
        prepared: dict[str, Any] = {}
        try:
            for name, cfg in new.serve.items():
                before = old.serve.get(name)
                if name in self._serve_replacing:
                    continue  # its successor begins with the settings of that moment
                if before is None or name not in self.serves:
                    prepared[name] = self._make_serve(cfg)
                elif before != cfg:
                    prepared[name] = self._serve_options(cfg)
        except (OSError, ValueError) as exc:
            for item in prepared.values():
                if isinstance(item, _Serve):
                    self._close_serve(item)
            log.error("reload refused, nothing changed: %s", exc)
            raise CommandError(str(exc), "bad_config") from None
        return prepared

    def _apply_serves(self, change: Any, prepared: dict[str, Any]) -> None:
        """Added serves begin, removed ones drain, changed ones roll (or are replaced)."""
        run = self._run()
        for name in change.serve_removed:
            s = self.serves.pop(name, None)
            if s is None:
                continue
            self._stop_serve(s, "removed from the config")
            self._serve_removing.append(s)
        for name, item in prepared.items():
            cfg = run.config.serve[name]
            if not isinstance(item, _Serve):  # changed settings
                s = self.serves[name]
                keys = {k for c in change.serve_changed if c.name == name for k in c.keys}
                s.config = cfg
                if not keys & _LISTENER_KEYS and not s.server.stopping and (
                        s.server.reconfigure(item)):
                    if s.begun and not run.stopping:
                        s.server.reload("config changed")
                    continue
                if keys & _LISTENER_KEYS:
                    log.warning("%s: %s changed: its sockets are closed once it has drained, "
                                "then bound anew", name,
                                ", ".join(sorted(keys & _LISTENER_KEYS)))
                self.serves.pop(name)
                self._stop_serve(s, "its listeners changed")
                self._serve_replacing[name] = s
                continue
            self.serves[name] = item  # added (or re-added while its old one drains)
            if not run.stopping:
                self._begin_serve(item)

