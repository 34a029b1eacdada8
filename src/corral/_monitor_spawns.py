"""The monitor's spawn part (a mixin of :class:`corral._monitor.Monitor`): asking the spawner
for a worker's process, starting it on the spawner thread (a Python worker, a standby or a
command), taking the result on the monitor thread, and a worker's readiness.

``_start_worker`` runs on the spawner thread; everything else on the monitor thread.
"""

from __future__ import annotations

import _imp
import logging
import multiprocessing
import multiprocessing.process
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from corral._bootstrap import (
    BootConfig,
    WorkerSettings,
    become_template,
    run_standby,
    run_worker,
    signals_to_reset,
    with_keeper_slot,
)
from corral._command import CommandProcess
from corral._eventlog import event_extra
from corral._fdlimit import explain_fd_error
from corral._forklocks import records_in_progress
from corral._keeper import keeper
from corral._slots import POOL, AfterStop, Deadline, SpawnRequest, WorkerSlot
from corral._spawner import SpawnSkipped, stuck_start_hint
from corral.events import EventKind, ExitRecord, StopReason
from corral.process import (
    DUMP_SIGNAL,
    ProcessLike,
    WorkerProcess,
    kill_unregistered,
    own_fd,
)
from corral.states import Trigger, WorkerState

if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.context import BaseContext

    from corral._command import Launch
    from corral._monitor_parts import _Core
    from corral._monitor_standby import Standby
    from corral._spawner import Spawner

    class _SpawnCore(_Core):
        _ctx: BaseContext
        _fork_extras: dict[str, Any]
        _settings: WorkerSettings | None
        _spawner: Spawner[SpawnRequest, ProcessLike]
        _collecting: list[SpawnRequest] | None
        _slow_start: float
        _slow_warned: SpawnRequest | None
        _fork_here_ok: bool
        _starts_out: int

        _standbys: dict[int, Standby]

        def _standby_spawned(self, sb: Standby, result: ProcessLike | BaseException,
                             conn: Connection | None) -> None: ...
        def _give_place(self, w: WorkerSlot, stdio: tuple[str | None, str | None] | None,
                        launch: Launch | None) -> bool: ...
        def _finish_handover(self, w: WorkerSlot, sb: Standby,
                             launch: Launch | None) -> None: ...
        def _after_death(self, w: WorkerSlot, trigger: Trigger, record: ExitRecord,
                         now: float) -> None: ...
        def _cb(self, fn: Callable[..., None]) -> Callable[..., None]: ...
        def _on_exit(self, w: WorkerSlot) -> None: ...
        def _remote_started(self, w: WorkerSlot, now: float) -> None: ...
        def _arm_liveness(self, w: WorkerSlot, now: float) -> None: ...
else:
    _SpawnCore = object

__all__ = ["SLOW_START", "TEMPLATE_MIN", "SpawnPart"]

# A pool's start with this many fork workers or more forks them from a template (for one or
# two, its bookkeeping would cost about what it saves).
TEMPLATE_MIN = 3
# A forkserver or spawn start still with the spawner thread after this many seconds (or the
# pool's startup_timeout, if shorter) is logged: a stopped or stuck forkserver never answers,
# and the slot would otherwise sit PENDING without a word. (A fork start cannot wait on
# another process: nothing is armed for it, nothing added to its restart path.)
SLOW_START = 10.0

S = WorkerState


class SpawnPart(_SpawnCore):
    """Starting workers, and their readiness."""

    def _start_worker(self, req: SpawnRequest) -> ProcessLike:
        spec = self.spec
        boot = req.boot
        assert boot is not None  # only a standby's handover has none, and is no start
        if req.standby is not None:
            ours, theirs = multiprocessing.Pipe(duplex=True)
            own_fd(ours.fileno())
            try:
                rest = (spec.target, theirs, spec.standby_init)
                proc = WorkerProcess.start(
                    self._ctx, run_standby, (boot, *rest), boot.name, spec.daemon,
                    settle=False, slot_args=lambda slot, path: (
                        with_keeper_slot(boot, slot, path), *rest))
            except BaseException:
                ours.close()
                raise
            finally:
                theirs.close()
            req.standby.pending_conn = ours
            return proc
        if spec.command is not None:
            try:
                return CommandProcess.start(spec.command, env=spec.env, cwd=spec.cwd,
                                            user=spec.user, group=spec.group, umask=spec.umask,
                                            launch=req.launch)
            finally:
                if req.launch is not None:
                    req.launch.close_child_ends()  # the child has its copies now
        # Settled by the spawner once its batch is forked (see Spawner).
        return WorkerProcess.start(
            self._ctx, run_worker, (boot, spec.target, req.args), boot.name, spec.daemon,
            settle=False, slot_args=lambda slot, path: (
                with_keeper_slot(boot, slot, path), spec.target, req.args))

    def _launch_io(self, w: WorkerSlot,
                   ) -> tuple[Launch | None, tuple[str | None, str | None] | None]:
        """The output pipes of ``w``'s next process (log capture), and their paths for a
        target worker to open (under every start method)."""
        launch = self._io.launch(w.index, w.name) if self._io is not None else None
        stdio: tuple[str | None, str | None] | None = None
        if launch is not None and self.spec.command is None:
            stdio = tuple(None if fd is None else f"/proc/{os.getpid()}/fd/{fd}"  # type: ignore[assignment]
                          for fd in (launch.stdout, launch.stderr))
        return launch, stdio

    def _spawn(self, w: WorkerSlot, now: float) -> None:
        """Queue a start of ``w`` for the spawner thread (state PENDING)."""
        w.generation += 1
        w.ready = False
        self._changes += 1
        # A new process starts with a clean health record: a check still hanging on its
        # predecessor is not its fault.
        w.health_pending, w.health_failures, w.health_last = None, 0, ""
        handed, w.handed = w.handed, None
        if handed is None:  # else reset before the handover was sent
            self._hb.reset(w.index)
        if w.started_once:
            w.restarts += 1
            w.last_restart = now
        w.started_once = True
        if handed is not None:  # sent ahead by the exit path: only the bookkeeping is left
            sb, launch = handed
            self._finish_handover(w, sb, launch)
            return
        try:
            launch, stdio = self._launch_io(w)
        except OSError as exc:
            # Its output pipes could not be made (out of fds): a start that failed, with
            # backoff and the restart budget, on the next round of the loop (never here: a
            # failure that lasts would recurse through the restart).
            failed = SpawnRequest(w.index, w.generation, None, w.args, None)
            self._reactor.call_soon_threadsafe(self._cb(self._spawned), failed, exc)
            return
        if self._standbys and self._give_place(w, stdio, launch):
            return  # a hot standby took its place: no process start
        boot = BootConfig(
            pool=self.spec.name, index=w.index, name=w.name, supervisor_pid=os.getpid(),
            heartbeat_path=self._hb.path,
            wake_path=f"/proc/{os.getpid()}/fd/{self._reactor.wake_fd}",
            ready_on_beat=self.spec.ready_when == "beat",
            dump_signal=DUMP_SIGNAL, forkserver=self.spec.start_method == "forkserver",
            reset_signals=signals_to_reset() if self._fork_extras else None,
            stdio=stdio, settings=self._settings, **self._fork_extras)
        req = SpawnRequest(w.index, w.generation, boot, w.args, launch)
        if self._slow_start:
            self._dl.set((w.index, Deadline.START), now + self._slow_start)
        if self._collecting is not None:
            self._collecting.append(req)
        elif self._may_fork_here():
            self._fork_here(req)
        else:
            self._starts_out += 1
            self._spawner.request(req)

    def _may_fork_here(self) -> bool:
        """Whether this fork restart may be forked on the loop thread itself, not handed to
        the spawner thread: no other start out (none with the spawner, none forked here and not
        yet taken: the first of a burst only), nothing the fork would wait for (the import
        lock, a corral record being handled). Waking the spawner and waiting for the GIL it
        needs while the loop does the exit's bookkeeping cost a restart after a quiet spell
        ~1 ms (see :meth:`_fork_here`)."""
        return (self._fork_here_ok and not self._starts_out and not self._stopping
                and not _imp.lock_held() and not records_in_progress())

    def _fork_here(self, req: SpawnRequest) -> None:
        """Fork ``req``'s worker now, on the loop thread: the replacement boots on the other
        CPU while the loop goes on with the exit's bookkeeping; the rest of a burst go to the
        spawner, which forks them while the loop works. The result is handed to the loop as a
        spawner's batch is (through the inbox with a wake: from a deadline, a restart after
        its backoff, the next round must run the inbox), and taken after this round's events."""
        self._starts_out += 1
        batch = [(req, self._spawner.start_here(req))]
        self._reactor.call_soon_threadsafe(self._cb(self._spawned_batch), batch)

    def _start_many(self, reqs: list[SpawnRequest]) -> list[ProcessLike | BaseException | None]:
        """A pool's first fork workers, from a single-threaded template (on the spawner
        thread). None for each request left to :meth:`_start_worker`: all of them if there
        are too few, or whatever a failed template did not start (logged)."""
        results: list[ProcessLike | BaseException | None] = [None] * len(reqs)
        if len(reqs) < TEMPLATE_MIN:
            return results
        from corral import _template  # ctypes, platform: only pools that start a batch

        reason = _template.unavailable()
        if reason is not None:
            self.log.debug("pool %r: no start template here (%s)", self.spec.name, reason)
            return results
        spec = self.spec
        procs = [self._ctx.Process(  # type: ignore[attr-defined]
            target=run_worker, args=(req.boot, spec.target, req.args),
            name=req.boot.name if req.boot is not None else None, daemon=spec.daemon)
            for req in reqs]

        def take(i: int, proc: multiprocessing.process.BaseProcess) -> None:
            try:
                results[i] = WorkerProcess(proc, "fork", settle=False)
            except BaseException as exc:  # a start that failed half-way: no orphan
                results[i] = exc
                kill_unregistered(proc)

        wake_fd = self._reactor.wake_fd
        title = f"corral: {spec.name} template"
        first = reqs[0].boot

        def prepare(keep: int) -> None:  # in the template, every signal blocked
            # What every worker would do alone, done once here.
            become_template((keep, wake_fd), first.reset_signals if first else None, title,
                            first.index if first else 0, first.dump_signal if first else None)

        try:
            reason = _template.fork_batch(procs, take, prepare)
        except Exception as exc:  # e.g. the template's fork: EAGAIN, ENOMEM
            reason = f"{type(exc).__name__}: {exc}"
        if reason is not None:
            left = sum(1 for r in results if r is None)
            self.log.warning("pool %r: the start template failed (%s); %d of %d worker(s) "
                             "forked from the supervisor instead", spec.name, reason, left,
                             len(reqs))
        return results

    def _start_slow(self, w: WorkerSlot, now: float) -> None:
        """``w`` has been PENDING :attr:`_slow_start` seconds (its START deadline). The spawner
        starts one process at a time: if the start under way has taken that long, it is
        logged (once); either way ``w`` is looked at again later (it may be queued behind)."""
        slow = self._slow_start
        current = self._spawner.current
        mono = time.monotonic()
        if current is None or mono - current[1] < slow:
            began = mono if current is None else current[1]
            self._dl.set((w.index, Deadline.START), now + began + slow - mono)
            return
        self._dl.set((w.index, Deadline.START), now + slow)
        req, began = current
        stuck = self._slots.get(req.index)
        if (req is self._slow_warned or stuck is None or self._stopping
                or stuck.after_stop is AfterStop.REMOVE):
            return  # said already; a standby's; or the stop or scale-down says what follows
        self._slow_warned = req
        behind = sum(1 for s in self._slots.values() if s.state is S.PENDING) - 1
        self.log.warning("worker %r (index %d): its start has not returned after %.0f s (%s); "
                         "the worker starts when it does%s", stuck.name, stuck.index,
                         mono - began, stuck_start_hint(self.spec.start_method),
                         f" ({behind} more start(s) wait behind it)" if behind > 0 else "")

    def _spawned_batch(self, batch: list[tuple[SpawnRequest, ProcessLike | BaseException]],
                       ) -> None:
        self._starts_out = max(0, self._starts_out - len(batch))
        for req, result in batch:
            if req.standby is not None:
                self._standby_spawned(req.standby, result, req.standby.pending_conn)
            else:
                self._spawned(req, result)

    def _request_standby(self, sb: Standby) -> None:
        boot = BootConfig(
            pool=self.spec.name, index=-1, name=f"{self.spec.name}-{sb.name}",
            supervisor_pid=os.getpid(), heartbeat_path=self._hb.path,
            wake_path=f"/proc/{os.getpid()}/fd/{self._reactor.wake_fd}",
            ready_on_beat=self.spec.ready_when == "beat", dump_signal=DUMP_SIGNAL,
            forkserver=self.spec.start_method == "forkserver",
            reset_signals=signals_to_reset() if self._fork_extras else None,
            settings=self._settings, **self._fork_extras)
        self._starts_out += 1
        self._spawner.request(SpawnRequest(-sb.id, 0, boot, (), None, sb))

    def _spawned(self, req: SpawnRequest, result: ProcessLike | BaseException) -> None:
        keeper.open_gate()  # the first starts are back: the keeper's own may begin
        index, generation, launch = req.index, req.generation, req.launch
        w = self._slots.get(index)
        if (w is None or w.generation != generation or w.state is not S.PENDING
                or self.finished.is_set()):
            if not isinstance(result, BaseException):  # a start nobody wants any more
                result.kill_and_reap()
            if launch is not None and self._io is not None:
                self._io.not_started(launch)
            return
        if self._slow_start:
            self._dl.cancel((index, Deadline.START))
        if isinstance(result, BaseException) and launch is not None and self._io is not None:
            self._io.not_started(launch)
        now = self._clock()
        if isinstance(result, BaseException):
            if isinstance(result, SpawnSkipped):
                self._move(w, Trigger.SPAWN_FAILED, S.STOPPED)
                return
            text = explain_fd_error(result)
            self.log.error("%s: could not start a process: %s", w.who, text,
                           exc_info=result if not isinstance(result, OSError) else None)
            record = ExitRecord(w.index, w.name, None, None, StopReason.SPAWN_FAILED,
                                time.time(), 0.0, text)
            self._after_death(w, Trigger.SPAWN_FAILED, record, now)
            return
        w.proc = result
        self._changes += 1
        if launch is not None and self._io is not None:
            self._io.started(w.index, w.name, result, launch)
        if w.died_at:
            self.stats.restarted(w.died_why, now - w.died_at)
            w.died_at = 0.0
        with self._live_lock:
            self._live[result.pid] = result
        # Exits after replies and commands of the same batch (priority 1).
        self._reactor.add_reader(result.waitable(), self._cb(lambda: self._on_exit(w)),
                                 priority=1)
        self._move(w, Trigger.SPAWNED, S.STARTING)
        if self._remote:
            self._remote_started(w, now)
        event = self._emit(EventKind.SPAWNED, w)
        self.log.info("%s started", w.who, extra=event_extra(self.log, logging.INFO, event))
        if w.stop_reason is not None:
            # Stopped while it was being started: stop it now that it exists, within what is
            # left of the pool's deadline if the whole pool is stopping.
            grace = max(0.0, self._stop_deadline - now) if self._stopping else None
            self._signal_stop(w, now, grace=grace)
            return
        if self.spec.max_age is not None:
            jitter = self._rng.uniform(-self.spec.max_age_jitter, self.spec.max_age_jitter)
            self._dl.set((w.index, Deadline.AGE),
                                       result.started + self.spec.max_age * (1 + jitter))
        if self.spec.max_memory is not None and (POOL, Deadline.MEMORY) not in self._dl:
            self._dl.set((POOL, Deadline.MEMORY),
                                       now + self.spec.memory_check_interval)
        if self.spec.ready_when == "started":
            self._become_ready(w)
        self._arm_liveness(w, now)

    def _become_ready(self, w: WorkerSlot) -> None:
        self._move(w, Trigger.READY, S.RUNNING if w.state is not S.STOPPING else S.STOPPING)
        if w.state is S.RUNNING:
            w.ready = True
            self._changes += 1
            event = self._emit(EventKind.READY, w)
            self.log.debug("%s is ready", w.who,
                           extra=event_extra(self.log, logging.DEBUG, event))
            now = self._clock()
            self._arm_liveness(w, now)
            if self.spec.health_check is not None:
                w.health_failures = 0
                self._dl.set((w.index, Deadline.HEALTH),
                                           now + self.spec.health_check_interval)
            if self._rolling_current == w.index:
                self._rolling_advance()
            self._check_ready_waiters()

    def _scan_ready(self, now: float) -> None:
        if not self._counts[S.STARTING]:
            return
        for w in list(self._slots.values()):
            if w.state is S.STARTING and w.proc is not None and (
                    self._hb.ready_at(w.index) > 0
                    or (self.spec.ready_when == "beat" and self._hb.last_beat(w.index) > 0)):
                self._become_ready(w)
