"""The monitor's exit part (a mixin of :class:`corral._monitor.Monitor`): a worker's process
ended; record it, and decide what comes next for its slot: stay stopped, go away, restart at
once, wait for its group, or restart per the policy (backoff, budget, cooldown).

On the monitor thread only; it uses the monitor's state (see ``_monitor.py``).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from corral._eventlog import event_extra
from corral._slots import AfterStop, Deadline, WorkerSlot
from corral.events import Event, EventKind, ExitRecord, StopReason
from corral.exitstatus import ExitStatus
from corral.policy import RestartPolicy, Strategy
from corral.process import ProcessLike
from corral.states import Trigger, WorkerState

if TYPE_CHECKING:
    from corral._monitor_parts import _Core
else:
    _Core = object

__all__ = ["ExitPart"]

S = WorkerState


class ExitPart(_Core):
    """Exits and the decisions after them."""

    def _on_exit(self, w: WorkerSlot) -> None:
        proc = w.proc
        if proc is None:
            return
        # Its exit is certain (the pidfd or the sentinel said so): a standby can be sent
        # into its place before anything else, if the restart does not depend on the status.
        with self._hand_lock:
            w.exit_seen = proc.pid
            self._handover_first(w, proc, None, self._clock())
        try:
            self._on_exit_steps(w, proc)
        finally:
            if w.handed is not None:  # no restart took it (see _handover_first)
                sb, launch = w.handed
                w.handed = None
                self._withdraw_handover(sb)
                if launch is not None and self._io is not None:
                    self._io.not_started(launch)

    def _on_death_notice(self, index: int, pid: int, watch_thread: bool = False) -> bool:
        """The death watch says worker ``index``'s process ``pid`` has begun to exit (its
        death lock was freed by the kernel): a standby can go into its place now, a moment
        before the pidfd tells. Only if that process is ``w``'s and really exiting (an exec
        frees the lock too); everything else waits for the pidfd.

        Called on the watch's thread first (``watch_thread``), then on the monitor's; the
        first that can send the standby does. The watch's thread leaves it to the monitor when
        the worker's output pipes are involved (they are the monitor thread's).

        Returns:
            True if this call sent a standby into the place.
        """
        with self._hand_lock:
            w = self._slots.get(index)
            proc = w.proc if w is not None else None
            if (w is None or proc is None or proc.pid != pid or w.handed is not None
                    or w.exit_seen == pid or (watch_thread and self._io is not None)):
                return False
            from corral._robust import is_exiting  # loaded by the death watch already

            if not is_exiting(pid):
                return False
            self._handover_first(w, proc, None, self._clock())
            handed = w.handed is not None
        if handed and self.log.isEnabledFor(logging.DEBUG):
            self.log.debug("%s (pid %s) has begun to exit (its death lock was freed): a "
                           "standby goes into its place before the exit is reaped", w.who, pid)
        return handed

    def _on_exit_steps(self, w: WorkerSlot, proc: ProcessLike) -> None:
        # Take the rest of its group down while the dead worker still holds the group id, and
        # stop other threads signalling it before its pid can be reused.
        proc.kill_group_leftovers()
        with self._live_lock:
            self._live.pop(proc.pid, None)
        status = proc.reap()
        if status is None:
            with self._live_lock:
                self._live[proc.pid] = proc
            return  # not really gone yet (cannot happen with pidfds); wait again
        now = self._clock()
        if w.handed is None:
            self._handover_first(w, proc, status, now)
        self._reactor.remove_reader(proc.waitable())
        for kind in (Deadline.KILL, Deadline.DUMP, Deadline.HEALTH, Deadline.HEALTH_TIMEOUT,
                     Deadline.AGE):
            self._dl.cancel((w.index, kind))
        if w.dump is not None:
            w.dump.close()
            w.dump = None
        if w.stop_reason is not None:
            reason = w.stop_reason
        elif getattr(proc, "exit_reason", None) is not None:  # a Ray actor: Ray's word
            reason = proc.exit_reason  # type: ignore[attr-defined]
        elif status.signal is not None:
            reason = StopReason.KILLED
        else:
            reason = StopReason.EXITED
        detail = w.stop_detail
        remote_detail = getattr(proc, "exit_detail", None)
        if remote_detail:
            detail = f"{detail}\n{remote_detail}" if detail else remote_detail
        record = ExitRecord(w.index, w.name, proc.pid, status, reason, time.time(),
                            now - proc.started, detail)
        w.proc = None
        w.ready = False
        self._changes += 1
        self._after_death(w, Trigger.EXITED, record, now)
        # After the decision (a standby may already run in its place): the rest can wait.
        proc.close()
        if self._io is not None:
            self._io.ended(w.index, proc.pid)

    def _handover_first(self, w: WorkerSlot, proc: ProcessLike, status: ExitStatus | None,
                        now: float) -> None:
        """Send a ready standby into ``w``'s place before the exit's bookkeeping, when the
        policy is sure to restart ``w`` at once (the common case of a standby's use: a crash
        after a healthy run). The restart the policy then decides completes the handover
        (``_spawn``); anything less certain takes the usual path.

        Mirrors :meth:`_decide` and :meth:`_restart_per_policy` without changing anything;
        every check holds as well a moment later, when the policy decides. ``status`` is None
        before the reap: then only a restart that does not depend on it qualifies.
        """
        with self._hand_lock:
            self._handover_first_locked(w, proc, status, now)

    def _handover_first_locked(self, w: WorkerSlot, proc: ProcessLike,
                               status: ExitStatus | None, now: float) -> None:
        if (w.handed is not None or self._stopping or self._remote
                or self._take_standby() is None):
            return
        after = w.after_stop
        if after is AfterStop.POLICY:
            if w.stop_reason is not None:
                return
            policy = self.spec.restart_policy
            if status is None:
                if policy is not RestartPolicy.ALWAYS:
                    return
                wanted = True
            else:
                wanted = policy.wants_restart(clean_exit=status.clean and status.signal is None)
            if (self.spec.supervision_strategy is not Strategy.ONE_FOR_ONE or not wanted
                    or not self._budget.allows(now)
                    or not w.backoff.restarts_at_once(now - proc.started)):
                return
            cooldown = self.spec.restart_cooldown
            if cooldown > 0 and w.last_restart > 0 and w.last_restart + cooldown > now:
                return
        elif after is not AfterStop.RESTART:
            return
        launch, stdio = self._launch_io(w)
        self._hb.reset(w.index)
        sb = self._send_handover(w, stdio)
        if sb is None:
            if launch is not None and self._io is not None:
                self._io.not_started(launch)
            return
        w.handed = (sb, launch)

    def _after_death(self, w: WorkerSlot, trigger: Trigger, record: ExitRecord,
                     now: float) -> None:
        """Record an ended process and decide what comes next for its slot."""
        w.last_exit = record
        self._history.append(record)
        self.stats.exited(record)
        w.died_at, w.died_why = now, record.reason.name.lower()
        after, w.stop_reason, w.stop_detail = w.after_stop, None, None
        w.after_stop = AfterStop.POLICY
        event = self._emit(EventKind.EXITED, w, exit=record)
        delayed: list[tuple[float, Event]] = []
        try:
            self._decide(w, trigger, record, now, after, delayed)
        finally:
            # Logged after the decision: a replacement (a standby) is already on its way. The
            # restart's delay after the exit it follows, naming the pid that ended.
            self._log_exit(record, event)
            for delay, restarting in delayed:
                self.log.info("worker %r (index %d, pid %s) restarts in %.3fs (failure %d in "
                              "a row)", w.name, w.index, record.pid, delay, w.backoff.streak,
                              extra=event_extra(self.log, logging.INFO, restarting))

    def _decide(self, w: WorkerSlot, trigger: Trigger, record: ExitRecord, now: float,
                after: AfterStop, delayed: list[tuple[float, Event]]) -> None:
        if self._stopping or after is AfterStop.STAY:
            self._move(w, trigger, S.STOPPED)
        elif after is AfterStop.REMOVE:
            self._move(w, trigger, S.STOPPED)
            self._remove(w)
            self._check_ready_waiters()
        elif after is AfterStop.RESTART:
            self._emit(EventKind.RESTARTING, w, delay=0.0)
            self._restart_at(w, trigger, now, now)
        elif after is AfterStop.GROUP:
            self._move(w, trigger, S.BACKOFF)  # waits for its group
            if self._group is not None:
                self._group.down.discard(w.index)
                self._group_maybe_restart(now)
        else:
            self._restart_per_policy(w, trigger, record, now, delayed)
        if self._rolling_current == w.index:
            if record.pid != self._rolling_old:
                self._rolling_failed(w, record)  # its replacement ended before it was ready
            elif w.state not in (S.PENDING, S.BACKOFF):
                self._rolling_advance()  # no replacement is coming (removed, or held)

    def _restart_per_policy(self, w: WorkerSlot, trigger: Trigger, record: ExitRecord,
                            now: float, delayed: list[tuple[float, Event]]) -> None:
        """Restart ``w`` per the restart policy, budget and backoff, or give up. A restart
        with a delay goes into ``delayed`` (logged after the exit)."""
        clean = (record.exit is not None and record.exit.clean
                 and record.reason is StopReason.EXITED)
        if not self.spec.restart_policy.wants_restart(clean_exit=clean):
            self._move(w, trigger, S.EXITED)
            self.log.info("%s will not be restarted (restart=%r)", w.who,
                          self.spec.restart_policy.value)
            self._check_ready_waiters()
            return
        spent = self._budget.try_spend(now)
        self._changes += 1
        self.stats.budget_remaining = self._budget.remaining(now)
        if not spent:
            self._move(w, trigger, S.STOPPED)
            self._give_up(now)
            return
        delay = w.backoff.on_death(record.uptime, self._rng)
        cooldown = self.spec.restart_cooldown
        if cooldown > 0 and w.last_restart > 0:
            # At least `cooldown` between two restarts of this worker: the first is at once,
            # a crash loop is throttled, a worker that ran longer than that restarts at once.
            delay = max(delay, w.last_restart + cooldown - now)
        if self._restart_group(w, trigger, now, delay):
            return
        event = self._emit(EventKind.RESTARTING, w, delay=delay)
        if delay > 0 and self.log.isEnabledFor(logging.INFO):
            delayed.append((delay, event))
        self._restart_at(w, trigger, now + max(delay, 0.0), now)

    def _restart_at(self, w: WorkerSlot, trigger: Trigger, when: float, now: float) -> None:
        """Start ``w`` again at ``when``: at once, or from BACKOFF when its delay is over.

        A start that failed always waits for the next round, even without a delay (a backoff
        with ``reset_after=0``, an explicit restart): never a start retried from within its own
        failure (its slot is still PENDING).
        """
        if when <= now and trigger is not Trigger.SPAWN_FAILED:
            self._move(w, trigger, S.PENDING)
            self._spawn(w, now)
        else:
            self._move(w, trigger, S.BACKOFF)
            self._dl.set((w.index, Deadline.BACKOFF), when)
