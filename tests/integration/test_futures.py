"""corral.ProcessPoolExecutor as a drop-in for concurrent.futures, and the pool's stdlib-shaped
behaviour: errors, pickling, initargs, map, a half-started pool, exit after shutdown(wait=False).

CPython's own test suite runs against it in tests/conformance (make conformance); these are
corral's own checks, including the ones that suite cannot make without private attributes.
"""

from __future__ import annotations

import concurrent.futures as cf
import gc
import inspect
import logging
import math
import multiprocessing
import os
import pickle
import subprocess
import sys
import threading
import weakref
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import pool_tasks as tasks
import pytest

from corral import (
    NotPicklable,
    PoolBroken,
    ProcessPool,
    ProcessPoolExecutor,
    UnpicklingFailed,
    WorkerLost,
)
from corral.pool import RemoteTraceback
from support import START_METHODS, pid_alive, wait_for

pytestmark = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning")


def _pids(pool: ProcessPool) -> set[int]:
    return set(pool.worker_pids()) | set(pool.spare_pids())


# ------------------------------------------------------------------------- the constructor


def test_the_signature_is_the_standard_librarys() -> None:
    ours = inspect.signature(ProcessPoolExecutor.__init__).parameters
    theirs = inspect.signature(cf.ProcessPoolExecutor.__init__).parameters
    assert [(p.name, p.kind, p.default) for p in ours.values()] == [
        (p.name, p.kind, p.default) for p in theirs.values()]


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"max_workers": 0}, ValueError, "max_workers must be greater than 0"),
    ({"max_workers": -1}, ValueError, "max_workers must be greater than 0"),
    ({"max_workers": "2"}, TypeError, "max_workers must be an int"),
    ({"initializer": 5}, TypeError, "initializer must be a callable"),
    ({"initargs": 5}, TypeError, "initargs must be a tuple"),
    ({"max_tasks_per_child": 1.5}, TypeError, "max_tasks_per_child must be an integer"),
    ({"max_tasks_per_child": 0}, ValueError, "max_tasks_per_child must be >= 1"),
    ({"max_tasks_per_child": 3, "mp_context": multiprocessing.get_context("fork")}, ValueError,
     "max_tasks_per_child is incompatible with the 'fork' multiprocessing start method"),
    ({"mp_context": "spawn"}, TypeError, "mp_context must be a multiprocessing context"),
])
def test_bad_arguments_get_the_standard_librarys_errors(kwargs: dict[str, Any],
                                                        error: type[Exception],
                                                        message: str) -> None:
    with pytest.raises(error, match=message):
        ProcessPoolExecutor(**kwargs)
    if not {"mp_context", "max_workers", "initargs"} & set(kwargs):  # stdlib checks those late
        with pytest.raises(error):
            cf.ProcessPoolExecutor(**kwargs)


def test_max_tasks_per_child_defaults_to_spawn() -> None:
    ex = ProcessPoolExecutor(1, max_tasks_per_child=3)
    assert ex._mp_context.get_start_method() == "spawn"
    assert ex._max_workers == 1 and ex._broken is False
    ex.shutdown()


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
@pytest.mark.timeout(60)
def test_an_unpicklable_initializer_is_refused_at_once(start_method: str) -> None:
    ctx = multiprocessing.get_context(start_method)
    with pytest.raises(NotPicklable, match="initializer"):
        ProcessPoolExecutor(1, mp_context=ctx, initializer=lambda: None)
    with pytest.raises(NotPicklable, match="initargs"):
        ProcessPool(1, start_method=start_method, initializer=tasks.init_set,
                    initargs=(threading.Lock(),))


# ------------------------------------------------------------------------------- initargs


@pytest.mark.parametrize("start_method", START_METHODS)
@pytest.mark.parametrize("cls", ["executor", "pool"])
@pytest.mark.timeout(60)
def test_initargs_take_multiprocessing_queues_locks_and_events(no_leaks: set[int],
                                                               start_method: str,
                                                               cls: str) -> None:
    ctx = multiprocessing.get_context(start_method)
    queue, lock, event = ctx.Queue(), ctx.Lock(), ctx.Event()
    pool: ProcessPool
    if cls == "executor":
        pool = ProcessPoolExecutor(1, mp_context=ctx, initializer=tasks.init_put,
                                   initargs=(queue, lock, event))
    else:
        pool = ProcessPool(1, start_method=start_method, initializer=tasks.init_put,
                           initargs=(queue, lock, event))
    with pool:
        pid = pool.submit(tasks.getpid).result(timeout=30)
        no_leaks.update(_pids(pool))
        assert event.wait(30)
        got = {queue.get(timeout=30) for _ in range(2)}  # the worker and the spare
        assert pid in got
    queue.close()
    queue.join_thread()


# ----------------------------------------------------------------------------------- errors


def test_the_error_classes_are_the_standard_librarys_too() -> None:
    assert issubclass(WorkerLost, BrokenProcessPool)
    assert issubclass(PoolBroken, BrokenProcessPool)
    assert issubclass(UnpicklingFailed, BrokenProcessPool)
    assert issubclass(UnpicklingFailed, pickle.UnpicklingError)
    assert issubclass(NotPicklable, pickle.PicklingError) and issubclass(NotPicklable, TypeError)
    assert issubclass(UnpicklingFailed, cf.BrokenExecutor)


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
@pytest.mark.timeout(60)
def test_the_executor_reports_pickling_errors_as_the_standard_library(
        no_leaks: set[int], start_method: str, caplog: pytest.LogCaptureFixture) -> None:
    ctx = multiprocessing.get_context(start_method)
    with ProcessPoolExecutor(2, mp_context=ctx) as ex:
        # An unpicklable task: refused through the future, with the pickling error itself.
        fut = ex.submit(tasks.identity, threading.Lock())
        with pytest.raises(TypeError, match="cannot pickle") as info:
            fut.result(timeout=30)
        assert any("corral:" in note for note in getattr(info.value, "__notes__", []))
        # A result that cannot be pickled: the pickling error, as raised in the worker.
        with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
            ex.submit(tasks.lambda_result).result(timeout=30)
        # SystemExit raised by the task, or while pickling its result: that SystemExit.
        with pytest.raises(SystemExit):
            ex.submit(tasks.exit_task).result(timeout=30)
        with pytest.raises(SystemExit):
            ex.submit(tasks.return_instance, tasks.ExitAtPickle).result(timeout=30)
        # A task or result that cannot be unpickled on the other side: BrokenProcessPool.
        with pytest.raises(BrokenProcessPool):
            ex.submit(tasks.identity, tasks.ExitAtUnpickle()).result(timeout=30)
        with pytest.raises(UnpicklingFailed) as unpickled:
            ex.submit(tasks.return_instance, tasks.ExitAtUnpickle).result(timeout=30)
        assert isinstance(unpickled.value.__cause__, SystemExit)
        with pytest.raises(UnpicklingFailed):
            ex.submit(tasks.return_instance, tasks.ErrorAtUnpickle).result(timeout=30)
        # None of it broke the pool, or cost a worker.
        assert ex.submit(tasks.square, 7).result(timeout=30) == 49
        assert ex.stats()["workers_lost"] == 0 and not ex.broken
        no_leaks.update(_pids(ex))
    assert not [r for r in caplog.records if "manager thread failed" in r.getMessage()]


@pytest.mark.timeout(60)
def test_the_pool_refuses_unpicklable_tasks_at_submit(no_leaks: set[int]) -> None:
    with ProcessPool(1, start_method="fork") as pool:
        with pytest.raises(pickle.PicklingError):
            pool.submit(tasks.identity, threading.Lock())
        with pytest.raises(NotPicklable, match="could not be pickled"):
            pool.submit(tasks.lambda_result).result(timeout=30)
        with pytest.raises(UnpicklingFailed, match="could not be unpickled in the worker"):
            pool.submit(tasks.identity, tasks.ErrorAtUnpickle()).result(timeout=30)
        with pytest.raises(SystemExit):
            pool.submit(tasks.return_instance, tasks.ExitAtPickle).result(timeout=30)
        no_leaks.update(_pids(pool))


@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
@pytest.mark.timeout(60)
def test_a_dead_worker_is_a_broken_process_pool_for_its_task_only(no_leaks: set[int],
                                                                  start_method: str) -> None:
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context(start_method)) as ex:
        with pytest.raises(BrokenProcessPool) as info:
            ex.submit(tasks.kill_self).result(timeout=30)
        assert isinstance(info.value, WorkerLost) and "SIGKILL" in str(info.value)
        assert ex.submit(tasks.square, 3).result(timeout=30) == 9  # the pool carries on
        no_leaks.update(_pids(ex))


@pytest.mark.timeout(60)
def test_a_tasks_exception_carries_its_remote_traceback(no_leaks: set[int]) -> None:
    # What CPython's test_traceback checks, without its private _RemoteTraceback class.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as ex:
        with pytest.raises(RuntimeError) as info:
            ex.submit(tasks.raise_runtime).result(timeout=30)
        no_leaks.update(_pids(ex))
    exc = info.value
    assert type(exc) is RuntimeError and exc.args == (123,)
    assert isinstance(exc.__cause__, RemoteTraceback)
    assert "raise RuntimeError(123)  # the remote line" in exc.__cause__.tb
    import io
    import traceback
    out = io.StringIO()
    traceback.print_exception(exc, file=out)
    assert "raise RuntimeError(123)  # the remote line" in out.getvalue()


@pytest.mark.timeout(60)
def test_max_tasks_per_child_recycles_the_worker(no_leaks: set[int]) -> None:
    # What CPython's test_max_tasks_per_child checks, without its private _processes.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver"),
                             max_tasks_per_child=3) as ex:
        pids = [ex.submit(tasks.getpid).result(timeout=30) for _ in range(4)]
        no_leaks.update(_pids(ex), pids)
        assert pids[0] == pids[1] == pids[2] != pids[3]
        wait_for(lambda: not pid_alive(pids[0]), 10, "the recycled worker to be gone")
        # One worker (the spare is apart), once the recycled one has left.
        wait_for(lambda: ex.worker_pids() == (pids[3],), 10, "one worker")


# ------------------------------------------------------------------------------------- map


@pytest.mark.parametrize("chunksize", [1, 3])
@pytest.mark.timeout(60)
def test_map_releases_each_result_as_it_yields_it(no_leaks: set[int], chunksize: int) -> None:
    with ProcessPool(2, start_method="fork") as pool:
        for obj in pool.map(tasks.return_instance, [tasks.Payload] * 10, chunksize=chunksize):
            ref = weakref.ref(obj)
            del obj
            gc.collect()
            assert ref() is None
        no_leaks.update(_pids(pool))


# ------------------------------------------------------------------------ a half-started pool


@pytest.mark.timeout(60)
def test_a_pool_whose_threads_cannot_start_fails_cleanly(no_leaks: set[int],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # Mocked: thread limits and interpreter shutdown cannot be produced here for one thread.
    real_start = threading.Thread.start

    def start(self: threading.Thread) -> None:
        if self.name.startswith("corral-pool["):
            raise RuntimeError("can't create new thread at interpreter shutdown")
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    before = {t.name for t in threading.enumerate()}
    fds = len(os.listdir("/proc/self/fd"))
    ex = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork"))
    with pytest.raises(BrokenProcessPool, match="could not start its threads") as info:
        ex.submit(tasks.square, 2)
    assert isinstance(info.value, PoolBroken)
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(BrokenProcessPool):
        list(ex.map(tasks.square, range(3)))
    ex.shutdown(wait=True)  # does not raise
    assert {t.name for t in threading.enumerate()} <= before
    assert ex.worker_pids() == () and ex.spare_pids() == ()
    assert len(os.listdir("/proc/self/fd")) <= fds


# --------------------------------------------------------------- exit after shutdown(wait=False)

_EXIT_SCRIPT = """
import logging, os, sys, time
sys.path.insert(0, {tests!r})
import pool_tasks
import corral

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="LOG %(levelname)s %(message)s")
    pool = corral.ProcessPool(2, start_method={method!r})
    fut = pool.submit(pool_tasks.hang_after_marker, {marker!r})
    queued = [pool.submit(pool_tasks.square, i) for i in range(5)]
    # Running in the worker, not only sent to it (a kill in between would be a fair outcome).
    while not (os.path.exists({marker!r}) and open({marker!r}).read()):
        time.sleep(0.01)
    print(" ".join(map(str, pool.worker_pids() + pool.spare_pids())), flush=True)
    pool.shutdown(wait=False, cancel_futures=True)
"""


@pytest.mark.parametrize("start_method", START_METHODS)
@pytest.mark.timeout(90)
def test_exit_does_not_wait_for_a_task_after_shutdown_wait_false_cancel(
        tmp_path: Path, start_method: str) -> None:
    marker = tmp_path / "running"
    script = tmp_path / "exit_script.py"
    script.write_text(_EXIT_SCRIPT.format(tests=str(Path(tasks.__file__).parent),
                                          method=start_method, marker=str(marker)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    pids: list[int] = []
    try:
        out, err = proc.communicate(timeout=60)
        pids = [int(p) for p in out.split()]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    assert proc.returncode == 0, err
    assert marker.exists()  # the task did run, and never returned
    wait_for(lambda: not any(pid_alive(p) for p in pids), 10, "the workers to be gone")
    # Exits corral caused are no warnings.
    assert "LOG WARNING" not in err and "LOG ERROR" not in err, err


@pytest.mark.timeout(120)
def test_clean_shutdowns_log_no_warnings(no_leaks: set[int],
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="corral")
    for _ in range(15):
        with ProcessPool(2, start_method="fork") as pool:
            assert pool.submit(tasks.square, 2).result(timeout=30) == 4
            no_leaks.update(_pids(pool))
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not loud


# ------------------------------------------------------------------------------- validation


@pytest.mark.timeout(60)
def test_public_methods_validate_their_arguments(no_leaks: set[int]) -> None:
    with ProcessPool(1, start_method="fork") as pool:
        cases: list[tuple[Any, type[Exception], str]] = [
            (lambda: pool.submit_task(tasks.square, args=5), TypeError, "args must be a tuple"),
            (lambda: pool.submit_task(tasks.square, args="ab"), TypeError, "not a string"),
            (lambda: pool.submit_task(tasks.square, (1,), {1: 2}), TypeError, "kwargs keys"),
            (lambda: pool.submit_task(tasks.square, (1,), [1]), TypeError, "kwargs must be"),
            (lambda: pool.submit_task(5), TypeError, "fn must be a callable"),
            (lambda: pool.submit_task(tasks.square, (1,), timeout=math.nan), ValueError,
             "timeout"),
            (lambda: pool.submit_task(tasks.square, (1,), timeout=-1), ValueError, "timeout"),
            (lambda: pool.submit_task(tasks.square, (1,), timeout="1"), TypeError, "timeout"),
            (lambda: pool.submit_task(tasks.square, (1,), retries=-1), ValueError, "retries"),
            (lambda: pool.submit_task(tasks.square, (1,), retries=1.5), TypeError, "retries"),
            (lambda: pool.submit(5), TypeError, "fn must be a callable"),
            (lambda: pool.map(tasks.square, [1], chunksize=0), ValueError, "chunksize"),
            (lambda: pool.map(tasks.square, [1], timeout="x"), TypeError, "timeout"),
            (lambda: pool.map(tasks.square, [1], timeout=math.nan), ValueError, "timeout"),
            (lambda: pool.map(5, [1]), TypeError, "fn must be a callable"),
            (lambda: pool.map(tasks.square, 5), TypeError, "iterable 1 must be iterable"),
            (lambda: pool.map(tasks.square, [1], 5), TypeError, "iterable 2 must be iterable"),
            (lambda: pool.map(tasks.square, [1], chunksize=2**70), ValueError,
             "chunksize must be at most sys.maxsize"),
            (lambda: pool.submit_task(tasks.square, args={"x": 1}), TypeError,
             "keyword arguments go in kwargs="),
            (lambda: pool.shutdown(wait="yes"), TypeError, "wait must be a bool"),
            (lambda: pool.shutdown(cancel_futures=2), TypeError, "cancel_futures"),
            (lambda: pool.terminate(wait=None), TypeError, "wait must be a bool"),
        ]
        for call, error, message in cases:
            with pytest.raises(error, match=message):
                call()
        # inf and None mean no limit.
        assert pool.submit_task(tasks.square, [3], timeout=math.inf).result(timeout=30) == 9
        assert list(pool.map(tasks.square, [2], timeout=math.inf)) == [4]
        assert pool.submit_task(tasks.add, (1,), {"z": 2}, timeout=None).result(timeout=30) == 3
        no_leaks.update(_pids(pool))
    with pytest.raises(TypeError, match="task_timeout"):
        ProcessPool(1, task_timeout="1")
    assert ProcessPool(1, task_timeout=math.inf)._cfg.task_timeout is None
