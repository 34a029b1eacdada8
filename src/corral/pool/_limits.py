"""A busy worker's limits: its task's timeout and its memory, and the stack dump taken before a
hung worker is killed (after a task timeout, or a startup timeout).

The manager owns the records; this keeps their timers. A limit that trips takes the worker out
of service through the manager's ``leave`` and fails (or retries) the task through its
``task_lost``, both handed in with the timer (not kept: no reference cycle with the manager).
"""

from __future__ import annotations

import logging
import math
import os
import signal
from collections.abc import Callable

from corral._evidence import STEP, StackDump
from corral._reactor import Reactor
from corral.exitstatus import ExitStatus
from corral.heartbeat import HeartbeatTable
from corral.pool._records import (
    DeadlineKey,
    LeaveReason,
    PoolConfig,
    PoolWorker,
    Task,
    WorkerDeadline,
    WorkerState,
)
from corral.pool.errors import MemoryLimitExceeded, TaskTimeout, WorkerLost

__all__ = ["Limits", "rss"]

log = logging.getLogger("corral.procpool")

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_TIMER, _DUMP = WorkerDeadline.TIMER, WorkerDeadline.DUMP

Leave = Callable[[PoolWorker, LeaveReason, "bool | None"], None]
TaskLost = Callable[[Task, WorkerLost], None]


def rss(w: PoolWorker) -> int | None:
    """The worker's resident set size, bytes (None if it cannot be read: it is dying).

    Read after every task, so it has to be cheap: psutil costs several times more than a pread
    of /proc/<pid>/statm (the same number), which is tried first.
    """
    import psutil  # only pools with a memory limit need it

    try:
        if w.statm < 0 and w.ps is None and w.proc is not None:
            try:
                w.statm = os.open(f"/proc/{w.proc.pid}/statm", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                w.ps = psutil.Process(w.proc.pid)
        if w.statm >= 0:
            return int(os.pread(w.statm, 128, 0).split()[1]) * _PAGE_SIZE
        return int(w.ps.memory_info().rss) if w.ps is not None else None
    except (OSError, IndexError, ValueError, psutil.Error):
        return None


class Limits:
    """Task timeouts, memory checks and stack dumps of one pool's workers.

    Args:
        cfg: the pool's settings.
        loop: the manager's reactor (``(worker id, TIMER)`` and ``(worker id, DUMP)``).
        table: the heartbeat table, whose slots hold the workers' dump fds.
        counters: the pool's stats.
    """

    def __init__(self, cfg: PoolConfig, loop: Reactor[DeadlineKey], table: HeartbeatTable,
                 counters: dict[str, int]) -> None:
        self._cfg = cfg
        self._loop = loop
        self._table = table
        self._counters = counters

    def started(self, w: PoolWorker, t: Task, now: float) -> None:
        """``t`` was just sent to ``w``: arm its timeout and ``w``'s memory checks."""
        if t.timeout is not None:
            t.deadline = now + t.timeout
        if self._cfg.max_memory_per_worker is not None:
            w.next_mem = now + self._cfg.memory_check_interval
        self.arm(w)

    def arm(self, w: PoolWorker) -> None:
        """Make sure a timer covers the running task's timeout and its next memory check.

        Lazy: a timer that fires early (set for an earlier task) re-arms itself, so a stream of
        tasks costs one heap entry per worker per timeout, not one per task.
        """
        t = w.task
        need = min(t.deadline if t is not None else math.inf, w.next_mem)
        if need == math.inf:
            return
        key = (w.id, _TIMER)
        current = self._loop.deadline(key)
        if current is None or need < current:
            self._loop.set_deadline(key, need)

    def on_timer(self, w: PoolWorker, now: float, leave: Leave, task_lost: TaskLost) -> None:
        """``w``'s timer fell: its task timed out, or its memory is checked.

        Args:
            leave: the manager's ``leave(worker, reason, kill)``.
            task_lost: the manager's ``task_lost(task, error)`` (it may retry the task).
        """
        t = w.task
        if w.state is not WorkerState.BUSY or t is None:
            return
        if now >= t.deadline:
            w.task = None
            self._counters["timeouts"] += 1
            leave(w, LeaveReason.TIMEOUT, None)
            w.dump_task = t
            log.warning("pool %r: %s ran past its timeout of %gs on worker pid %s; collecting "
                        "a stack dump, then killing it", self._cfg.name, t.label, t.timeout,
                        w.pid)
            self.dump_then_kill(w, now)
            return
        limit = self._cfg.max_memory_per_worker
        if limit is not None and now >= w.next_mem:
            w.next_mem = now + self._cfg.memory_check_interval
            used = rss(w)
            if used is not None and used > limit:
                self._memory_kill(w, t, used, limit, leave, task_lost)
                return
        self.arm(w)

    def _memory_kill(self, w: PoolWorker, t: Task, used: int, limit: int, leave: Leave,
                     task_lost: TaskLost) -> None:
        pid = w.pid
        w.task = None
        self._counters["killed_memory"] += 1
        leave(w, LeaveReason.KILLED_MEMORY, True)
        attempts = f" (attempt {t.attempts} of {t.retries + 1})" if t.retries else ""
        msg = (f"worker pid {pid} used {used} bytes of memory (RSS) while running {t.label}, "
               f"over max_memory_per_worker={limit}; it was killed{attempts}")
        log.warning("pool %r: %s", self._cfg.name, msg)
        task_lost(t, MemoryLimitExceeded(msg, pid, ExitStatus(signal=signal.SIGKILL), t.attempts,
                                         used, limit))

    # -- evidence

    def dump_then_kill(self, w: PoolWorker, now: float) -> None:
        """Ask ``w`` for a stack dump; SIGKILL it once the dump is written (or cannot be)."""
        assert w.proc is not None
        w.dumping = True
        dump = StackDump.begin(w.proc, self._table.read(w.slot).dump_fd, now)
        if isinstance(dump, str):  # why there will be none
            self.dump_done(w, dump)
            return
        w.dump = dump
        self._loop.set_deadline((w.id, _DUMP), now + STEP)

    def on_dump_step(self, w: PoolWorker, now: float) -> None:
        if w.dump is None:
            return
        text = w.dump.poll(now)
        if text is None:
            self._loop.set_deadline((w.id, _DUMP), now + STEP)
        else:
            self.dump_done(w, text)

    def dump_done(self, w: PoolWorker, dump: str) -> None:
        """The dump is complete (or ``dump`` says why there is none): kill ``w``, and hand the
        evidence to its timed-out task, or to its exit record after a startup timeout."""
        w.dumping = False
        w.dump = None
        self._loop.cancel_deadline((w.id, _DUMP))
        if w.proc is not None and not w.dead:
            w.proc.send_group(signal.SIGKILL)
        t = w.dump_task
        if t is None:  # a startup timeout: the evidence goes with the boot failure
            w.init_error = (f"it did not finish starting within startup_timeout="
                            f"{self._cfg.startup_timeout:g}s. Its stack when it was stopped:\n"
                            f"{dump.rstrip()}")
            return
        w.dump_task = None
        msg = (f"{t.label} did not finish within its timeout of {t.timeout:g}s; worker pid "
               f"{w.pid} was killed. Its stack when it was stopped:\n{dump.rstrip()}")
        t.resolve(exc=TaskTimeout(msg, t.timeout or 0.0, w.pid, dump))
