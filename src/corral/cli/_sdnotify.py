"""``corral run`` under systemd (a part of :class:`corral.cli.runner.CorralRun`): what it tells
``$NOTIFY_SOCKET`` about the whole config, through the same :class:`~corral._notify.Notifier`
as ``corral serve``. Nothing happens without ``NOTIFY_SOCKET``.

    start:   STATUS while starting -> READY=1 once every program is ready (or ended by itself)
             and every serve has min_ready workers accepting
    reload:  RELOADING=1 + MONOTONIC_USEC at a config reload (SIGHUP, ``corral reload``) or a
             serve's rolling reload -> READY=1 once what it changed has settled (ready, or
             failed: the service runs on, as corral serve does on an aborted reload)
    stop:    STOPPING=1 -> EXTEND_TIMEOUT_USEC every 5 s while a long stop goes on
    always:  WATCHDOG=1 every WATCHDOG_USEC/2 from the loop; STATUS when the summary changes

The hosted serves' own notifiers are silent: only corral run speaks to systemd.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from corral._notify import Notifier

if TYPE_CHECKING:
    from corral._reactor import Reactor
    from corral.cli._programs import _Program
    from corral.cli._serves import _Serve
    from corral.cli.config import Config

    class _Core:
        reactor: Reactor[Any]
        config: Config
        programs: dict[str, _Program]
        serves: dict[str, _Serve]
        stopping: bool
        _pending: list[str]
        _replacing: dict[str, tuple[_Program, _Program]]
        _serve_replacing: dict[str, _Serve]

        def _done(self) -> bool: ...
else:
    _Core = object

log = logging.getLogger("corral.run")

__all__ = ["SystemdPart"]

_EVERY = 0.05  # the summary is recomputed at most this often (a busy loop turns a lot)
_MAX_NAMES = 4


class SystemdPart(_Core):
    """sd_notify for ``corral run`` (mixed into CorralRun)."""

    notifier: Notifier

    def _init_systemd(self) -> None:
        # Taken from the environment now, before any child exists: no worker inherits them.
        self.notifier = Notifier()
        self._sd_ready = False  # READY=1 sent once
        self._sd_reloading = False  # RELOADING=1 sent, READY=1 not yet
        self._sd_next = 0.0
        self._sd_timer: Any = None

    def _sd_begin(self) -> None:
        if self.notifier.enabled:
            self.notifier.status("starting")
            self.notifier.start_watchdog(self.reactor)

    def _sd_reload_begins(self, what: str) -> None:
        """A config reload (before anything changes) or a serve's rolling reload (any cause):
        RELOADING=1, once READY=1 was sent; READY=1 follows once everything has settled."""
        if self.notifier.enabled and self._sd_ready and not self._sd_reloading:
            self._sd_reloading = True
            self.notifier.reloading(f"reloading {what}")

    def _sd_stopping(self, why: str) -> None:
        if not self.notifier.enabled:
            return
        self.notifier.stopping(f"stopping ({why})")
        if (self._sd_stop_left() or 0.0) > Notifier.EXTEND_EVERY:
            self.notifier.keep_extending(self.reactor, self._sd_stop_left)

    def _sd_stop_left(self) -> float | None:
        """A bound on the time the stop may still take (None: it is over): the longest
        stop_timeout of a program still running, and each draining serve's deadline."""
        if self._done():
            return None
        left = 0.0
        for prog in self.programs.values():
            if prog.monitor is not None and not prog.finished:
                left = max(left, prog.config.stop_timeout)
        for s in self.serves.values():
            serve_left = s.server.stop_left() if s.begun else None
            if serve_left is not None:
                left = max(left, serve_left)
        return left

    # ------------------------------------------------------------------------ each round

    def _advance_systemd(self) -> None:
        """After each loop round (throttled): READY / RELOADING / STATUS as things settle."""
        if not self.notifier.enabled:
            return
        now = time.monotonic()
        if now < self._sd_next:
            if self._sd_timer is None:
                self._sd_timer = self.reactor.call_later(self._sd_next - now, self._sd_tick)
            return
        self._sd_next = now + _EVERY
        if self.stopping:
            self.notifier.status(self._sd_stop_line())
            return
        if not self._sd_ready:
            if self._sd_settled(failures_ok=False):
                self._sd_ready = True
                self.notifier.ready(self._sd_line())
            else:
                self.notifier.status(self._sd_line())
            return
        if self._sd_reloading and self._sd_settled(failures_ok=True):
            self._sd_reloading = False
            self.notifier.ready(self._sd_line())
            return
        self.notifier.status(self._sd_line())

    def _sd_tick(self) -> None:
        self._sd_timer = None
        self._advance_systemd()

    def _sd_settled(self, failures_ok: bool) -> bool:
        """Every program ready (or ended by itself, or held stopped) and every serve ready
        with no reload under way; ``failures_ok``: a program that gave up, a serve whose start
        failed and a program waiting for one of them count as settled too."""
        if self._replacing or self._serve_replacing:
            return False
        failed: set[str] = set()
        for name, prog in self.programs.items():
            state = _program_state(prog)
            if state == "failed":
                failed.add(name)
            elif state != "settled" and prog.monitor is not None:
                return False
        for name, s in self.serves.items():
            if _rolling(s):  # (a first start counts from min_ready workers: s.ready)
                return False
            if s.server.stopping:
                failed.add(name)
            elif not s.ready:
                return False
        if failed and not failures_ok:
            return False
        for name in self._pending:  # waiting for their dependencies
            prog = self.programs[name]
            if not (failures_ok and _waits_for_failed(prog.config.depends_on, failed,
                                                      self.programs)):
                return False
        return True

    def _sd_line(self) -> str:
        """The one-line summary: workers ready, and who is not."""
        ready = total = 0
        waiting: list[str] = []
        failed: list[str] = []
        for name, prog in self.programs.items():
            mon = prog.monitor
            state = _program_state(prog)
            if mon is not None:
                for w in mon._slots.values():
                    total += 1
                    ready += w.ready and w.state.value == "running"
            if state == "failed":
                failed.append(name)
            elif state != "settled":
                waiting.append(name)
        for name, s in self.serves.items():
            server = s.server
            total += server.options.workers
            gen = server.current
            ready += gen.counts()[0] if gen is not None else 0
            if server.stopping:
                failed.append(name)
            elif not s.ready:
                waiting.append(name)
        rolling = [f"{name} to generation {s.server.reload_state.new.number}"
                   for name, s in self.serves.items() if _rolling(s)
                   and s.server.reload_state is not None]
        text = (f"{ready}/{total} workers ready ({len(self.programs)} program(s), "
                f"{len(self.serves)} serve(s))")
        if rolling:
            text += "; reloading " + _names(rolling)
        if waiting:
            text += "; waiting for " + _names(waiting)
        if failed:
            text += "; failed: " + _names(failed)
        return text

    def _sd_stop_line(self) -> str:
        left = sum(1 for p in self.programs.values()
                   if p.monitor is not None and not p.finished)
        left += sum(1 for s in self.serves.values() if s.begun and not s.server.done)
        return f"stopping: {left} program(s) and serve(s) still running"


def _rolling(s: _Serve) -> bool:
    state = s.server.reload_state
    return s.begun and state is not None and state.old is not None


def _program_state(prog: _Program) -> str:
    """"settled" (ready, ended by itself, or held), "failed" (gave up) or "busy"."""
    mon = prog.monitor
    if mon is None:
        return "busy"  # not started yet
    if mon.gave_up is not None:
        return "failed"
    if prog.finished:
        return "settled"
    slots = mon._slots
    if not slots and prog.config.numprocs:
        return "busy"  # hosted: the pool's slots appear at its first round
    for w in slots.values():
        state = w.state.value
        if not ((state == "running" and w.ready) or state in ("exited", "stopped")):
            return "busy"
    return "settled"


def _waits_for_failed(deps: tuple[str, ...], failed: set[str],
                      programs: dict[str, _Program], seen: frozenset[str] = frozenset()
                      ) -> bool:
    for dep in deps:
        if dep in failed:
            return True
        prog = programs.get(dep)
        if prog is not None and prog.monitor is None and dep not in seen and (
                _waits_for_failed(prog.config.depends_on, failed, programs, seen | {dep})):
            return True
    return False


def _names(names: list[str]) -> str:
    if len(names) <= _MAX_NAMES:
        return ", ".join(names)
    return ", ".join(names[:_MAX_NAMES]) + f" and {len(names) - _MAX_NAMES} more"
