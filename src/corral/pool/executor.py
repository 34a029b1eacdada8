"""ProcessPool: a process pool whose workers may die, hang or bloat without breaking it.

This module is the public executor: argument checks, pickling at submit, ``map``, shutdown. The
workers are managed on the pool's own threads (:mod:`corral.pool._runner`,
:mod:`corral.pool._manager`); the worker side is :mod:`corral.pool._worker`.
"""

from __future__ import annotations

import itertools
import os
import pickle
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Executor, Future
from functools import partial
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from corral import _validate as v
from corral._taskstats import PoolTaskStats
from corral.errors import NotPicklable
from corral.policy import Backoff, RestartBudget
from corral.pool import _worker
from corral.pool._future import PoolFuture, cancel_pending, results
from corral.pool._records import PoolConfig, Task, describe
from corral.pool._runner import PoolRunner, finalize
from corral.process import usable_cpus
from corral.spec import START_METHODS

if TYPE_CHECKING:
    from corral.ray._pool import RayPoolRunner

__all__ = ["ProcessPool"]

_T = TypeVar("_T")
_P = ParamSpec("_P")

_PROTOCOL = pickle.HIGHEST_PROTOCOL
_DEFAULT: Any = object()  # "use the pool's default" in submit_task()


# -------------------------------------------------------------------------------- the pool


class ProcessPool(Executor):
    """A ``concurrent.futures.Executor`` whose workers may crash, hang or bloat without harm.

    A worker that dies fails only the task it was running (:class:`WorkerLost`, with the pid and
    the exit code or signal and its likely cause) and is replaced; a task past its timeout gets
    its worker killed after a stack dump (:class:`TaskTimeout`); ``future.cancel()`` works on a
    running task too (its worker is killed). Workers are recycled after ``max_tasks_per_worker``
    tasks or above ``max_memory_per_worker`` bytes of RSS.

    ::

        with corral.ProcessPool(4, task_timeout=60, retries=1) as pool:
            for result in pool.map(work, items, chunksize=16):
                ...

    Args:
        max_workers: number of worker processes (default: the CPUs this process may use).
        spare_workers: extra workers kept started and ready, but idle, beyond ``max_workers``
            (they do not count against it, and are listed by :meth:`spare_pids`, not
            :meth:`worker_pids`). When a worker dies or leaves (crash, timeout, cancellation,
            recycling) a spare takes its place at once, so the next task does not wait for a
            process to start; a new spare is then started in the background. A spare never
            runs a task until it takes a place; one that dies counts against ``budget`` like
            any worker. 0: none (each replacement is started when it is needed).
        start_method: "forkserver" (default), "spawn" or "fork".
        initializer: ``initializer(*initargs)`` runs in each worker before its first task. A
            worker whose initializer raises counts as a crash (backoff, restart budget); two
            new workers in a row whose initializer raises the same way break the pool at once
            (:class:`PoolBroken`, whose ``__cause__`` is the initializer's exception).
        initargs: arguments for the initializer. They reach each worker as
            ``multiprocessing.Process`` arguments do, so ``multiprocessing`` queues, locks and
            events work under every start method.
        task_timeout: default per-task timeout, seconds from when the task starts running
            (None or ``math.inf``: none). :meth:`submit_task` overrides it per task.
        retries: default number of times a task whose worker died (:class:`WorkerLost`) is run
            again on another worker. Only for idempotent tasks; timeouts are not retried.
        max_tasks_per_worker: replace a worker after this many tasks (None: never).
        max_memory_per_worker: RSS limit of a worker, bytes (None: none). Checked after each
            task (over it: the worker is replaced, gracefully) and every
            ``memory_check_interval`` seconds while a task runs (over it: the worker is
            killed and the task fails with :class:`MemoryLimitExceeded`, or is retried).
        memory_check_interval: seconds between RSS checks of a busy worker.
        startup_timeout: seconds a new worker gets to import and run its initializer (None: no
            limit). Past it, its stack is dumped and it is killed: a failed start.
        backoff: delays between worker starts after workers died before they were ready
            (import or initializer failures). A worker that was ready is replaced at once.
        budget: at most ``max_restarts`` unplanned worker deaths within ``window`` seconds;
            one more and the pool breaks (:class:`PoolBroken`). Kills the pool decides itself
            (timeouts, cancellation, memory, recycling) do not count.
        stop_timeout: seconds a worker asked to quit (recycling, shutdown) gets before SIGKILL.
        name: the pool's name, in logs and process titles.
        backend: "local" (worker processes on this machine) or "ray" (each worker a Ray
            actor managed by corral, on the cluster this process is a driver of, else the one
            ``RAY_ADDRESS`` names, else a local one started at the first submit; needs
            ``corral[ray]``). With "ray", tasks, the initializer and its arguments travel by
            Ray's cloudpickle (functions of ``__main__`` too); ``start_method`` must stay
            the default and ``max_memory_per_worker`` is refused (use
            ``ray_options={"memory": ...}``); an idle worker that leaves is killed at once,
            so ``stop_timeout`` only bounds the wait for Ray to report it gone.
        ray_options: Ray actor options for each worker (``num_cpus``, ``num_gpus``,
            ``memory``, ``resources``, ``scheduling_strategy`` such as "SPREAD",
            ``runtime_env``, ...); only with ``backend="ray"``.

    Raises:
        TypeError, ValueError: a bad argument (the message names it).
        NotPicklable: under forkserver or spawn, ``initializer`` or ``initargs`` cannot be
            pickled.

    Every task is pickled when it is submitted, so a function or argument that cannot be
    pickled is refused by ``submit()`` with :class:`corral.NotPicklable` (a ``TypeError`` and a
    ``pickle.PicklingError``), whatever the start method. (:class:`corral.ProcessPoolExecutor`
    reports it through the future instead, as ``concurrent.futures`` does.) A task runs as
    ``fn(*args, **kwargs)`` in a worker. Every future ends exactly once: a result, an
    exception, or cancelled.

    What a future may raise besides the task's own exception (with its remote traceback as
    ``__cause__``): :class:`WorkerLost` (its worker died; a ``BrokenProcessPool``),
    :class:`TaskTimeout` (a ``TimeoutError``), :class:`MemoryLimitExceeded`,
    :class:`NotPicklable` (its result could not be pickled), :class:`UnpicklingFailed` (the
    task could not be unpickled in the worker, or its result in the parent; a
    ``BrokenProcessPool``), :class:`PoolBroken`; and a ``SystemExit`` that the task (or its
    result's pickling) raised in the worker.
    """

    def __init__(self, max_workers: int | None = None, *, spare_workers: int = 1,
                 start_method: str = "forkserver",
                 initializer: Callable[..., Any] | None = None, initargs: tuple[Any, ...] = (),
                 task_timeout: float | None = None, retries: int = 0,
                 max_tasks_per_worker: int | None = None,
                 max_memory_per_worker: int | None = None, memory_check_interval: float = 1.0,
                 startup_timeout: float | None = None,
                 backoff: Backoff | None = None, budget: RestartBudget | None = None,
                 stop_timeout: float = 5.0, name: str = "pool", backend: str = "local",
                 ray_options: Mapping[str, Any] | None = None) -> None:
        if max_workers is None:
            max_workers = usable_cpus()
        v.count("max_workers", max_workers, minimum=1)
        v.count("spare_workers", spare_workers)
        v.choice("start_method", start_method, START_METHODS)
        v.callable_("initializer", initializer, optional=True)
        if not isinstance(initargs, tuple):
            raise TypeError(f"initargs must be a tuple, got {initargs!r} "
                            f"({type(initargs).__name__})")
        task_timeout = _timeout("task_timeout", task_timeout)
        v.integer("retries", retries)
        if max_tasks_per_worker is not None:
            v.integer("max_tasks_per_worker", max_tasks_per_worker, minimum=1)
        if max_memory_per_worker is not None:
            v.integer("max_memory_per_worker", max_memory_per_worker, minimum=1)
        v.number("memory_check_interval", memory_check_interval, strict=True)
        startup_timeout = _timeout("startup_timeout", startup_timeout)
        if backoff is None:
            # A pool's crash loop is an initializer or import failure: retry fast, and let the
            # restart budget break the pool within seconds rather than minutes.
            backoff = Backoff(initial=0.05, cap=1.0)
        if not isinstance(backoff, Backoff):
            raise TypeError(f"backoff must be a corral.Backoff, got {backoff!r}")
        if budget is None:
            budget = RestartBudget()
        if not isinstance(budget, RestartBudget):
            raise TypeError(f"budget must be a corral.RestartBudget, got {budget!r}")
        v.number("stop_timeout", stop_timeout)
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty str, got {name!r}")
        v.choice("backend", backend, ("local", "ray"))
        ray_opts = None
        if backend == "ray":
            ray_opts = _ray_options(start_method, max_memory_per_worker, ray_options)
        elif ray_options is not None:
            raise ValueError(f"ray_options go with backend='ray', got backend={backend!r} and "
                             f"ray_options={ray_options!r}")
        self._setup(PoolConfig(
            name=name, max_workers=max_workers, spare_workers=spare_workers,
            start_method=start_method,
            initializer=initializer, initargs=initargs,
            task_timeout=task_timeout, retries=retries,
            max_tasks_per_worker=max_tasks_per_worker,
            max_memory_per_worker=max_memory_per_worker,
            memory_check_interval=float(memory_check_interval),
            startup_timeout=startup_timeout,
            backoff=backoff, budget=budget,
            stop_timeout=float(stop_timeout)), ray_opts)

    def _setup(self, cfg: PoolConfig, ray_options: dict[str, Any] | None = None) -> None:
        self._backend = "local" if ray_options is None else "ray"
        self._cfg = cfg
        self._runner: PoolRunner | RayPoolRunner
        if ray_options is not None:
            from ray import cloudpickle  # checked importable by _ray_options

            self._dumps: Callable[[Any], bytes] = partial(cloudpickle.dumps, protocol=_PROTOCOL)
            _check_sendable(self._dumps, cfg.initializer, cfg.initargs)
            from corral.ray._pool import RayPoolRunner as _RayRunner

            self._runner = _RayRunner(cfg, ray_options)  # Ray and its thread: at 1st submit
        else:
            if cfg.start_method != "fork":
                _check_spawnable(cfg.start_method, cfg.initializer, cfg.initargs)
            self._dumps = partial(pickle.dumps, protocol=_PROTOCOL)
            self._runner = PoolRunner(cfg)  # its threads, started at the first submit
        self._shared = self._runner.shared  # what submitters share with its manager thread
        self._cancel_running = self._runner.cancel_running  # for every future (one object)
        self._owner_pid = os.getpid()
        # Dropped without shutdown(): finish the submitted tasks, then stop the workers.
        if isinstance(self._runner, PoolRunner):
            weakref.finalize(self, finalize, self._runner, self._owner_pid)
        else:
            weakref.finalize(self, self._runner.request_shutdown, False)

    # ----------------------------------------------------------------------------- submitting

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args,
               **kwargs: _P.kwargs) -> Future[_T]:
        """Run ``fn(*args, **kwargs)`` in a worker, with the pool's timeout and retries.

        Every keyword goes to ``fn``; for per-task options use :meth:`submit_task`.

        Raises:
            TypeError: ``fn`` is not callable.
            NotPicklable: ``fn`` or an argument cannot be pickled.
            PoolBroken: the pool is broken.
            RuntimeError: after ``shutdown()``.
        """
        return self._submit(fn, args, kwargs, self._cfg.task_timeout, self._cfg.retries, fn)

    def submit_task(self, fn: Callable[..., _T], args: Iterable[Any] = (),
                    kwargs: dict[str, Any] | None = None, *, timeout: float | None = _DEFAULT,
                    retries: int = _DEFAULT) -> Future[_T]:
        """Run ``fn(*args, **kwargs)`` in a worker, with per-task options.

        Args:
            fn: a callable (module-level under forkserver and spawn).
            args: the positional arguments: a tuple, list or other iterable (not a str).
            kwargs: the keyword arguments (a dict with str keys), or None.
            timeout: seconds from when the task starts running; past it the worker is killed
                after a stack dump and the future raises :class:`TaskTimeout`. None or
                ``math.inf``: no limit. Default: the pool's ``task_timeout``.
            retries: how many times to run the task again on another worker if its worker
                dies (it must be idempotent). Default: the pool's ``retries``.

        Raises:
            TypeError, ValueError: a bad argument (the message names it).
            NotPicklable, PoolBroken, RuntimeError: as :meth:`submit`.
        """
        v.callable_("fn", fn)
        if (isinstance(args, str | bytes | bytearray | Mapping)
                or not isinstance(args, Iterable)):
            # A mapping would pass its keys as positional arguments: surely meant as kwargs.
            hint = ("keyword arguments go in kwargs=" if isinstance(args, Mapping)
                    else "for one argument write args=(value,)")
            raise TypeError(f"args must be a tuple (or another iterable of positional "
                            f"arguments, not a string or a mapping), got {args!r} "
                            f"({type(args).__name__}); {hint}")
        args = tuple(args)
        if kwargs is None:
            kwargs = {}
        elif not isinstance(kwargs, dict):
            raise TypeError(f"kwargs must be a dict or None, got {kwargs!r} "
                            f"({type(kwargs).__name__})")
        else:
            bad = [k for k in kwargs if not isinstance(k, str)]
            if bad:
                raise TypeError(f"kwargs keys must be str (argument names), got {bad[0]!r} "
                                f"({type(bad[0]).__name__})")
        timeout = (self._cfg.task_timeout if timeout is _DEFAULT
                   else _timeout("timeout", timeout))
        if retries is _DEFAULT:
            retries = self._cfg.retries
        else:
            v.integer("retries", retries)
        return self._submit(fn, args, kwargs, timeout, retries, fn)

    def _check_owner(self) -> None:
        if os.getpid() != self._owner_pid:
            raise RuntimeError(
                f"pool {self._cfg.name!r} belongs to process {self._owner_pid}; this is a "
                f"forked child (pid {os.getpid()}), which has no manager thread. Make a new "
                "pool here.")

    def _submit(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                timeout: float | None, retries: int, label: Any) -> Future[Any]:
        self._check_owner()
        v.callable_("fn", fn)
        shared, runner = self._shared, self._runner
        if shared.broken is not None:
            raise shared.broken_error()
        if shared.shutdown_requested:
            raise RuntimeError("cannot schedule new futures after shutdown")
        stats = shared.task_stats
        fut: PoolFuture[Any] = PoolFuture(self._cancel_running, stats)
        refused: BaseException | None = None
        try:
            payload = self._dumps((fn, args, kwargs))
        except Exception as exc:
            refused = self._refuse(fn, args, kwargs, exc)
        else:
            if (self._cfg.start_method != "fork" and self._backend == "local"
                    and getattr(fn, "__module__", None) == "__main__"
                    and getattr(sys.modules.get("__main__"), "__file__", None) is None):
                refused = NotPicklable(
                    f"fn {describe(fn)} is defined in an interactive __main__, which a "
                    f"start_method={self._cfg.start_method!r} worker cannot import. Move it "
                    "into a module, or use start_method='fork'.")
        if refused is not None:
            if not self._cfg.drop_in:
                raise refused
            # concurrent.futures reports it through the future.
            stats.submitted()
            fut.set_running_or_notify_cancel()
            fut.set_exception(refused)
            return fut
        task = Task(shared.next_id(), fut, payload, label, timeout, retries)
        fut._task = task
        with shared.lock:
            if shared.broken is not None:
                raise shared.broken_error()
            if shared.shutdown_requested:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if runner.thread is None:
                runner.start(first=label)  # the user's function (map: not run_chunk)
            stats.submitted()  # before the manager can see it (and start or end it)
            shared.pending.append(task)
        runner.wake()
        return fut

    def _refuse(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                exc: Exception) -> BaseException:
        what = "the task"
        for name, value in (("fn", fn), ("args", args), ("kwargs", kwargs)):
            try:
                self._dumps(value)
            except Exception:
                what = f"{name} {describe(value)}" if name == "fn" else name
                break
        advice = ("every task is sent to its worker by pickle. Use a module-level function (not "
                  "a lambda, closure or nested function) and picklable arguments.")
        if self._backend == "ray":
            advice = ("every task is sent to its Ray worker by Ray's cloudpickle: its function "
                      "and arguments must not hold locks, sockets, open files or the like.")
        if self._cfg.drop_in:
            # The very exception pickle raised, as concurrent.futures reports it, with advice.
            exc.add_note(f"corral: {what} cannot be pickled; {advice}")
            return exc
        err = NotPicklable(f"{what} cannot be pickled ({type(exc).__name__}: {exc}); {advice}")
        err.__cause__ = exc
        return err

    def map(self, fn: Callable[..., _T], *iterables: Iterable[Any],
            timeout: float | None = None, chunksize: int = 1) -> Iterator[_T]:
        """Like ``concurrent.futures.Executor.map``: results in order, ``chunksize`` items a task.

        ``timeout`` bounds the wait for all results (as in concurrent.futures; None or
        ``math.inf``: no limit); each task gets the pool's ``task_timeout``. Leaving the
        iterator early cancels the tasks that have not started; running ones finish. Each
        result is released as it is yielded.

        Raises:
            TypeError, ValueError: a bad argument (the message names it).
        """
        v.callable_("fn", fn)
        v.integer("chunksize", chunksize, minimum=1)
        if chunksize > sys.maxsize:
            raise ValueError(f"chunksize must be at most sys.maxsize ({sys.maxsize}), got "
                             f"{chunksize!r}")
        iterators = []
        for k, iterable in enumerate(iterables):
            try:
                iterators.append(iter(iterable))
            except TypeError:
                raise TypeError(f"map()'s iterable {k + 1} must be iterable, got "
                                f"{iterable!r} ({type(iterable).__name__})") from None
        timeout = _timeout("timeout", timeout, allow_zero=True)
        end = None if timeout is None else time.monotonic() + timeout
        futures: list[Future[Any]] = []
        try:
            if chunksize == 1:
                for args in zip(*iterators, strict=False):
                    futures.append(self.submit(fn, *args))
            else:
                items = zip(*iterators, strict=False)
                while chunk := tuple(itertools.islice(items, chunksize)):
                    futures.append(self._submit(_worker.run_chunk, (fn, chunk), {},
                                                self._cfg.task_timeout, self._cfg.retries, fn))
        except BaseException:
            cancel_pending(futures)
            raise
        return results(futures, end, chunksize > 1)

    # ------------------------------------------------------------------------------- lifecycle

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking tasks; the workers exit once the submitted tasks are done.

        Args:
            wait: block until every task has ended and every worker process is gone.
            cancel_futures: cancel the tasks that have not started (running ones finish).
                With ``wait=False`` too, tasks still running at interpreter exit are stopped
                (their workers killed) instead of waited for.
        """
        wait = _flag("wait", wait)
        cancel_futures = _flag("cancel_futures", cancel_futures)
        self._check_owner()
        self._runner.request_shutdown(cancel_futures, wait=wait)
        if wait:
            self._join()

    def terminate(self, wait: bool = True) -> None:
        """Stop now: cancel every task, running ones too (their workers are killed at once).

        Every future that has not finished ends cancelled. ``wait``: block until every worker
        process is gone (about a millisecond per worker).
        """
        wait = _flag("wait", wait)
        self._check_owner()
        self._runner.request_shutdown(True, terminate=True)
        if wait:
            self._join()

    def _join(self) -> None:
        thread = self._runner.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def worker_pids(self) -> tuple[int, ...]:
        """The pids of the worker processes that exist right now (starting, idle, busy or
        leaving), spares not included: at most ``max_workers``, but for workers on their way
        out (recycled, killed) whose places are already taken.

        Raises:
            RuntimeError: called in a forked child of the pool's process.
        """
        self._check_owner()
        return self._shared.pids

    def spare_pids(self) -> tuple[int, ...]:
        """The pids of the spare workers right now (see ``spare_workers``).

        A spare that takes a worker's place moves to :meth:`worker_pids`.
        """
        self._check_owner()
        return self._shared.spare_pids

    def stats(self) -> dict[str, int]:
        """Counters: workers started (spares too) and lost, tasks done, lost, retried, timed
        out, spares promoted, ...

        Raises:
            RuntimeError: called in a forked child of the pool's process.
        """
        self._check_owner()
        return dict(self._shared.counters)

    @property
    def task_stats(self) -> PoolTaskStats:
        """The pool's task counters for metrics (submitted, outcomes by kind, queued, running,
        durations), labelled with its ``name``: ``Endpoint.add(pool)`` or
        ``CorralCollector([pool])`` export them (see :mod:`corral.metrics`)."""
        return self._shared.task_stats

    @property
    def broken(self) -> bool:
        return self._shared.broken is not None

    def __repr__(self) -> str:
        shared = self._shared
        state = ("broken" if shared.broken else "shut down" if shared.shutdown_requested
                 else "running" if self._runner.thread is not None else "not started")
        where = ("backend='ray'" if self._backend == "ray"
                 else f"start_method={self._cfg.start_method!r}")
        return (f"<corral.{type(self).__name__} {self._cfg.name!r} "
                f"max_workers={self._cfg.max_workers} {where} {state}>")


def _flag(name: str, value: Any) -> bool:
    """A bool (0 and 1 pass too, as concurrent.futures code sometimes writes them)."""
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")


def _timeout(name: str, value: Any, *, allow_zero: bool = False) -> float | None:
    """A timeout in seconds: > 0 (>= 0 with ``allow_zero``); None or ``math.inf``: none."""
    if value is None:
        return None
    if (isinstance(value, int | float) and not isinstance(value, bool)
            and value >= threading.TIMEOUT_MAX):
        return None  # inf, or more than a wait can take: no limit
    return v.number(name, value, strict=not allow_zero)


def _ray_options(start_method: str, max_memory: int | None,
                 options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The checks of ``backend="ray"``: what does not apply, Ray installed, the options."""
    if start_method != "forkserver":
        raise ValueError(f"start_method does not apply to backend='ray' (Ray starts the "
                         f"workers' processes): leave it out, got {start_method!r}")
    if max_memory is not None:
        raise ValueError(f"max_memory_per_worker is not supported with backend='ray', got "
                         f"{max_memory!r}: reserve memory with ray_options={{'memory': "
                         f"...}} (Ray's memory monitor kills a worker over it: WorkerLost)")
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise ImportError("backend='ray' needs Ray: pip install 'corral[ray]'")
    from corral.ray._pool import pool_options

    return pool_options(options)


def _check_sendable(dumps: Callable[[Any], bytes], initializer: Any,
                    initargs: tuple[Any, ...]) -> None:
    """Refuse at once an initializer a Ray worker could never receive."""
    for what, value in (("initializer", initializer), ("initargs", initargs)):
        try:
            dumps(value)
        except Exception as exc:
            raise NotPicklable(
                f"{what} {describe(value) if callable(value) else repr(value)[:80]} cannot be "
                f"pickled (by Ray's cloudpickle), which backend='ray' requires "
                f"({type(exc).__name__}: {exc})") from exc


class _DryRunPopen:
    """Stands for the process being started while initargs are test-pickled (_check_spawnable).

    multiprocessing lets its queues, locks and events be pickled only while a process is being
    started (they reach the child as Process arguments); this makes the test pickling look like
    that, without duplicating any fd.
    """

    @staticmethod
    def duplicate_for_child(fd: int) -> int:
        return fd

    @staticmethod
    def DupFd(fd: int) -> int:  # multiprocessing's name
        return fd


def _check_spawnable(start_method: str, initializer: Any, initargs: tuple[Any, ...]) -> None:
    """Refuse at once what a forkserver/spawn worker could never receive."""
    from multiprocessing import context

    for what, value in (("initializer", initializer), ("initargs", initargs)):
        context.set_spawning_popen(_DryRunPopen())  # type: ignore[arg-type]
        try:
            pickle.dumps(value, _PROTOCOL)
        except Exception as exc:
            raise NotPicklable(
                f"{what} {describe(value) if callable(value) else repr(value)[:80]} "
                f"cannot be pickled, which start_method={start_method!r} requires "
                f"({type(exc).__name__}: {exc}). Use a module-level function with "
                "picklable arguments, or start_method='fork'.") from exc
        finally:
            context.set_spawning_popen(None)
