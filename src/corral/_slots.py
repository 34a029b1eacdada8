"""The monitor's record of one worker slot and the monitor's typed vocabulary.

A slot is a worker index: it keeps its name, arguments, backoff streak and restart count while
successive processes come and go in it.
"""

from __future__ import annotations

import enum
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from corral.events import ExitRecord, StopReason
from corral.policy import BackoffState
from corral.process import ProcessLike
from corral.states import WorkerState

if TYPE_CHECKING:
    from corral._bootstrap import BootConfig
    from corral._command import Launch
    from corral._evidence import StackDump

__all__ = ["POOL", "AfterStop", "Deadline", "DeadlineKey", "SpawnRequest", "WorkerSlot"]


class AfterStop(enum.Enum):
    """What follows the exit of a process corral decided to stop."""

    POLICY = "policy"  # nothing decided: the restart policy (and backoff, budget) decides
    RESTART = "restart"  # start it again at once (restart(i), rolling restart, recycling)
    REMOVE = "remove"  # scaled down: the slot goes away
    STAY = "stay"  # the pool is stopping: it stays STOPPED
    GROUP = "group"  # restarted with its group (one_for_all / rest_for_one)


class Deadline(enum.Enum):
    """The monitor's deadline kinds. A key is ``(slot index, kind)``, or ``(POOL, kind)``.

    ========================  =====================================================  =========
    kind                      falls when                                             owner
    ========================  =====================================================  =========
    BACKOFF                   a slot's restart delay is over                         a slot
    KILL                      a stopping process's grace is over: SIGKILL            a slot
    DUMP                      time to look whether a stack dump is complete          a slot
    HEALTH                    time for a custom health check                         a slot
    HEALTH_TIMEOUT            a health check runs too long: a failure                a slot
    AGE                       max_age reached: recycle                               a slot
    START                     a start (forkserver, spawn) has not returned: warn     a slot
    STOP                      the pool's stop deadline: SIGKILL every straggler      POOL
    MEMORY                    time to measure the workers' RSS                       POOL
    GROUP                     a group restart's backoff is over                      POOL
    LIVENESS                  look at the heartbeats (hosted monitors only)          POOL
    STANDBY                   a new standby may start (its backoff is over)          POOL
    PROBE                     time to probe the remote workers (backend="ray")       POOL
    ========================  =====================================================  =========

    A monitor with a thread of its own keeps the liveness look apart from the heap (it moves at
    every look: see ``Monitor._live_at``); a hosted one uses LIVENESS.
    """

    BACKOFF = "backoff"
    KILL = "kill"
    DUMP = "dump"
    HEALTH = "health"
    HEALTH_TIMEOUT = "health timeout"
    AGE = "age"
    STOP = "stop"
    MEMORY = "memory"
    GROUP = "group"
    PROBE = "probe"
    LIVENESS = "liveness"
    STANDBY = "standby"
    START = "start"


POOL = -1  # the owner of pool-wide deadlines
DeadlineKey = tuple[int, Deadline]


@dataclass(eq=False)
class WorkerSlot:
    """One worker index and its current process, if any.

    Attributes (examples for a pool "web" of 4, slot 2, after a crash and a restart):
        index, name, args: 2, "web-2", ("hello",): fixed for the slot.
        backoff: its failure streak (policy.BackoffState).
        state: WorkerState.RUNNING.
        proc: the current process (pid 4242), None between processes.
        generation: 2 (bumped at every start: a late spawn result of generation 1 is dropped).
        restarts: 1; last_restart: monotonic time of that restart (the cool-down counts from
            it).
        ready: True once RUNNING and ready.
        last_exit: the ExitRecord of its previous process ("killed by signal, SIGKILL(-9)").
        stop_reason, after_stop, stop_detail: set when corral decides to stop the current
            process (StopReason.HUNG, AfterStop.POLICY, "no heartbeat for 5.0s").
        dump: a stack dump being taken (see _evidence), or None.
        health_failures, health_pending, health_last: the custom check's record.
    """

    index: int
    name: str
    args: tuple[object, ...]
    backoff: BackoffState
    state: WorkerState = WorkerState.PENDING
    proc: ProcessLike | None = None
    generation: int = 0
    restarts: int = 0
    last_restart: float = 0.0
    started_once: bool = False
    ready: bool = False
    last_exit: ExitRecord | None = None
    stop_reason: StopReason | None = None
    after_stop: AfterStop = AfterStop.POLICY
    stop_detail: str | None = None
    dump: StackDump | None = None  # while a stack dump is being taken
    health_failures: int = 0
    health_pending: Future[bool] | None = None
    health_last: str = ""
    liveness: Any = None  # remote workers: a corral.ray.Liveness fed by probes
    probe: Any = None  # remote workers: (the outstanding probe's future, when it was sent)
    remote: Any = None  # remote workers: the last probe reply (a ProbeReply)
    died_at: float = 0.0  # monotonic time its last process's end was seen (metrics)
    died_why: str = ""  # the StopReason value of that end
    # A standby already told to take this slot's place by the exit path, before the policy's
    # bookkeeping (see ExitPart._handover_first); the restart it decides completes it.
    handed: Any = None
    # The pid whose exit the monitor thread has taken up: a late death notice for it is moot.
    exit_seen: int = 0

    @property
    def who(self) -> str:
        pid = self.proc.pid if self.proc else None
        return f"worker {self.name!r} (index {self.index}, pid {pid})"


@dataclass(frozen=True)
class SpawnRequest:
    """One start for the spawner thread (or a standby's handover, with no ``boot``)."""

    index: int
    generation: int
    boot: BootConfig | None
    args: tuple[Any, ...]
    launch: Launch | None = None  # pipes and env from the worker IO
    standby: Any = None  # a hot standby's start (an _monitor_standby.Standby; index < 0)
