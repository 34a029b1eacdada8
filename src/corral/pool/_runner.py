"""A pool's threads: the manager thread (a :class:`~corral._reactor.Reactor` driving the
:class:`~corral.pool._manager.PoolManager`) and its spawner thread, from the first submit to the
last worker's exit; and what other threads may ask of them.

    ProcessPool (any thread) --pending + wake()--------------------> reactor --> PoolManager
                             --post(manager.shutdown / ...) -------->   ^
    Spawner thread (corral._spawner) --deliver(batch)--------------------+
"""

from __future__ import annotations

import atexit
import logging
import math
import multiprocessing
import os
import random
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from corral._bootstrap import run_worker, with_keeper_slot
from corral._fdlimit import ensure_fd_room
from corral._keeper import keeper
from corral._reactor import Reactor
from corral._spawner import Spawner, preload_for_forkserver
from corral.heartbeat import HeartbeatTable
from corral.pool import _worker
from corral.pool._manager import PoolManager, SpawnRequest, Started, discard_started
from corral.pool._records import DeadlineKey, Endpoint, PoolConfig, Task
from corral.pool._shared import PoolShared
from corral.pool.errors import PoolBroken
from corral.process import WorkerProcess, disown_fd, own_fd

__all__ = ["PoolRunner", "ProcessStarter", "SpawnFn", "finalize", "preload_modules"]

log = logging.getLogger("corral.procpool")

SpawnFn = Callable[[SpawnRequest], Started]

# The supervising process's fds per pool worker: FDS_PER_WORKER, its socket, its statm file.
POOL_FDS_PER_WORKER = 5


class ProcessStarter:
    """The real spawn function: a worker process and a socket pair to it (spawner thread)."""

    def __init__(self, ctx: Any, cfg: PoolConfig) -> None:
        self._ctx = ctx
        self._args = (cfg.initializer, cfg.initargs,
                      "concurrent.futures" if cfg.drop_in else None)

    def __call__(self, req: SpawnRequest) -> tuple[WorkerProcess, Endpoint]:
        ours, theirs = multiprocessing.Pipe(duplex=True)
        # Ours is the supervisor's own: a fork-started sibling must not hold it (it lives as
        # long as this pool, whose records keep the Connection alive in every fork child too,
        # so it is never closed twice there).
        own_fd(ours.fileno())
        try:
            rest = (_worker.main, (theirs, *self._args))
            proc = WorkerProcess.start(
                self._ctx, run_worker, (req.boot, *rest), req.boot.name, False,
                slot_args=lambda slot, path: (with_keeper_slot(req.boot, slot, path), *rest))
        except BaseException:
            disown_fd(ours.fileno())
            ours.close()
            raise
        finally:
            theirs.close()
        return proc, ours


def preload_modules(cfg: PoolConfig, first: Any = None) -> list[str]:
    """What a forkserver should import once for this pool: corral's worker side, the
    initializer's module and the module of the first task's function.

    A user's module is named only if this process imported it through the import system (so
    the forkserver, which gets the same ``sys.path``, finds it too); never ``__main__``, which
    CPython's forkserver does not preload.
    """
    # The executor too: a program's main module, which forkserver and spawn workers run again,
    # imports it.
    out = ["corral.pool._worker", "corral.futures" if cfg.drop_in else "corral.pool.executor"]
    for fn in (cfg.initializer, first):
        fn = getattr(fn, "func", fn)  # functools.partial
        name = getattr(fn, "__module__", None)
        module = sys.modules.get(name) if isinstance(name, str) else None
        if (module is not None and name not in ("__main__", "__mp_main__", *out)
                and getattr(module, "__spec__", None) is not None):
            out.append(str(name))
    return out


class RunnerFront:
    """What the executor calls on a pool's runner from any thread (the local pool's and the
    Ray pool's): wake the manager, hand it work through its reactor, ask it to stop.

    Needs ``shared`` (PoolShared), ``manager`` (None until started) and ``_reactor``.
    """

    shared: PoolShared
    manager: Any
    _reactor: Reactor[Any] | None

    def wake(self) -> None:
        """A task was appended to ``shared.pending``: make the manager look (merged)."""
        reactor = self._reactor
        if reactor is not None:
            reactor.wake()

    def post(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the manager thread; dropped once the manager has ended."""
        reactor = self._reactor
        if reactor is not None:
            try:
                reactor.call_soon_threadsafe(fn, *args)
            except RuntimeError:
                pass  # closed: every task has ended, every worker is gone

    def cancel_running(self, task: Task) -> None:
        """The owner cancelled a running task's future: kill its worker (any thread)."""
        manager = self.manager
        if manager is not None:
            self.post(manager.cancel_running, task)

    def request_shutdown(self, cancel_futures: bool, terminate: bool = False,
                         wait: bool = True) -> None:
        shared = self.shared
        with shared.lock:
            shared.shutdown_requested = True
            if cancel_futures and not wait:
                # The caller wants neither the queued tasks nor to wait for the running ones:
                # at interpreter exit, running tasks are stopped rather than waited for.
                shared.terminate_at_exit = True
            manager = self.manager  # None until started (opened, in tests)
        if manager is not None:
            if terminate:
                self.post(manager.terminate)
            else:
                self.post(manager.shutdown, cancel_futures)


class PoolRunner(RunnerFront):
    """The threads of one pool, and the doors other threads knock at.

    Args:
        cfg: the pool's settings.
        clock: the monotonic clock (a fake one in tests).
        spawn: ``spawn(SpawnRequest) -> (process, endpoint)``, run on the spawner thread;
            None: start real worker processes (:class:`ProcessStarter`).
        rng: the backoff's jitter.
    """

    def __init__(self, cfg: PoolConfig, *, clock: Callable[[], float] = time.monotonic,
                 spawn: SpawnFn | None = None, rng: random.Random | None = None) -> None:
        self.cfg = cfg
        self.shared = PoolShared(cfg)
        self.thread: threading.Thread | None = None  # the manager thread, once started
        self.finished = threading.Event()  # the manager thread has ended
        self.manager: PoolManager | None = None  # once opened
        self._clock = clock
        self._spawn = spawn
        self._rng = rng
        self._reactor: Reactor[DeadlineKey] | None = None
        self._table: HeartbeatTable | None = None
        self._spawner: Spawner[SpawnRequest, Started] | None = None

    def start(self, first: Callable[..., Any] | None = None) -> None:
        """Start the manager and spawner threads (under ``shared.lock``, at the first submit).

        All or nothing: if anything fails, whatever was set up is released and nothing is left
        running.

        Args:
            first: the first task's function (its module is preloaded under forkserver).

        Raises:
            PoolBroken: a thread could not be started (thread limits, interpreter shutdown);
                the pool is broken for good.
            OSError: the reactor or the heartbeat table could not be made; the pool stays
                unstarted (the next submit tries again).
        """
        self.open(first, start_spawner=False)
        assert self._spawner is not None
        thread = threading.Thread(target=self.run, name=f"corral-pool[{self.cfg.name}]",
                                  daemon=True)
        try:
            self._spawner.start()
            thread.start()
        except BaseException as exc:
            if self._spawner.thread.ident is not None:
                self._spawner.close(timeout=10)
            self._release()
            broken = PoolBroken(f"pool {self.cfg.name!r} is broken: it could not start its "
                                f"threads ({type(exc).__name__}: {exc})")
            broken.__cause__ = exc
            self.shared.broken = broken
            self.finished.set()
            raise self.shared.broken_error() from exc
        self.thread = thread
        _live_runners.add(self)

    # ------------------------------------------------------------------- the manager thread

    def open(self, first: Callable[..., Any] | None = None, start_spawner: bool = True) -> None:
        """Make the reactor, the heartbeat table, the spawner and the manager: everything but
        the manager thread (a test drives the rounds itself with :meth:`step`)."""
        cfg = self.cfg
        spawn = self._spawn
        method = cfg.start_method
        if spawn is None:
            keeper.start()  # workers' process groups die with this process, however it ends
            # Room for every worker's fds (its socket, pidfd and multiprocessing's pipe here,
            # a forkserver's connection while it starts): the soft limit is raised if need be.
            ensure_fd_room(cfg.max_workers + cfg.spare_workers, per_worker=POOL_FDS_PER_WORKER)
            ctx = (cfg.context if cfg.context is not None
                   else multiprocessing.get_context(cfg.start_method))
            method = ctx.get_start_method()
            if method == "forkserver":
                # Takes effect if this pool is the first to start the forkserver.
                preload_for_forkserver(ctx, preload_modules(cfg, first))
            spawn = ProcessStarter(ctx, cfg)
        try:
            self._reactor = reactor = Reactor(f"pool {cfg.name!r}", self._on_deadline,
                                              self._clock)
            self._table = table = HeartbeatTable(2 * (cfg.max_workers + cfg.spare_workers) + 2)
        except BaseException:
            self._release()
            raise
        self._spawner = Spawner(f"corral-pool-spawner[{cfg.name}]", spawn, self._deliver,
                                self._skip, discard_started)
        self.manager = PoolManager(self.shared, reactor, table, self._spawner.request,
                                   method=method, clock=self._clock, rng=self._rng)
        if start_spawner:
            self._spawner.start()

    def _on_deadline(self, key: DeadlineKey, now: float) -> None:
        assert self.manager is not None
        self.manager.on_deadline(key, now)

    def _skip(self) -> bool:  # the spawner thread: the pool is stopping
        manager = self.manager
        return manager is None or manager.stop_spawning

    def _deliver(self, batch: list[tuple[SpawnRequest, Started | BaseException]]) -> None:
        # On the spawner thread; raises once the reactor is closed (the spawner then kills
        # what it started).
        assert self._reactor is not None and self.manager is not None
        self._reactor.call_soon_threadsafe(self.manager.on_spawned, batch)

    def run(self) -> None:
        """The manager thread: rounds until every worker is gone after shutdown."""
        manager, reactor = self.manager, self._reactor
        assert manager is not None and reactor is not None
        run_once, after_round = reactor.run_once, manager.after_round
        try:
            manager.fill(self._clock())
            while not manager.done:
                after_round(run_once())  # what step() does
        except BaseException:
            log.critical("pool %r: the manager thread failed; killing every worker",
                         self.cfg.name, exc_info=True)
            manager.emergency()
        finally:
            self.finish()

    def step(self, extra: float = math.inf) -> float:
        """One round: wait (until ``extra`` on the clock at most), handle what came, then
        hand out tasks, start workers and close as needed. Returns the round's time."""
        assert self._reactor is not None and self.manager is not None
        now = self._reactor.run_once(extra)
        self.manager.after_round(now)
        return now

    def finish(self) -> None:
        """Stop the spawner, kill a start that came up too late, release everything."""
        if self._spawner is not None:
            # A start given up on keeps its thread (stuck in a stopped forkserver): not joined.
            abandoned = self.manager is not None and self.manager.abandoned
            self._spawner.close(timeout=0.0 if abandoned else 10)
        reactor = self._reactor
        if reactor is not None and self.manager is not None:
            reactor.close()
            for fn, args in reactor.drain_inbox():
                if fn == self.manager.on_spawned:  # a start that came up after an emergency
                    for _, result in args[0]:
                        if not isinstance(result, BaseException):
                            discard_started(result)
        self._release()
        self.shared.pids = self.shared.spare_pids = ()
        # No reference cycle may outlive the pool (runner -> manager -> spawner -> runner):
        # the user's initargs (multiprocessing queues, say) must go when the pool object does.
        self.manager = None
        self._spawner = None
        self._reactor = None
        self.finished.set()
        _live_runners.discard(self)

    def _release(self) -> None:
        """Close the reactor and the heartbeat table (whichever exist)."""
        if self._reactor is not None:
            self._reactor.close()
        if self._table is not None:
            self._table.close()
            self._table = None


# ------------------------------------------------------------------ every pool of the process

_live_runners: weakref.WeakSet[PoolRunner] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The child of os.fork() in a program with a pool has no manager thread: its copies of the
    # parent's pools refuse to work (RuntimeError) and exit must not wait for them.
    _live_runners.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _shutdown_all_at_exit() -> None:
    # A program that forgets shutdown() must not leave workers behind. Like
    # concurrent.futures, submitted tasks still run to completion first.
    for runner in list(_live_runners):
        if runner.shared.terminate_at_exit:
            runner.request_shutdown(True, terminate=True)
        else:
            runner.request_shutdown(cancel_futures=False)
    for runner in list(_live_runners):
        if runner.thread is not None:
            runner.thread.join()


def finalize(runner: PoolRunner, owner: int) -> None:
    """A ProcessPool was dropped without shutdown(): finish its tasks, then stop its workers."""
    if os.getpid() == owner:  # a forked child's copy has nothing to shut down
        runner.request_shutdown(False)
