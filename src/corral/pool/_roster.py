"""Who is in a pool: every worker record, the idle queue, and the counts kept in step."""

from __future__ import annotations

import contextlib
import os
from collections import deque

from corral.heartbeat import HeartbeatTable
from corral.pool._records import PoolWorker, WorkerState
from corral.pool._shared import PoolShared

__all__ = ["Roster"]

_SPAWNING, _BOOTING, _IDLE, _BUSY, _LEAVING = (
    WorkerState.SPAWNING, WorkerState.BOOTING, WorkerState.IDLE, WorkerState.BUSY,
    WorkerState.LEAVING)
_READINESS = {_IDLE: 0, _BOOTING: 1, _SPAWNING: 2}  # which spare takes a place first


class Roster:
    """The records of one pool's workers (manager thread only).

    Every state change goes through :meth:`set_state`, which keeps the counts right: the
    manager decides on them (start more? close now?) without walking the records.
    """

    def __init__(self, shared: PoolShared, table: HeartbeatTable) -> None:
        self._shared = shared
        self._table = table
        # Every record by id, leaving ones too, until its exit is handled. Example:
        # {12: <busy, pid 4242, task 7>, 13: <idle, pid 4243>, 14: <spare, booting, pid 4250>}.
        self.workers: dict[int, PoolWorker] = {}
        self.idle: deque[PoolWorker] = deque()  # idle non-spare workers, longest idle first
        self.active = 0  # non-spare records not LEAVING: places taken (<= max_workers)
        self.spares = 0  # spare records not LEAVING (<= spare_workers)
        self.busy = 0  # records BUSY
        self.spawning = 0  # starts requested from the spawner thread, not delivered yet
        self._free_slots: list[int] = []  # heartbeat slots of forgotten workers, e.g. [3, 0]
        self._next_slot = 0  # the next never-used slot

    def add(self, spare: bool) -> PoolWorker:
        """A new record, SPAWNING, in a free heartbeat slot (cleared)."""
        if self._free_slots:
            slot = self._free_slots.pop()
        else:
            slot = self._next_slot
            self._next_slot += 1
            self._table.ensure(slot + 1)
        self._table.reset(slot)
        w = PoolWorker(self._shared.next_id(), slot, spare)
        self.workers[w.id] = w
        if spare:
            self.spares += 1
        else:
            self.active += 1
        self.spawning += 1
        return w

    def set_state(self, w: PoolWorker, new: WorkerState) -> None:
        old = w.state
        delta = (new is not _LEAVING) - (old is not _LEAVING)
        if w.spare:
            self.spares += delta
        else:
            self.active += delta
        if old is _BUSY:
            self.busy -= 1
        if new is _BUSY:
            self.busy += 1
        w.state = new

    def remove_idle(self, w: PoolWorker) -> None:
        if w.state is _IDLE:
            with contextlib.suppress(ValueError):
                self.idle.remove(w)

    def forget(self, w: PoolWorker) -> None:
        """Drop a record whose process is gone (or never was); its slot is free again."""
        del self.workers[w.id]
        self._free_slots.append(w.slot)
        if w.statm >= 0:
            os.close(w.statm)
            w.statm = -1

    def promotable(self) -> list[PoolWorker]:
        """The spares that may take a worker's place, the readiest first."""
        return sorted((w for w in self.workers.values() if w.spare and w.state in _READINESS
                       and not (w.eof or w.dead or w.dumping)),
                      key=lambda w: (_READINESS[w.state], w.id))

    def promote(self, w: PoolWorker) -> None:
        """The spare ``w`` takes a worker's place."""
        self.spares -= 1
        self.active += 1
        w.spare = False

    def publish(self) -> None:
        """Publish the pids for worker_pids() and spare_pids()."""
        workers = self.workers.values()
        # Spares apart: max_workers is what the user sees running tasks (see spare_workers).
        self._shared.pids = tuple(w.proc.pid for w in workers
                                  if w.proc is not None and not w.spare)
        self._shared.spare_pids = tuple(w.proc.pid for w in workers
                                        if w.spare and w.proc is not None)
