"""``ProcessPool(backend="ray")``: the pool's workers are Ray actors that corral manages.

One actor per pool worker (:class:`~corral.ray._pool_actor.PoolActor`, ``max_restarts=0``,
``max_task_retries=0``), so the initializer, recycling and per-worker identity work as in the
local pool; the executor (:mod:`corral.pool.executor`), its futures, the task queue
(:class:`~corral.pool._shared.PoolShared`), the restart budget and backoff
(:class:`~corral.pool._failures.Brakes`) and the reading of replies
(:mod:`corral.pool._replies`) are the local pool's. Data flow::

    submit() --cloudpickle--> pending deque --wake()--------------------------+
    future.cancel() of a running task, shutdown(), terminate() --post()------+
    Ray completes a call (boot, run, stacks, watch) --ObjectRef.future()      |
        callback, on a Ray thread --call_soon_threadsafe()-------------------+
    a deadline (task timeout, dump, boot, backoff, stop) -------------------+
    a local actor's pidfd readable (its process is gone) -------------------+
                                                                           v
                                         RayPoolManager, on the manager thread

Each worker has one pending ``watch()`` call that never returns, so its death is known
whenever it happens (Ray fails the pending calls of a dead actor within milliseconds): a death
while a task runs fails that task alone with :class:`~corral.pool.WorkerLost` (or runs it again
elsewhere, ``retries``); an idle worker's death is replaced. A task past its timeout gets a
stack dump from the actor's "ctl" thread, then the actor is killed (``ray.kill``, and SIGKILL
when its process is on this machine) and the task fails with :class:`~corral.pool.TaskTimeout`.
A worker that left is forgotten once Ray has reported its end and, on this machine, its process
is gone (a pidfd), so ``shutdown(wait=True)`` returns with no worker process left.

What does not apply: ``start_method`` (Ray starts the processes), ``max_memory_per_worker``
(refused: use ``ray_options={"memory": ...}`` and Ray's memory monitor) and ``stop_timeout``
for a graceful quit (an idle actor has nothing to finish: recycling and shutdown kill it).
"""

from __future__ import annotations

import atexit
import contextlib
import enum
import logging
import os
import pickle
import random
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

from corral._reactor import Reactor
from corral.events import ExitRecord, StopReason
from corral.exitstatus import ExitStatus
from corral.pool._failures import BootFailure, Brakes, Break
from corral.pool._records import LeaveReason, PoolConfig, Task
from corral.pool._replies import InitFailed, interpret, unreadable
from corral.pool._runner import RunnerFront
from corral.pool._shared import PoolShared
from corral.pool._wire import WireKind
from corral.pool.errors import PoolBroken, TaskTimeout, WorkerLost
from corral.ray._backend import _driver_node, _is_ray_worker, validate_options
from corral.ray._exit import DeathCause, decode

__all__ = ["RayPoolManager", "RayPoolRunner", "pool_options"]

log = logging.getLogger("corral.procpool")

DEFAULT_STARTUP_TIMEOUT = 60.0  # an actor no node can host pends for ever otherwise
DUMP_WAIT = 0.5  # how long a timed-out task's actor gets to send its stacks before the kill
KILL_GRACE = 1.0  # after ray.kill, when a local process still there is SIGKILLed
STOP_SLACK = 5.0  # after stop_timeout, how long Ray gets to report killed actors' ends


def pool_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``ray_options`` of a pool: actor options as for a Supervisor, but no ``name`` (every
    worker would need it: a named actor is one per cluster).

    Raises:
        TypeError, ValueError: as :func:`corral.ray.validate_options`, or ``name`` given.
    """
    out = validate_options(options)
    if "name" in out:
        raise ValueError(f"ray_options must not set 'name' for a ProcessPool (each worker is "
                         f"an actor of its own; a name is unique in a cluster), got "
                         f"name={out['name']!r}")
    return out


class _State(enum.Enum):
    BOOTING = "booting"  # actor created, boot() (the initializer) running
    IDLE = "idle"
    BUSY = "busy"
    LEAVING = "leaving"  # killed, or dead: waiting for Ray's report and the process to go


class _Deadline(enum.Enum):
    TIMER = "timer"  # the running task's timeout
    DUMP = "dump"  # the stack dump of a timed-out task did not come: kill anyway
    BOOT = "boot"  # not booted within startup_timeout
    KILL = "kill"  # ray.kill was this long ago and its process on this machine is still there


_BACKOFF, _STOP = "backoff", "stop"  # the pool's own deadlines


class _Worker:
    """The manager's record of one actor, from its creation to its end."""

    __slots__ = ("actor", "booted", "dead", "dump_task", "id", "init_error", "init_exc",
                 "init_summary", "leave_reason", "node_id", "pid", "pidfd", "slot", "spare",
                 "started", "state", "task", "tasks_done")

    def __init__(self, wid: int, slot: int, spare: bool, now: float) -> None:
        self.id = wid
        self.slot = slot
        self.spare = spare
        self.state = _State.BOOTING
        self.actor: Any = None
        self.pid: int | None = None
        self.node_id = ""
        self.pidfd = -1  # a pidfd of its process, when it runs on this machine
        self.started = now
        self.booted = False
        self.dead = False  # Ray reported its end
        self.task: Task | None = None
        self.tasks_done = 0
        self.leave_reason: LeaveReason | None = None
        self.dump_task: Task | None = None  # the timed-out task waiting for its stack dump
        self.init_error: str | None = None
        self.init_summary: str | None = None
        self.init_exc: BaseException | None = None

    def who(self) -> str:
        node = f", node {self.node_id[:12]}" if self.node_id else ""
        return f"worker pid {self.pid}{node}" if self.pid else f"worker {self.slot} (starting)"


class RayPoolManager:
    """Every worker and task record of one Ray pool; only the manager thread calls it.

    Args:
        shared: what the submitting threads share with it.
        loop: its reactor (deadlines, pidfds, and the hand-overs from Ray's threads).
        options: actor options (``ray_options``, checked).
        post: ``post(fn, *args)`` runs ``fn(*args)`` on the manager thread (from any thread).
    """

    def __init__(self, shared: PoolShared, loop: Reactor[Any], options: Mapping[str, Any],
                 post: Callable[..., None], *, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None) -> None:
        self.cfg = cfg = shared.cfg
        self.shared = shared
        self._counters = shared.counters
        self._loop = loop
        self._options = dict(options)
        self._post = post
        self._clock = clock
        self._brakes = Brakes(cfg, rng)
        self._workers: dict[int, _Worker] = {}
        self._idle: deque[_Worker] = deque()
        self._free_slots: list[int] = []
        self._next_slot = 0
        self._spawn_after = 0.0
        self._startup_timeout = (DEFAULT_STARTUP_TIMEOUT if cfg.startup_timeout is None
                                 else cfg.startup_timeout)
        self._local_node = _driver_node()
        self._closing = False
        self.done = False

    # ---------------------------------------------------------------------------- bookkeeping

    def _count(self, spare: bool) -> int:
        return sum(1 for w in self._workers.values()
                   if w.spare is spare and w.state is not _State.LEAVING)

    def _busy(self) -> int:
        return sum(1 for w in self._workers.values() if w.state is _State.BUSY)

    def _publish(self) -> None:
        ws = self._workers.values()
        self.shared.pids = tuple(w.pid for w in ws if w.pid and not w.spare)
        self.shared.spare_pids = tuple(w.pid for w in ws if w.pid and w.spare)

    def _watch(self, ref: Any, callback: Callable[..., None], *args: Any) -> None:
        """Call ``callback(*args, future)`` on the manager thread when ``ref`` completes."""
        post = self._post
        ref.future().add_done_callback(lambda fut: post(callback, *args, fut))

    def after_round(self, now: float) -> None:
        if self._idle and self.shared.pending:
            self._dispatch()
        cfg = self.cfg
        if (self._count(False) < cfg.max_workers
                or self._count(True) < cfg.spare_workers):
            self.fill(now)
        if self.shared.shutdown_requested or self.shared.broken is not None:
            self._maybe_close(now)

    # ------------------------------------------------------------------------------ starting

    def fill(self, now: float) -> None:
        if self._closing or self.shared.broken is not None:
            return
        cfg = self.cfg
        if self._count(False) < cfg.max_workers:
            # Spares take the places first, the booted ones before those still starting.
            spares = sorted((w for w in self._workers.values()
                             if w.spare and w.state is not _State.LEAVING),
                            key=lambda w: not w.booted)
            for w in spares:
                if self._count(False) >= cfg.max_workers:
                    break
                w.spare = False
                self._counters["spares_promoted"] += 1
                if w.state is _State.IDLE:
                    self._became_idle(w)
            if spares:
                self._publish()
        if now < self._spawn_after:
            return
        while self._count(False) < cfg.max_workers:
            if not self._spawn(spare=False, now=now):
                return
        while self._count(True) < cfg.spare_workers:
            if not self._spawn(spare=True, now=now):
                return

    def _spawn(self, spare: bool, now: float) -> bool:
        """Create one actor and start its boot (non-blocking). False if that failed."""
        from corral.ray._pool_actor import pool_actor_class

        if self._free_slots:
            slot = self._free_slots.pop()
        else:
            slot, self._next_slot = self._next_slot, self._next_slot + 1
        w = _Worker(self.shared.next_id(), slot, spare, now)
        try:
            cls = pool_actor_class()
            w.actor = cls.options(**self._options).remote() if self._options else cls.remote()
            boot = w.actor.boot.remote(self.cfg.initializer, self.cfg.initargs)
            watch = w.actor.watch.remote()
        except Exception as exc:  # the cluster went away, an option Ray refuses, pickling
            self._free_slots.append(slot)
            if w.actor is not None:
                self._kill_actor(w)
            self._counters["boot_failures"] += 1
            record = ExitRecord(slot, f"{self.cfg.name}-{slot}", None, None,
                                StopReason.SPAWN_FAILED, time.time(), 0.0,
                                f"{type(exc).__name__}: {exc}")
            verdict = self._brakes.start_error(exc, record)
            if verdict is not None:
                self._break(verdict)
            else:
                self._crashed(record, now, boot=True)
            return False
        self._workers[w.id] = w
        self._watch(boot, self._on_boot, w)
        self._watch(watch, self._on_end, w)
        self._loop.set_deadline((w.id, _Deadline.BOOT), now + self._startup_timeout)
        return True

    def _on_boot(self, w: _Worker, fut: Future[Any]) -> None:
        if w.dead or w.state is not _State.BOOTING:
            return  # killed meanwhile, or its death was handled
        try:
            pid, node, frame = fut.result(timeout=0)
        except BaseException as exc:  # the actor died (os._exit in the initializer, OOM...)
            self._on_end(w, fut, exc)
            return
        w.pid, w.node_id = int(pid), str(node)
        try:
            msg = pickle.loads(frame)
        except BaseException as exc:
            msg = (WireKind.INIT_FAILED, f"its initializer's exception could not be "
                   f"unpickled here ({type(exc).__name__}: {exc})", None)
        if msg == (WireKind.HELLO,):
            self._hello(w)
            return
        reply = interpret(msg, None, False, f"pool {self.cfg.name!r}: {w.who()}")
        if isinstance(reply, InitFailed):
            w.init_error, w.init_summary, w.init_exc = reply.error, reply.summary, reply.exc
        # Its initializer raised: the worker ends, as a local one exits with code 1.
        now = self._clock()
        self._leave(w, None)
        status = ExitStatus(code=1)
        record = ExitRecord(w.slot, f"{self.cfg.name}-{w.slot}", w.pid, status,
                            StopReason.EXITED, time.time(), now - w.started, w.init_error)
        self._boot_failed(w, status, "its initializer raised", record, now)

    def _hello(self, w: _Worker) -> None:
        now = self._clock()
        w.booted = True
        w.started = now
        self._loop.cancel_deadline((w.id, _Deadline.BOOT))
        self._brakes.booted()
        self._counters["started"] += 1
        if w.node_id and w.node_id == self._local_node and w.pid and _is_ray_worker(w.pid):
            with contextlib.suppress(OSError):
                w.pidfd = os.pidfd_open(w.pid)
        log.debug("pool %r: %s is ready", self.cfg.name, w.who())
        w.state = _State.IDLE
        self._publish()
        self._became_idle(w)

    def _boot_failed(self, w: _Worker, status: ExitStatus, how: str, record: ExitRecord,
                     now: float) -> None:
        self._counters["boot_failures"] += 1
        verdict = self._brakes.boot_failure(
            BootFailure(w.pid or 0, status, how, record, w.init_error, w.init_summary,
                        w.init_exc), broken=self.shared.broken is not None)
        if verdict is not None:
            self._break(verdict)
            return
        self._crashed(record, now, boot=True)

    # --------------------------------------------------------------------------------- tasks

    def _became_idle(self, w: _Worker) -> None:
        if w.spare or w.dead or w.state is not _State.IDLE:
            return
        t = self.shared.next_task()
        if t is not None:
            self._send(w, t)
        else:
            self._idle.append(w)

    def _dispatch(self) -> None:
        while self._idle:
            t = self.shared.next_task()
            if t is None:
                return
            self._send(self._idle.popleft(), t)

    def _send(self, w: _Worker, t: Task) -> None:
        t.attempts += 1
        t.worker = w  # type: ignore[assignment]  # the Ray record stands for a PoolWorker
        w.task = t
        w.state = _State.BUSY
        if t.timeout is not None:
            t.deadline = self._clock() + t.timeout
            self._loop.set_deadline((w.id, _Deadline.TIMER), t.deadline)
        self._watch(w.actor.run.remote(t.payload), self._on_ran, w, t)
        self.shared.task_stats.task_started(t.future._mark, self._clock())

    def _on_ran(self, w: _Worker, t: Task, fut: Future[Any]) -> None:
        if w.task is not t or w.state is not _State.BUSY:
            return  # given up on (timeout, cancellation), or its worker's death was handled
        try:
            frame = fut.result(timeout=0)
        except BaseException as exc:  # the actor died while running it
            self._on_end(w, fut, exc)
            return
        self._loop.cancel_deadline((w.id, _Deadline.TIMER))
        try:
            msg = pickle.loads(frame)
        except BaseException as exc:  # a __reduce__ may raise anything, SystemExit included
            self._finished(w, t, unreadable(exc, t.label, w.who()), ok=False)
            return
        if type(msg) is tuple and len(msg) == 2 and msg[0] == WireKind.RESULT:
            self._finished(w, t, msg[1], ok=True)
            return
        reply = interpret(msg, t.label, False, f"pool {self.cfg.name!r}: {w.who()}")
        if isinstance(reply, BaseException):
            self._finished(w, t, reply, ok=False)

    def _finished(self, w: _Worker, t: Task, value: Any, ok: bool) -> None:
        w.task = None
        t.worker = None
        w.tasks_done += 1
        self._counters["tasks_done"] += 1
        w.state = _State.IDLE
        limit = self.cfg.max_tasks_per_worker
        if limit is not None and w.tasks_done >= limit:
            self._counters["recycled_tasks"] += 1
            self._leave(w, LeaveReason.RECYCLED_TASKS)
        else:
            self._became_idle(w)  # the next task goes out before this result is delivered
        if ok:
            t.resolve(value)
        else:
            t.resolve(exc=value)

    def _task_lost(self, t: Task, exc: WorkerLost) -> None:
        self.shared.task_lost(t, exc, self._closing)

    # ------------------------------------------------------------------------------- leaving

    def _kill_actor(self, w: _Worker) -> None:
        """End the actor's process now (``ray.kill``). Ray asks the process to exit and
        SIGKILLs it only seconds later if it does not (a stopped one, say): one on this
        machine still there after KILL_GRACE is SIGKILLed by corral."""
        import ray

        try:
            ray.kill(w.actor, no_restart=True)
        except Exception as exc:  # gone already, or the cluster went away
            log.debug("pool %r: ray.kill of %s: %s", self.cfg.name, w.who(), exc)
        if w.pidfd >= 0:
            self._loop.set_deadline((w.id, _Deadline.KILL), self._clock() + KILL_GRACE)

    def _leave(self, w: _Worker, reason: LeaveReason | None, kill: bool = True) -> None:
        """Take ``w`` out of service (``reason`` None: it failed to start), and kill its actor
        unless ``kill`` is False (a stack dump first)."""
        with contextlib.suppress(ValueError):
            self._idle.remove(w)
        w.state = _State.LEAVING
        w.leave_reason = reason
        for kind in (_Deadline.TIMER, _Deadline.BOOT):
            self._loop.cancel_deadline((w.id, kind))
        if w.pidfd >= 0 and not self._loop.watching(w.pidfd):
            self._loop.add_reader(w.pidfd, lambda: self._on_process_gone(w))
        if kill:
            self._kill_actor(w)

    def _on_process_gone(self, w: _Worker) -> None:
        self._loop.remove_reader(w.pidfd)
        os.close(w.pidfd)
        w.pidfd = -1
        self._maybe_forget(w)

    def _maybe_forget(self, w: _Worker) -> None:
        """Forget a worker that left, once Ray reported its end and its process is gone."""
        if w.state is _State.LEAVING and w.dead and w.pidfd < 0 and w.task is None \
                and w.dump_task is None and self._workers.pop(w.id, None) is not None:
            for kind in _Deadline:
                self._loop.cancel_deadline((w.id, kind))
            self._free_slots.append(w.slot)
            self._publish()

    def _on_end(self, w: _Worker, fut: Future[Any], exc: BaseException | None = None) -> None:
        """Ray reported that the actor has ended (a pending call failed)."""
        if w.dead:
            return
        if exc is None:
            try:
                exc = fut.exception(timeout=0)
            except BaseException as err:  # cancelled
                exc = err
        w.dead = True
        end = decode(exc)
        prior = w.state
        now = self._clock()
        if prior is _State.LEAVING:
            # corral killed it (recycling, timeout, cancellation, shutdown), or its end was
            # handled already: no news.
            log.debug("pool %r: %s (%s) ended: %s", self.cfg.name, w.who(),
                      w.leave_reason.value if w.leave_reason else "left", end.describe())
            self._maybe_forget(w)
            self.fill(now)
            return
        # It died by itself.
        self._leave(w, None, kill=end.cause in (DeathCause.UNAVAILABLE, DeathCause.ERROR))
        self._counters["workers_lost"] += 1
        uptime = now - w.started
        record = end.record(w.slot, f"{self.cfg.name}-{w.slot}", w.pid, uptime)
        t = w.task
        if t is not None:
            w.task = None
            self._loop.cancel_deadline((w.id, _Deadline.TIMER))
            attempts = f" (attempt {t.attempts} of {t.retries + 1})" if t.retries else ""
            self._task_lost(t, WorkerLost(
                f"{w.who()} died while running {t.label}: {end.describe()}{attempts}", w.pid,
                end.exit, t.attempts))
        elif not w.booted:
            status = end.exit or ExitStatus.unknown_status("Ray does not say how the actor's "
                                                           "process ended")
            w.init_error = w.init_error or (end.detail.strip() or None)
            self._boot_failed(w, status, end.describe(), record, now)
            self._maybe_forget(w)
            return
        else:
            log.warning("pool %r: %s %s died: %s", self.cfg.name,
                        "spare" if w.spare else "idle", w.who(), end.describe())
        self._maybe_forget(w)
        self._crashed(record, now, boot=not w.booted)

    def _crashed(self, record: ExitRecord, now: float, boot: bool) -> None:
        if self.shared.broken is not None:
            self._brakes.history.append(record)
            return
        delay = self._brakes.charge(record, now, boot)
        if isinstance(delay, Break):
            self._break(delay)
            return
        if delay > 0:
            self._spawn_after = max(self._spawn_after, now + delay)
            self._loop.set_deadline(_BACKOFF, self._spawn_after)
            log.info("pool %r: next worker start in %.3fs (failure %d in a row)",
                     self.cfg.name, delay, self._brakes.streak)
        self.fill(now)

    def _break(self, verdict: Break) -> None:
        log.error("%s", verdict.message)
        broken = PoolBroken(verdict.message, list(self._brakes.history))
        broken.__cause__ = verdict.cause
        with self.shared.lock:
            self.shared.broken = broken
        self._loop.cancel_deadline(_BACKOFF)
        self.shared.fail_pending(self.shared.broken_error)

    # ----------------------------------------------------------------------------- deadlines

    def on_deadline(self, key: Any, now: float) -> None:
        if key == _BACKOFF:
            self.fill(now)
            return
        if key == _STOP:
            for w in list(self._workers.values()):
                log.warning("pool %r: Ray did not report the end of %s within %gs of the "
                            "shutdown; forgetting it", self.cfg.name, w.who(),
                            self.cfg.stop_timeout + STOP_SLACK)
                self._kill_actor(w)
                if w.pidfd >= 0:
                    with contextlib.suppress(OSError):
                        signal.pidfd_send_signal(w.pidfd, signal.SIGKILL)
                    self._loop.remove_reader(w.pidfd)
                    os.close(w.pidfd)
                    w.pidfd = -1
                w.dead = True
                self._maybe_forget(w)
            return
        wid, kind = key
        found = self._workers.get(wid)
        if found is None:
            return
        w = found
        if kind is _Deadline.TIMER:
            t = w.task
            if w.state is _State.BUSY and t is not None and now >= t.deadline:
                self._timed_out(w, t)
        elif kind is _Deadline.DUMP:
            self._dumped(w, None)
        elif kind is _Deadline.KILL and w.pidfd >= 0:
            log.warning("pool %r: %s was still there %gs after ray.kill; sending SIGKILL",
                        self.cfg.name, w.who(), KILL_GRACE)
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(w.pidfd, signal.SIGKILL)
        elif kind is _Deadline.BOOT and w.state is _State.BOOTING:
            why = (f"its actor did not start within startup_timeout={self._startup_timeout:g}s "
                   "(no node with the resources asked for? see `ray status`), or its "
                   "initializer did not return")
            log.error("pool %r: %s: %s; killing it", self.cfg.name, w.who(), why)
            w.init_error = why
            self._leave(w, None)
            status = ExitStatus.unknown_status("killed by corral: startup timeout")
            record = ExitRecord(w.slot, f"{self.cfg.name}-{w.slot}", w.pid, status,
                                StopReason.SPAWN_FAILED, time.time(), now - w.started, why)
            self._boot_failed(w, status, "startup timeout", record, now)

    def _timed_out(self, w: _Worker, t: Task) -> None:
        w.task = None
        self._counters["timeouts"] += 1
        w.dump_task = t
        self._leave(w, LeaveReason.TIMEOUT, kill=False)
        log.warning("pool %r: %s ran past its timeout of %gs on %s; collecting a stack dump, "
                    "then killing its actor", self.cfg.name, t.label, t.timeout, w.who())
        self._loop.set_deadline((w.id, _Deadline.DUMP), self._clock() + DUMP_WAIT)
        self._watch(w.actor.stacks.remote(), self._dumped, w)

    def _dumped(self, w: _Worker, fut: Future[Any] | None) -> None:
        t = w.dump_task
        if t is None:
            return
        w.dump_task = None
        self._loop.cancel_deadline((w.id, _Deadline.DUMP))
        dump = f"(no stack dump: the actor did not answer within {DUMP_WAIT:g}s)"
        if fut is not None:
            try:
                dump = str(fut.result(timeout=0))
            except BaseException as exc:
                dump = f"(no stack dump: {type(exc).__name__}: {exc})"
        self._kill_actor(w)
        msg = (f"{t.label} did not finish within its timeout of {t.timeout:g}s; corral killed "
               f"the Ray actor of {w.who()}. Its stack when it was stopped:\n{dump.rstrip()}")
        t.resolve(exc=TaskTimeout(msg, t.timeout or 0.0, w.pid, dump))
        self._maybe_forget(w)

    # ------------------------------------------------------------------------------ commands

    def cancel_running(self, t: Task) -> None:
        if t.done:
            return
        w = t.worker
        t.drop()
        if isinstance(w, _Worker) and w.task is t and w.state is _State.BUSY:
            w.task = None
            self._counters["cancelled_running"] += 1
            log.info("pool %r: %s was cancelled while running; killing the actor of %s",
                     self.cfg.name, t.label, w.who())
            self._leave(w, LeaveReason.CANCELLED)

    def shutdown(self, cancel_futures: bool) -> None:
        if cancel_futures:
            # The next tasks of workers still starting are as good as started (as in the
            # local pool and concurrent.futures): they run.
            active = self._count(False)
            self.shared.cancel_pending(0 if self._closing else max(0, active - self._busy()))

    def terminate(self) -> None:
        self.shared.cancel_pending(0)
        for w in list(self._workers.values()):
            for t in (w.task, w.dump_task):
                if t is not None:
                    t.drop()
                    t.future._cancel(allow_running=True)
            if w.task is not None or w.dump_task is not None:
                w.task = w.dump_task = None
                self._leave(w, LeaveReason.TERMINATED)
        for w in list(self._workers.values()):
            self._maybe_forget(w)

    def _maybe_close(self, now: float) -> None:
        if not self._closing:
            if self._busy() or self.shared.has_pending():
                return
            self._closing = True
            for w in list(self._workers.values()):
                if w.state is not _State.LEAVING:
                    self._leave(w, LeaveReason.SHUTDOWN)
            self._loop.cancel_deadline(_BACKOFF)
            self._loop.set_deadline(_STOP, now + self.cfg.stop_timeout + STOP_SLACK)
        if not self._workers:
            self.done = True

    def emergency(self) -> None:
        """The manager failed: kill every actor and fail every task, so nothing hangs."""
        message = "the pool's manager thread failed (a bug in corral; see the log)"
        with self.shared.lock:
            self.shared.broken = PoolBroken(f"pool {self.cfg.name!r} is broken: {message}",
                                            list(self._brakes.history))
        for w in list(self._workers.values()):
            for t in (w.task, w.dump_task):
                if t is not None:
                    t.resolve(exc=PoolBroken(message))
            if w.actor is not None:
                self._kill_actor(w)
            if w.pidfd >= 0:
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(w.pidfd, signal.SIGKILL)
                os.close(w.pidfd)
                w.pidfd = -1
        self._workers.clear()
        self.shared.fail_pending(lambda: PoolBroken(message))


# ---------------------------------------------------------------------------------- runner


class RayPoolRunner(RunnerFront):
    """The manager thread of one Ray pool, and the doors other threads knock at (the same
    as :class:`corral.pool._runner.PoolRunner`'s, which the executor uses)."""

    def __init__(self, cfg: PoolConfig, options: Mapping[str, Any]) -> None:
        self.cfg = cfg
        self.options = dict(options)
        self.shared = PoolShared(cfg)
        self.thread: threading.Thread | None = None
        self.finished = threading.Event()
        self.manager: RayPoolManager | None = None
        self._reactor: Reactor[Any] | None = None
        self._attached = False

    def start(self, first: Any = None) -> None:
        """Connect to Ray (or start a local cluster) and start the manager thread (under
        ``shared.lock``, at the first submit; blocking while a local cluster starts).

        Raises:
            PoolBroken: Ray could not be reached or the thread could not start.
        """
        del first  # nothing to preload: Ray's workers import what they need
        from corral.ray._starter import attach, detach

        try:
            attach()
            self._attached = True
            self._reactor = reactor = Reactor(f"pool {self.cfg.name!r}", self._on_deadline)
            self.manager = RayPoolManager(self.shared, reactor, self.options, self.post)
            thread = threading.Thread(target=self.run, name=f"corral-raypool[{self.cfg.name}]",
                                      daemon=True)
            thread.start()
        except BaseException as exc:
            if self._reactor is not None:
                self._reactor.close()
            if self._attached:
                self._attached = False
                detach()
            broken = PoolBroken(f"pool {self.cfg.name!r} is broken: it could not start on Ray "
                                f"({type(exc).__name__}: {exc})")
            broken.__cause__ = exc
            self.shared.broken = broken
            self.finished.set()
            raise self.shared.broken_error() from exc
        self.thread = thread
        _live_runners.add(self)
        _register_atexit()

    def _on_deadline(self, key: Any, now: float) -> None:
        if self.manager is not None:
            self.manager.on_deadline(key, now)

    def run(self) -> None:
        manager, reactor = self.manager, self._reactor
        assert manager is not None and reactor is not None
        try:
            manager.fill(reactor.clock())
            while not manager.done:
                manager.after_round(reactor.run_once())
        except BaseException:
            log.critical("pool %r: the manager thread failed; killing every worker",
                         self.cfg.name, exc_info=True)
            manager.emergency()
        finally:
            self.finish()

    def finish(self) -> None:
        reactor = self._reactor
        if reactor is not None:
            reactor.close()
            reactor.drain_inbox()
        self.shared.pids = self.shared.spare_pids = ()
        self.manager = None
        self._reactor = None
        if self._attached:
            from corral.ray._starter import detach

            self._attached = False
            detach()
        self.finished.set()
        _live_runners.discard(self)


_live_runners: weakref.WeakSet[RayPoolRunner] = weakref.WeakSet()
_atexit_lock = threading.Lock()
_atexit_done = False


def _register_atexit() -> None:
    # Registered after Ray's own exit handler (ray.init registers ray.shutdown), so it runs
    # before it: the pools finish their tasks while the cluster still exists.
    global _atexit_done
    with _atexit_lock:
        if not _atexit_done:
            _atexit_done = True
            atexit.register(_shutdown_all_at_exit)


def _shutdown_all_at_exit() -> None:
    # As the local pool's: submitted tasks run to completion first, unless the owner asked
    # for shutdown(wait=False, cancel_futures=True).
    for runner in list(_live_runners):
        if runner.shared.terminate_at_exit:
            runner.request_shutdown(True, terminate=True)
        else:
            runner.request_shutdown(cancel_futures=False)
    for runner in list(_live_runners):
        if runner.thread is not None:
            runner.thread.join()

