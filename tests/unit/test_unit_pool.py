"""ProcessPool without processes: argument checks, errors, the future's cancel semantics, the
public names of corral.pool."""

from __future__ import annotations

import concurrent.futures as cf
import pickle
import signal
import threading
from typing import Any

import pytest

from corral import Backoff, CorralError, ExitStatus, GaveUp, NotPicklable, RestartBudget
from corral.events import ExitRecord
from corral.pool import (
    MemoryLimitExceeded,
    PoolBroken,
    ProcessPool,
    RemoteTraceback,
    TaskTimeout,
    WorkerLost,
)
from corral.pool._future import PoolFuture
from corral.pool._records import Task
from corral.states import StopReason


def square(x: int) -> int:
    return x * x


# ------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize(("kwargs", "error", "names"), [
    ({"max_workers": 0}, ValueError, "max_workers"),
    ({"max_workers": 2.5}, TypeError, "max_workers"),
    ({"max_workers": True}, TypeError, "max_workers"),
    ({"spare_workers": -1}, ValueError, "spare_workers"),
    ({"spare_workers": 1.0}, TypeError, "spare_workers"),
    ({"spare_workers": True}, TypeError, "spare_workers"),
    ({"start_method": "thread"}, ValueError, "start_method"),
    ({"initializer": 3}, TypeError, "initializer"),
    ({"initargs": [1]}, TypeError, "initargs"),
    ({"task_timeout": 0}, ValueError, "task_timeout"),
    ({"task_timeout": "1"}, TypeError, "task_timeout"),
    ({"retries": -1}, ValueError, "retries"),
    ({"max_tasks_per_worker": 0}, ValueError, "max_tasks_per_worker"),
    ({"max_memory_per_worker": 0}, ValueError, "max_memory_per_worker"),
    ({"max_memory_per_worker": 1.5e9}, TypeError, "max_memory_per_worker"),
    ({"memory_check_interval": 0}, ValueError, "memory_check_interval"),
    ({"startup_timeout": 0}, ValueError, "startup_timeout"),
    ({"startup_timeout": "1"}, TypeError, "startup_timeout"),
    ({"backoff": 1.0}, TypeError, "backoff"),
    ({"budget": 20}, TypeError, "budget"),
    ({"stop_timeout": -1}, ValueError, "stop_timeout"),
    ({"name": ""}, TypeError, "name"),
])
def test_invalid_options_name_the_parameter(kwargs: dict[str, Any], error: type[Exception],
                                            names: str) -> None:
    with pytest.raises(error, match=names):
        ProcessPool(**kwargs)


def test_unpicklable_initializer_is_refused_unless_fork() -> None:
    with pytest.raises(NotPicklable, match="initializer"):
        ProcessPool(1, start_method="spawn", initializer=lambda: None)
    with pytest.raises(NotPicklable, match="initargs"):
        ProcessPool(1, initializer=square, initargs=(threading.Lock(),))
    ProcessPool(1, start_method="fork", initializer=lambda: None)  # inherited, not pickled


def test_submit_refuses_what_cannot_be_pickled_without_starting_anything() -> None:
    pool = ProcessPool(1, start_method="fork")
    with pytest.raises(NotPicklable, match=r"fn .*<lambda>.*module-level function"):
        pool.submit(lambda: 1)
    with pytest.raises(NotPicklable, match="args cannot be pickled"):
        pool.submit(square, threading.Lock())
    with pytest.raises(NotPicklable, match="kwargs cannot be pickled"):
        pool.submit(square, x=threading.Lock())
    with pytest.raises(TypeError, match="fn must be a callable"):
        pool.submit(3)  # type: ignore[arg-type]
    assert pool._runner.thread is None  # no process, no thread
    assert pool.worker_pids() == ()
    pool.shutdown()


@pytest.mark.parametrize(("kwargs", "error", "name"), [
    ({"timeout": 0}, ValueError, "timeout"),
    ({"timeout": "soon"}, TypeError, "timeout"),
    ({"retries": -1}, ValueError, "retries"),
    ({"retries": 1.0}, TypeError, "retries"),
    ({"kwargs": [("x", 1)]}, TypeError, "kwargs"),
])
def test_submit_task_checks_its_options(kwargs: dict[str, Any], error: type[Exception],
                                        name: str) -> None:
    pool = ProcessPool(1, start_method="fork")
    with pytest.raises(error, match=name):
        pool.submit_task(square, (1,), **kwargs)
    assert pool._runner.thread is None
    pool.shutdown()


def test_map_checks_chunksize() -> None:
    pool = ProcessPool(1, start_method="fork")
    with pytest.raises(ValueError, match="chunksize"):
        pool.map(square, [1], chunksize=0)
    with pytest.raises(TypeError, match="chunksize"):
        pool.map(square, [1], chunksize=1.5)  # type: ignore[arg-type]
    pool.shutdown()


def test_submit_after_shutdown_is_refused() -> None:
    pool = ProcessPool(1, start_method="fork")
    pool.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(square, 1)
    assert "shut down" in repr(pool)


# ------------------------------------------------------------------------------------ errors


def test_errors_form_a_small_hierarchy() -> None:
    assert issubclass(WorkerLost, CorralError)
    assert issubclass(MemoryLimitExceeded, WorkerLost)
    assert issubclass(TaskTimeout, CorralError) and issubclass(TaskTimeout, TimeoutError)
    assert issubclass(PoolBroken, GaveUp) and issubclass(PoolBroken, cf.BrokenExecutor)


def test_errors_survive_pickling() -> None:
    status = ExitStatus(signal=signal.SIGKILL)
    record = ExitRecord(0, "pool-0", 123, status, StopReason.KILLED, 0.0, 1.0)
    errors: list[Exception] = [
        WorkerLost("lost", 123, status, 2),
        MemoryLimitExceeded("big", 124, status, 1, rss=10, limit=5),
        TaskTimeout("slow", 1.5, 125, "Thread 0x1 ..."),
        PoolBroken("broken", [record]),
    ]
    for err in errors:
        copy = pickle.loads(pickle.dumps(err))
        assert type(copy) is type(err) and str(copy) == str(err)
        assert vars(copy) == vars(err)
    lost = errors[0]
    assert isinstance(lost, WorkerLost) and lost.exitcode == -signal.SIGKILL
    assert WorkerLost("x").exitcode is None


def test_remote_traceback_prints_as_the_worker_traceback() -> None:
    tb = RemoteTraceback('\n"""\nTraceback ...\nValueError: x\n"""')
    assert str(tb).startswith('\n"""\nTraceback')


# ----------------------------------------------------------------------------- the future


class _Manager:
    """Stands for the pool's manager: records the running tasks it is asked to cancel."""

    def __init__(self) -> None:
        self.posted: list[Task] = []

    def cancel_running(self, task: Task) -> None:
        self.posted.append(task)


def _future() -> tuple[PoolFuture[Any], _Manager]:
    core = _Manager()
    fut: PoolFuture[Any] = PoolFuture(core.cancel_running)
    fut._task = Task(1, fut, b"", square, None, 0)
    return fut, core


def test_cancel_pending_notifies_waiters_at_once() -> None:
    fut, core = _future()
    seen: list[cf.Future[Any]] = []
    fut.add_done_callback(seen.append)
    result: dict[str, Any] = {}

    def waiter() -> None:
        result["done"] = cf.wait([fut], timeout=10).done

    thread = threading.Thread(target=waiter)
    thread.start()
    assert fut.cancel() is True
    thread.join(10)
    assert result["done"] == {fut}
    assert fut.cancelled() and seen == [fut]
    assert core.posted == []  # nothing was running: nothing to kill
    assert fut._start_running() is False  # the manager skips it


def test_cancel_running_asks_the_manager_to_kill_the_worker() -> None:
    fut, core = _future()
    assert fut._start_running() is True
    assert fut._start_running() is True  # given to another worker after a retry
    assert fut.running()
    with pytest.raises(TimeoutError):
        list(cf.as_completed([fut], timeout=0))
    assert fut.cancel() is True
    assert fut.cancelled() and fut.done()
    assert core.posted == [fut._task]
    assert fut.cancel() is True  # idempotent, posts nothing more
    assert len(core.posted) == 1
    assert list(cf.as_completed([fut], timeout=1)) == [fut]
    with pytest.raises(cf.InvalidStateError):
        fut.set_result(1)  # a late result loses to the cancellation


def test_cancel_if_pending_leaves_running_tasks_alone() -> None:
    fut, core = _future()
    fut._start_running()
    assert fut._cancel(allow_running=False) is False
    assert fut.running() and core.posted == []
    fut.set_result(5)
    assert fut.cancel() is False and fut.result() == 5


def test_pool_default_backoff_and_budget() -> None:
    pool = ProcessPool(1)
    assert pool._cfg.budget == RestartBudget()
    assert isinstance(pool._cfg.backoff, Backoff) and pool._cfg.backoff.cap <= 1.0
    assert pool._cfg.start_method == "forkserver"
    assert "not started" in repr(pool)
    pool.shutdown()


def test_corral_pool_keeps_its_public_names() -> None:
    import corral
    import corral.pool as pool_pkg

    for name in pool_pkg.__all__:
        assert getattr(pool_pkg, name) is getattr(corral, name, getattr(pool_pkg, name))
    assert corral.ProcessPool is ProcessPool and corral.WorkerLost is WorkerLost
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        pool_pkg.Nope  # noqa: B018


def test_forkserver_preload_names_corral_and_the_users_modules() -> None:
    import functools
    import json

    from corral.pool._runner import preload_modules

    pool = ProcessPool(1, initializer=json.dumps, initargs=(1,))
    assert preload_modules(pool._cfg, functools.partial(square, 2)) == [
        "corral.pool._worker", "corral.pool.executor", "json", __name__]
    main_fn = type("F", (), {"__module__": "__main__"})()
    unknown = type("G", (), {"__module__": "not_imported_anywhere"})()
    assert preload_modules(ProcessPool(1)._cfg, main_fn) == [
        "corral.pool._worker", "corral.pool.executor"]
    assert preload_modules(ProcessPool(1)._cfg, unknown)[-1] == "corral.pool.executor"
    from corral import ProcessPoolExecutor

    assert preload_modules(ProcessPoolExecutor(1)._cfg)[1] == "corral.futures"
