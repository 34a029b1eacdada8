"""corral.ProcessPoolExecutor: a drop-in ``concurrent.futures.ProcessPoolExecutor``.

Change one import::

    # from concurrent.futures import ProcessPoolExecutor
    from corral import ProcessPoolExecutor

The constructor takes exactly the standard library's arguments, validates them with its messages
and reports errors with its exception types. Underneath is :class:`corral.ProcessPool`, so the
differences are the ones that make it better:

- A worker that dies fails only the task it was running, with :class:`corral.WorkerLost` (a
  ``BrokenProcessPool``, so ``except BrokenProcessPool`` still catches it); the pool replaces
  the worker and carries on, where the standard library breaks the whole pool for good. The
  pool breaks (:class:`corral.PoolBroken`, also a ``BrokenProcessPool``) only past its restart
  budget, or when the initializer fails the same way in two new workers in a row.
- Tasks can have timeouts and retries (:meth:`~corral.ProcessPool.submit_task`), and
  ``future.cancel()`` also stops a running task (its worker is killed and replaced).
- One extra process, a warm spare, is started with the workers (at the first submit) and waits
  idle, so that a dead or recycled worker is replaced without waiting for a process start. It
  never runs a task until it takes a worker's place, so at most ``max_workers`` tasks run at
  once.
- Every worker is started at the first submit (the standard library starts them on demand
  under forkserver and spawn).
- ``shutdown(wait=False, cancel_futures=True)`` means it: tasks still running at interpreter
  exit are stopped rather than waited for (the standard library waits for them).
"""

from __future__ import annotations

import itertools
import multiprocessing
import multiprocessing.context
from collections.abc import Callable, Iterable
from typing import Any

from corral import _validate as v
from corral.policy import Backoff, RestartBudget
from corral.pool._records import PoolConfig
from corral.pool.executor import ProcessPool
from corral.process import usable_cpus
from corral.spec import START_METHODS

__all__ = ["ProcessPoolExecutor"]

_names = itertools.count(1)


class ProcessPoolExecutor(ProcessPool):
    """``concurrent.futures.ProcessPoolExecutor``, on corral's pool (see the module docstring).

    Args:
        max_workers: number of worker processes (default: the CPUs this process may use).
        mp_context: a multiprocessing context (its start method: fork, forkserver or spawn).
            Default: multiprocessing's default context, or spawn if ``max_tasks_per_child``
            is given, as in the standard library.
        initializer: ``initializer(*initargs)`` runs in each worker before its first task.
        initargs: its arguments; multiprocessing queues, locks and events work here, under
            every start method.
        max_tasks_per_child: replace a worker after this many tasks (not with fork, as in the
            standard library).

    Raises:
        TypeError, ValueError: as the standard library's constructor (same messages, followed
            by what was given).
        NotPicklable: under forkserver or spawn, ``initializer`` or ``initargs`` cannot be
            pickled (the standard library would fail at the first submit).
    """

    def __init__(self, max_workers: int | None = None,
                 mp_context: multiprocessing.context.BaseContext | None = None,
                 initializer: Callable[..., Any] | None = None,
                 initargs: Iterable[Any] = (), *,
                 max_tasks_per_child: int | None = None) -> None:
        if max_workers is None:
            max_workers = usable_cpus()
        elif isinstance(max_workers, bool) or not isinstance(max_workers, int):
            raise TypeError(f"max_workers must be an int, got {max_workers!r} "
                            f"({type(max_workers).__name__})")
        elif max_workers <= 0:
            raise ValueError(f"max_workers must be greater than 0, got {max_workers!r}")
        else:
            v.count("max_workers", max_workers, minimum=1)
        if mp_context is None:
            mp_context = multiprocessing.get_context(
                "spawn" if max_tasks_per_child is not None else None)
        elif not (callable(getattr(mp_context, "get_start_method", None))
                  and callable(getattr(mp_context, "Process", None))):
            raise TypeError(f"mp_context must be a multiprocessing context (from "
                            f"multiprocessing.get_context()), got {mp_context!r} "
                            f"({type(mp_context).__name__})")
        start_method = mp_context.get_start_method(allow_none=False)
        if start_method not in START_METHODS:
            raise ValueError(f"mp_context's start method must be one of "
                             f"{', '.join(map(repr, START_METHODS))}, got {start_method!r}")
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be a callable, got {initializer!r} "
                            f"({type(initializer).__name__})")
        if isinstance(initargs, str | bytes) or not isinstance(initargs, Iterable):
            raise TypeError(f"initargs must be a tuple of arguments for the initializer, got "
                            f"{initargs!r} ({type(initargs).__name__})")
        if max_tasks_per_child is not None:
            if isinstance(max_tasks_per_child, bool) or not isinstance(max_tasks_per_child, int):
                raise TypeError(f"max_tasks_per_child must be an integer, got "
                                f"{max_tasks_per_child!r} ({type(max_tasks_per_child).__name__})")
            if max_tasks_per_child <= 0:
                raise ValueError(f"max_tasks_per_child must be >= 1, got {max_tasks_per_child!r}")
            if start_method == "fork":
                raise ValueError("max_tasks_per_child is incompatible with the 'fork' "
                                 "multiprocessing start method; supply a different mp_context.")
        context = mp_context
        if isinstance(context, multiprocessing.context.DefaultContext):
            context = multiprocessing.get_context(start_method)  # fixed now, as the stdlib does
        # What code written for the standard library sometimes reads.
        self._max_workers = max_workers
        self._mp_context = mp_context
        self._setup(PoolConfig(
            name=f"ProcessPoolExecutor-{next(_names)}", max_workers=max_workers,
            spare_workers=1, start_method=start_method,
            initializer=initializer, initargs=tuple(initargs),
            task_timeout=None, retries=0, max_tasks_per_worker=max_tasks_per_child,
            max_memory_per_worker=None, memory_check_interval=1.0, startup_timeout=None,
            backoff=Backoff(initial=0.05, cap=1.0), budget=RestartBudget(), stop_timeout=5.0,
            context=context, drop_in=True))

    @property
    def _broken(self) -> str | bool:
        """As in the standard library: False, or why the pool is broken."""
        broken = self._shared.broken
        return False if broken is None else str(broken)
