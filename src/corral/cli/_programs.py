"""One program of ``corral run``: its workers' IO (log pipes, notify sockets, readiness
probes), its record (the pool running it now), and its face for the HTTP endpoint."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import corral
from corral._command import Launch
from corral._logs import (
    LogRecord,
)
from corral._notify import NotifyMessage, NotifySocket
from corral._observe import PoolSummary, PoolView, SupervisorSource
from corral._readiness import LogMatcher, Prober, ReadyHttp, ReadyLog, ReadyNotify, ReadyTcp
from corral.cli.config import ProgramConfig
from corral.process import ProcessLike, own_fd

if TYPE_CHECKING:
    from corral.cli.runner import CorralRun

log = logging.getLogger("corral.run")


def log_pipes(env: dict[str, str] | None = None) -> Launch:
    """A start's stdout and stderr pipes (the child's write ends, our read ends)."""
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    for fd in (out_r, err_r):
        own_fd(fd)  # a fork-started sibling must not hold our read ends
    return Launch(env=env or {}, stdout=out_w, stderr=err_w, readers=(out_r, err_r))


def attach_pipes(run: CorralRun, launch: Launch, program: str, index: int, pid: int) -> None:
    """The hub reads (and from now on owns) the read ends of a started worker's pipes."""
    out_r, err_r = launch.readers
    launch.readers = ()
    run.hub.attach(out_r, program, index, pid, "stdout")
    run.hub.attach(err_r, program, index, pid, "stderr")


class KeptPipes:
    """The child ends of target workers' log pipes, kept open until each worker exits (it
    opens them through /proc as it boots). The pipe-keeping part of a WorkerIO."""

    def __init__(self) -> None:
        self.kept: dict[int, Launch] = {}

    def keep(self, index: int, launch: Launch) -> None:
        old = self.kept.pop(index, None)
        if old is not None:
            old.close_child_ends()
        self.kept[index] = launch

    def not_started(self, launch: Launch) -> None:
        launch.close_child_ends()
        launch.close_readers()

    def release(self, index: int) -> None:
        kept = self.kept.pop(index, None)
        if kept is not None:
            kept.close_child_ends()

    def release_all(self) -> None:
        for kept in self.kept.values():
            kept.close_child_ends()
        self.kept.clear()


class ProgramIO(KeptPipes):
    """The worker IO of one program: log pipes, a notify socket per worker, readiness probes.

    Runs on the loop thread (the monitor calls it there, hosted on the same reactor).
    """

    def __init__(self, run: CorralRun, prog: ProgramConfig) -> None:
        super().__init__()
        self.run = run
        self.prog = prog
        self.pids: dict[int, int] = {}  # index -> the pid of its current process
        self.notify: dict[int, NotifySocket] = {}
        self.probes: dict[int, Prober] = {}
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
        # Like supervisord's process_num: a command can tell which worker it is (a port
        # offset, a shard).
        env = {"CORRAL_PROGRAM": self.prog.name, "CORRAL_INDEX": str(index),
               "CORRAL_WORKER": name}
        if self.prog.needs_notify_socket:
            env["NOTIFY_SOCKET"] = self._notify_socket(index, name).address
            if self.prog.heartbeat_timeout is not None:
                env["WATCHDOG_USEC"] = str(int(self.prog.heartbeat_timeout * 1e6))
        launch = log_pipes(env)
        launch.listeners = tuple(self.run.listeners_for(self.prog))
        return launch

    def started(self, index: int, name: str, proc: ProcessLike, launch: Launch) -> None:
        self.pids[index] = proc.pid
        attach_pipes(self.run, launch, self.prog.name, index, proc.pid)
        if self.prog.kind == "target":
            self.keep(index, launch)
        ready = self.prog.ready
        if isinstance(ready, ReadyTcp | ReadyHttp):
            pid = proc.pid
            self.probes[index] = Prober(self.run.reactor, ready,
                                        lambda: self._ready(index, pid))

    def ended(self, index: int, pid: int) -> None:
        if self.pids.get(index) == pid:
            del self.pids[index]
        probe = self.probes.pop(index, None)
        if probe is not None:
            probe.cancel()
        self.release(index)

    def close(self) -> None:
        for probe in self.probes.values():
            probe.cancel()
        self.probes.clear()
        for sock in self.notify.values():
            sock.close()
        self.notify.clear()
        self.release_all()
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
            if msg.status is None:  # shown by status and top, as systemd shows deactivating
                monitor.mark_status(index, pid, "stopping")

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


class _ProgramSource:
    """One program of a ``corral run`` as the HTTP endpoint sees it (a
    :class:`~corral._observe.PoolSource`): whichever pool runs the program now (a reload that
    changes it swaps the pool), or "not started" while it waits for its dependencies.

    Called on the endpoint's thread: it only reads ``run.programs`` (one dict lookup) and asks
    the pool's monitor through its inbox, as :class:`SupervisorSource` does.
    """

    def __init__(self, run: CorralRun, name: str) -> None:
        self._run = run
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    def _current(self) -> SupervisorSource | None:
        prog = self._run.programs.get(self._name)
        if prog is None or prog.supervisor is None:
            return None
        return SupervisorSource(prog.supervisor, prog.config.kind)

    def ping(self, timeout: float) -> bool:
        src = self._current()
        if src is not None:
            return src.ping(timeout)
        # Not started yet: the loop that will start it must answer.
        done = threading.Event()
        try:
            self._run.reactor.call_soon_threadsafe(done.set)
        except RuntimeError:
            return False
        return done.wait(timeout)

    def observe(self, timeout: float, detail: bool = False) -> PoolView:
        src = self._current()
        if src is not None:
            return src.observe(timeout, detail)
        prog = self._run.programs.get(self._name)
        kind = prog.config.kind if prog is not None else "command"
        return PoolView(name=self._name, kind=kind, state="new", summary=PoolSummary.of(()),
                        workers=(), timeout=timeout)
