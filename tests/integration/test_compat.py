"""WorkerProcessManager, Duck's API on corral: every argument and method, with real processes.

Workers are in compat_workers.py; each records what it received in ``rec-<idx>-<pid>.json`` in a
per-test directory, and the tests wait for those files (or for states), never for time to pass.
Where the start method matters (pickling, the heartbeat, argument passing) a test runs under
fork, spawn and forkserver; the rest run under fork to keep the suite fast.
"""

from __future__ import annotations

import functools
import json
import logging
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import compat_workers as cw
import pytest

import corral
from corral import HeartbeatHealthCheck, HeartbeatUpdateNeverCalled, WorkerProcessManager
from corral.compat import STOP_TIMEOUT_CEILING, WorkerProcessInfo
from support import START_METHODS, descendants, pid_alive, wait_for

# ------------------------------------------------------------------------------------ helpers

def records(flagdir: Path, idx: int | None = None) -> list[dict[str, Any]]:
    out = []
    for path in flagdir.glob("rec-*.json"):
        data = json.loads(path.read_text())
        if idx is None or data["idx"] == idx:
            out.append(data)
    return out


def wait_record(flagdir: Path, idx: int, not_pids: Any = (), timeout: float = 15.0
                ) -> dict[str, Any]:
    """The record of worker ``idx`` from a process not in ``not_pids``."""
    def find() -> dict[str, Any] | None:
        for rec in records(flagdir, idx):
            if rec["pid"] not in not_pids:
                return rec
        return None
    found: dict[str, Any] = wait_for(find, timeout, f"worker {idx} to record (not {not_pids})")
    return found


def status_by_index(manager: WorkerProcessManager) -> dict[int, dict[str, Any]]:
    return {s["index"]: s for s in manager.status()}


def pool_records(caplog: pytest.LogCaptureFixture, manager: WorkerProcessManager,
                 since: int = 0) -> list[logging.LogRecord]:
    return [r for r in caplog.records[since:]
            if r.name == f"corral.pool.{manager.pool_name}"]


def make(flagdir: Path, fn: Callable[..., Any] = cw.record_args, **kw: Any
         ) -> WorkerProcessManager:
    kw.setdefault("num_workers", 2)
    kw.setdefault("restart_timeout", 0.1)
    kw.setdefault("process_stop_timeout", 2)
    return WorkerProcessManager(functools.partial(fn, str(flagdir)), **kw)


@contextmanager
def started(manager: WorkerProcessManager, pids: set[int], flagdir: Path | None = None
            ) -> Iterator[WorkerProcessManager]:
    """Start ``manager``; on the way out stop it and hand every pid it had to ``no_leaks``."""
    try:
        manager.start()
        yield manager
    finally:
        sup = manager.supervisor
        try:
            manager.stop(graceful=False)
        finally:
            if sup is not None:
                pids.update(s.pid for s in sup.status() if s.pid is not None)
                pids.update(r.pid for r in sup.history() if r.pid is not None)
            if flagdir is not None:
                pids.update(r["pid"] for r in records(flagdir))


# ----------------------------------------------------------------- arguments, no processes

def _fn(idx: int) -> None:
    pass


@pytest.mark.parametrize(("kwargs", "error", "name"), [
    ({"num_workers": -1}, ValueError, "num_workers"),
    ({"num_workers": "2"}, TypeError, "num_workers"),
    ({"num_workers": 2.0}, TypeError, "num_workers"),
    ({"num_workers": True}, TypeError, "num_workers"),
    ({"worker_fn": None}, TypeError, "worker_fn"),
    ({"worker_fn": "serve"}, TypeError, "worker_fn"),
    ({"args_fn": (1, 2)}, TypeError, "args_fn"),
    ({"worker_name_fn": "w"}, TypeError, "worker_name_fn"),
    ({"health_check_fn": 3}, TypeError, "health_check_fn"),
    ({"restart_timeout": -1}, ValueError, "restart_timeout"),
    ({"restart_timeout": "2"}, TypeError, "restart_timeout"),
    ({"process_stop_timeout": -0.5}, ValueError, "process_stop_timeout"),
    ({"process_stop_timeout": float("nan")}, ValueError, "process_stop_timeout"),
    ({"start_method": "thread"}, ValueError, "start_method"),
])
def test_invalid_arguments_name_the_parameter(kwargs: dict[str, Any], error: type[Exception],
                                              name: str) -> None:
    args: dict[str, Any] = {"worker_fn": _fn, "num_workers": 1, **kwargs}
    with pytest.raises(error, match=name):
        WorkerProcessManager(**args)


def test_invalid_heartbeat_check_and_stop_arguments() -> None:
    with pytest.raises(ValueError, match="heartbeat_timeout"):
        HeartbeatHealthCheck(0)
    with pytest.raises(TypeError, match="heartbeat_timeout"):
        HeartbeatHealthCheck("3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="startup_grace"):
        HeartbeatHealthCheck(1, startup_grace=-1)
    manager = WorkerProcessManager(_fn, 1)
    with pytest.raises(ValueError, match="monitor_stop_timeout"):
        manager.stop(monitor_stop_timeout=-1)
    manager.stop()  # before start(): nothing to do
    assert manager.status() == [] and manager.running_pids() == []
    assert manager.worker_processes == [] and manager.running is False


def test_attributes_as_the_original() -> None:
    hc = HeartbeatHealthCheck(3)
    manager = WorkerProcessManager(_fn, 3, health_check_fn=hc, restart_timeout=2,
                                   enable_logs=0, verbose_logs=None,  # type: ignore[arg-type]
                                   process_stop_timeout=None, daemon=True)
    assert manager.worker_fn is _fn and manager.num_workers == 3
    assert manager.args_fn(0) == () and manager.worker_name_fn(1) == "worker-1"
    assert manager.health_check_fn is hc and manager.restart_timeout == 2
    # Flags count by truth, as the original (Duck passes settings values through).
    assert manager.enable_logs is False and manager.verbose_logs is False
    assert manager.enable_monitoring is True and manager.daemon is True
    assert manager.process_stop_timeout is None and manager.start_method is None
    assert manager.running is False and manager.worker_processes == []


def test_heartbeat_check_in_the_main_process() -> None:
    hc = HeartbeatHealthCheck(3)
    with pytest.raises(RuntimeError, match="child process"):
        hc.update_heartbeat(0)
    # Not the health check of a running manager: no beats to read.
    with pytest.raises(HeartbeatUpdateNeverCalled):
        hc.check_health(None, 0)
    with pytest.raises(HeartbeatUpdateNeverCalled):
        hc(None, 0)
    for bad, error in ((True, TypeError), ("0", TypeError), ([0], TypeError), (None, TypeError),
                       (-1, ValueError)):
        with pytest.raises(error, match=r"idx must be a worker index"):
            hc.check_health(None, bad)
    # It pickles (spawn/forkserver send it to each worker) without its manager link.
    WorkerProcessManager(_fn, 1, health_check_fn=hc)
    copy = pickle.loads(pickle.dumps(hc))
    assert (copy.heartbeat_timeout, copy.startup_grace) == (3.0, 30.0)
    assert copy._manager is None


def test_default_startup_grace() -> None:
    # Ten times a huge timeout is capped, never inf (which would be refused, naming
    # startup_grace, a parameter the caller did not pass).
    assert HeartbeatHealthCheck(1e308).startup_grace == sys.float_info.max
    assert HeartbeatHealthCheck(0.5).startup_grace == 30.0
    assert HeartbeatHealthCheck(3.01).startup_grace == pytest.approx(30.1)
    assert HeartbeatHealthCheck(10).startup_grace == 100.0
    assert HeartbeatHealthCheck(10, startup_grace=2).startup_grace == 2.0


# ------------------------------------------------------------------- start methods, pickling

def _closure_factory() -> Callable[..., None]:
    def serve(idx: int, *args: Any) -> None:
        pass
    return serve


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
@pytest.mark.parametrize("kind", ["lambda", "closure"])
def test_lambda_or_closure_under_spawn_is_a_clear_error(method: str, kind: str,
                                                        no_leaks: set[int]) -> None:
    fn = (lambda idx: None) if kind == "lambda" else _closure_factory()
    with pytest.raises(corral.NotPicklable) as info:
        WorkerProcessManager(fn, 2, start_method=method)
    message = str(info.value)
    assert "worker_fn" in message and "module-level" in message and method in message
    assert ("<lambda>" if kind == "lambda" else "serve") in message
    assert isinstance(info.value, TypeError)


def test_unpicklable_args_under_spawn_start_nothing(tmp_path: Path,
                                                    no_leaks: set[int]) -> None:
    before = set(descendants())
    manager = make(tmp_path, args_fn=lambda idx: (lambda: idx), start_method="spawn")
    with pytest.raises(corral.NotPicklable, match=r"args_fn\(0\)"):
        manager.start()
    assert set(descendants()) == before
    assert manager.running is False and manager.status() == []


def test_start_method_none_is_multiprocessing_default(no_leaks: set[int]) -> None:
    before = multiprocessing.get_start_method(allow_none=True)
    expected = before or multiprocessing.get_all_start_methods()[0]
    manager = WorkerProcessManager(_fn, 0)
    with started(manager, no_leaks):
        sup = manager.supervisor
        assert sup is not None and sup.spec.start_method == expected
    # Resolving the default did not fix multiprocessing's global start method.
    assert multiprocessing.get_start_method(allow_none=True) == before


# -------------------------------------------------------------------- start, status, stop

@pytest.mark.parametrize("method", START_METHODS)
def test_start_status_args_names_stop(method: str, tmp_path: Path,
                                      no_leaks: set[int]) -> None:
    returns = {0: (1, "a"), 1: "abc", 2: None, 3: True}
    manager = make(tmp_path, num_workers=4, args_fn=returns.__getitem__,
                   worker_name_fn=lambda idx: f"w{idx}", start_method=method)
    with started(manager, no_leaks, tmp_path):
        # As the original: every process exists when start() returns.
        pids = manager.running_pids()
        assert len(pids) == 4 and all(pid_alive(p) for p in pids)
        assert manager.running is True
        procs = manager.worker_processes
        assert [p.name for p in procs] == ["w0", "w1", "w2", "w3"]
        assert sorted(p.pid for p in procs if p.pid) == sorted(pids)
        assert all(isinstance(p, WorkerProcessInfo) and p.is_alive() and p.exitcode is None
                   for p in procs)
        recs = {i: wait_record(tmp_path, i) for i in range(4)}
        # A tuple is spread; a string, True or any other single value is one argument;
        # None is no argument (the original split "abc" into three).
        assert recs[0]["args"] == ["1", "'a'"]
        assert recs[1]["args"] == ["'abc'"]
        assert recs[2]["args"] == []
        assert recs[3]["args"] == ["True"]
        for i, rec in recs.items():
            assert rec["name"] == f"w{i}" and rec["title"] == f"w{i}"
            assert rec["daemon"] is False
        status = manager.status()
        assert [s["index"] for s in status] == [0, 1, 2, 3]
        for s in status:
            assert {"name", "pid", "alive", "state", "restarts", "last_exit"} <= set(s)
            assert s["alive"] is True and s["state"] == "running" and s["restarts"] == 0
            assert s["last_exit"] is None and s["pid"] == recs[s["index"]]["pid"]
        manager.stop()
        assert manager.running is False
        assert not any(pid_alive(p) for p in pids)
        for s in manager.status():
            assert s["alive"] is False and s["last_exit"] == "shut down: SIGTERM(-15)"
            assert s["pid"] in pids  # the last process, as the original kept it
        assert all(p.exitcode == -signal.SIGTERM and not p.is_alive()
                   for p in manager.worker_processes)
        assert manager.running_pids() == []


def test_worker_processes_behave_like_processes(tmp_path: Path, no_leaks: set[int]) -> None:
    manager = make(tmp_path, num_workers=1, restart_timeout=0)
    with started(manager, no_leaks, tmp_path):
        (proc,) = manager.worker_processes
        first = wait_record(tmp_path, 0)["pid"]
        assert proc.pid == first and proc.daemon is False and proc.index == 0
        proc.terminate()
        proc.join(timeout=10)
        assert not pid_alive(first) and not proc.is_alive()
        wait_for(lambda: proc.exitcode == -signal.SIGTERM, 10, "the exit to be recorded")
        second = wait_record(tmp_path, 0, not_pids={first})["pid"]
        (replacement,) = manager.worker_processes
        assert replacement.pid == second and replacement.is_alive()
        replacement.kill()
        replacement.join(timeout=10)
        wait_for(lambda: replacement.exitcode == -signal.SIGKILL, 10, "the SIGKILL recorded")


def test_daemon_applies_to_every_start(tmp_path: Path, no_leaks: set[int]) -> None:
    manager = make(tmp_path, num_workers=1, daemon=True, restart_timeout=0)
    with started(manager, no_leaks, tmp_path):
        first = wait_record(tmp_path, 0)
        assert first["daemon"] is True and manager.worker_processes[0].daemon is True
        os.kill(first["pid"], signal.SIGKILL)
        second = wait_record(tmp_path, 0, not_pids={first["pid"]})
        assert second["daemon"] is True  # the original passed daemon on restarts only


def test_start_twice_raises_and_leaves_one_pool(tmp_path: Path, no_leaks: set[int]) -> None:
    before = set(descendants())
    manager = make(tmp_path, num_workers=2)
    with started(manager, no_leaks, tmp_path):
        pids = set(manager.running_pids())
        with pytest.raises(RuntimeError, match="running already") as info:
            manager.start()
        assert isinstance(info.value, corral.SupervisorStateError)
        assert set(descendants()) - before == pids
        assert set(manager.running_pids()) == pids
        manager.stop()
        manager.stop()  # idempotent
        # A stopped manager starts again, as the original.
        manager.start()
        again = set(manager.running_pids())
        assert len(again) == 2 and not again & pids and manager.running
        no_leaks.update(again)


@pytest.mark.parametrize("which", ["args_fn", "worker_name_fn", "name_not_str"])
def test_callbacks_raising_part_way_start_nothing(which: str, tmp_path: Path,
                                                  no_leaks: set[int]) -> None:
    def args_fn(idx: int) -> tuple[int, ...]:
        if idx == 2 and which == "args_fn":
            raise LookupError("no arguments for worker 2")
        return (idx,)

    def name_fn(idx: int) -> Any:
        if idx == 2 and which == "worker_name_fn":
            raise LookupError("no name for worker 2")
        return 42 if idx == 2 else f"w{idx}"

    before = set(descendants())
    manager = make(tmp_path, num_workers=4, args_fn=args_fn,
                   worker_name_fn=name_fn if which != "args_fn" else None)
    error: type[Exception] = TypeError if which == "name_not_str" else LookupError
    with pytest.raises(error, match="worker_name_fn" if which == "name_not_str" else "2"):
        manager.start()
    assert set(descendants()) == before and not records(tmp_path)
    assert manager.running is False and manager.running_pids() == []
    # Fixed, it starts.
    manager.args_fn = lambda idx: (idx,)
    manager.worker_name_fn = lambda idx: f"ok{idx}"
    with started(manager, no_leaks, tmp_path):
        assert len(manager.running_pids()) == 4


def test_process_stop_timeout_none_is_bounded(no_leaks: set[int]) -> None:
    manager = WorkerProcessManager(_fn, 0, process_stop_timeout=None)
    with started(manager, no_leaks):
        sup = manager.supervisor
        assert sup is not None and sup.spec.stop_timeout == STOP_TIMEOUT_CEILING


# ------------------------------------------------------------------------------ restarts

def test_restart_timeout_does_not_serialise_restarts(tmp_path: Path,
                                                     no_leaks: set[int]) -> None:
    """restart_timeout is a cool-down between two restarts of one worker, never a queue: three
    workers killed together come back together at once, and killed again together they come
    back together once their cool-down is over (the original: 1 s apart, after its 2 s poll)."""
    manager = make(tmp_path, num_workers=3, restart_timeout=1.0)
    with started(manager, no_leaks, tmp_path):
        sup = manager.supervisor
        assert sup is not None
        pids = {i: wait_record(tmp_path, i)["pid"] for i in range(3)}
        seen = set(pids.values())
        for round_ in (1, 2):
            killed_at = time.time()
            for pid in pids.values():
                os.kill(pid, signal.SIGKILL)
            pids = {i: wait_record(tmp_path, i, not_pids=seen)["pid"] for i in range(3)}
            seen |= set(pids.values())
            # A worker's record can come before the monitor has taken in its start.
            new = set(pids.values())
            wait_for(lambda new=new: sum(1 for s in sup.status() if s.pid in new) == 3,
                     10, "the three new pids in status()")
            started_at = [s.started_at for s in sup.status() if s.pid in pids.values()]
            assert len(started_at) == 3 and all(t is not None for t in started_at)
            times = [t for t in started_at if t is not None]
            if round_ == 1:
                assert min(times) - killed_at < 0.8  # the first restart: at once
                first_restart = min(times)
            else:
                assert min(times) - first_restart >= 0.9  # within the cool-down: waited
            assert max(times) - min(times) < 0.8  # together, not one after another
        assert all(s["restarts"] == 2 and s["last_exit"] == "killed by signal: SIGKILL(-9)"
                   for s in manager.status())


def test_enable_monitoring_false_never_restarts(tmp_path: Path, no_leaks: set[int]) -> None:
    calls: list[int] = []
    manager = make(tmp_path, num_workers=2, restart_timeout=0, enable_monitoring=False,
                   health_check_fn=lambda p, idx: calls.append(idx) or False)
    manager.health_check_interval = 0.05
    with started(manager, no_leaks, tmp_path):
        pids = {i: wait_record(tmp_path, i)["pid"] for i in range(2)}
        os.kill(pids[0], signal.SIGKILL)
        wait_for(lambda: status_by_index(manager)[0]["state"] == "exited", 10, "exited")
        s0, s1 = status_by_index(manager)[0], status_by_index(manager)[1]
        assert s0["alive"] is False and s0["last_exit"] == "killed by signal: SIGKILL(-9)"
        assert s0["pid"] == pids[0] and s0["restarts"] == 0
        assert s1["alive"] is True and s1["pid"] == pids[1]
        assert manager.running_pids() == [pids[1]] and calls == []
        assert manager.running  # worker 1 still runs


def test_pool_without_monitoring_ends_when_workers_exit(tmp_path: Path,
                                                       no_leaks: set[int]) -> None:
    manager = make(tmp_path, cw.exit_with, num_workers=2, args_fn=lambda idx: 3,
                   enable_monitoring=False)
    with started(manager, no_leaks, tmp_path):
        wait_for(lambda: not manager.running, 10, "the pool to end")
        assert [s["last_exit"] for s in manager.status()] == ["exited: exit code 3"] * 2
        manager.start()  # nothing runs any more: starting again is allowed
        wait_for(lambda: len(records(tmp_path)) == 4, 10, "the second generation")


# ----------------------------------------------------------------------------- health checks

class _Checks:
    """A health_check_fn that records every call and fails on demand (runs in this process)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[int, int, str, bool, int | None]] = []
        self.bad: dict[int, tuple[int, str]] = {}  # idx -> (pid, "false" | "raise" | "hang")
        self.release = threading.Event()

    def __call__(self, process: Any, idx: int) -> Any:
        with self.lock:
            self.calls.append((idx, process.pid, process.name, process.is_alive(),
                               process.exitcode))
            pid, how = self.bad.get(idx, (0, ""))
        if pid != process.pid:
            return 1  # truthy counts as healthy, as the original's `if not healthy`
        if how == "false":
            return False
        if how == "raise":
            raise ValueError("probe failed")
        self.release.wait(30)
        return True

    def count(self, idx: int, pid: int) -> int:
        with self.lock:
            return sum(1 for c in self.calls if c[0] == idx and c[1] == pid)


def test_health_check_fn_false_or_raising_restarts(tmp_path: Path, no_leaks: set[int],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="corral")
    checks = _Checks()
    manager = make(tmp_path, num_workers=3, health_check_fn=checks)
    manager.health_check_interval = 0.05
    with started(manager, no_leaks, tmp_path):
        first = {i: wait_record(tmp_path, i)["pid"] for i in range(3)}
        wait_for(lambda: checks.count(2, first[2]) >= 1, 10, "a first check")
        _, pid, name, alive, exitcode = next(c for c in checks.calls if c[0] == 2)
        assert (pid, name, alive, exitcode) == (first[2], "worker-2", True, None)
        checks.bad.update({0: (first[0], "false"), 1: (first[1], "raise")})
        new = {i: wait_record(tmp_path, i, not_pids={first[i]})["pid"] for i in range(2)}
        # The replacements pass their checks and stay; the healthy worker was never touched.
        wait_for(lambda: all(checks.count(i, new[i]) >= 3 for i in range(2)), 10, "checks")
        status = manager.status()
        assert [s["pid"] for s in status] == [new[0], new[1], first[2]]
        assert [s["restarts"] for s in status] == [1, 1, 0]
        assert status[0]["last_exit"] == status[1]["last_exit"] == "unhealthy: SIGTERM(-15)"
    raised = [r for r in pool_records(caplog, manager)
              if "health_check_fn" in r.getMessage() and "probe failed" in r.getMessage()]
    assert raised and raised[0].exc_info is not None  # verbose_logs: the traceback


def test_hung_health_check_is_unhealthy_and_others_stay_supervised(
        tmp_path: Path, no_leaks: set[int]) -> None:
    checks = _Checks()
    manager = make(tmp_path, num_workers=2, health_check_fn=checks)
    manager.health_check_interval = 0.05
    manager.health_check_timeout = 0.3
    try:
        with started(manager, no_leaks, tmp_path):
            first = {i: wait_record(tmp_path, i)["pid"] for i in range(2)}
            checks.bad[0] = (first[0], "hang")
            wait_record(tmp_path, 0, not_pids={first[0]})
            # While worker 0's check hung, worker 1 went on being checked (the original froze).
            before = checks.count(1, first[1])
            wait_for(lambda: checks.count(1, first[1]) >= before + 3, 10, "worker 1 checked")
            assert manager.status()[1]["pid"] == first[1]
            assert any("still running" in (r.detail or "")
                       for r in (manager.supervisor.history() if manager.supervisor else ()))
    finally:
        checks.release.set()


def test_replacement_of_a_worker_with_a_hung_check_stays_up(tmp_path: Path,
                                                           no_leaks: set[int]) -> None:
    checks = _Checks()
    manager = make(tmp_path, num_workers=1, health_check_fn=checks)
    manager.health_check_interval = 0.05
    manager.health_check_timeout = 0.3
    try:
        with started(manager, no_leaks, tmp_path):
            first = wait_record(tmp_path, 0)["pid"]
            checks.bad[0] = (first, "hang")
            new = wait_record(tmp_path, 0, not_pids={first})["pid"]
            # Its predecessor's check still hangs; that is not held against it.
            wait_for(lambda: checks.count(0, new) >= 3, 10, "the replacement checked healthy")
            assert manager.status()[0]["pid"] == new
    finally:
        checks.release.set()


@pytest.mark.parametrize("enable_logs", [True, False])
def test_enable_and_verbose_logs(enable_logs: bool, tmp_path: Path, no_leaks: set[int],
                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="corral")
    fail = threading.Event()

    def check(process: Any, idx: int) -> bool:
        if fail.is_set() and idx == 0:
            raise ValueError("probe failed")
        return True

    manager = make(tmp_path, cw.ignore_term, num_workers=2, health_check_fn=check,
                   enable_logs=enable_logs, verbose_logs=False, process_stop_timeout=0.2)
    manager.health_check_interval = 0.05
    with started(manager, no_leaks, tmp_path):
        first = {i: wait_record(tmp_path, i)["pid"] for i in range(2)}
        os.kill(first[1], signal.SIGKILL)  # a crash: a warning
        fail.set()  # a raising check on an SIGTERM-ignoring worker: warnings and a SIGKILL
        for i in range(2):
            wait_record(tmp_path, i, not_pids={first[i]})
        fail.clear()
        manager.stop()
    loud = [r for r in pool_records(caplog, manager) if r.levelno >= logging.WARNING]
    if enable_logs:
        assert loud
        # verbose_logs=False: no tracebacks.
        assert all(r.exc_info is None for r in pool_records(caplog, manager))
    else:
        assert loud == []
        assert pool_records(caplog, manager) == []


def test_stop_no_logging(tmp_path: Path, no_leaks: set[int],
                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="corral")
    manager = make(tmp_path, cw.ignore_term, num_workers=1, process_stop_timeout=0.2)
    with started(manager, no_leaks, tmp_path):
        wait_record(tmp_path, 0)
        # The worker can record before the monitor logs "started": wait for that line too.
        wait_for(lambda: any("started" in r.getMessage() for r in pool_records(caplog, manager)),
                 10, "the 'started' line")
        mark = len(caplog.records)
        manager.stop(no_logging=True)  # a SIGKILL would be logged otherwise
        assert pool_records(caplog, manager, since=mark) == []
        # The next start logs again.
        manager.start()
        manager.stop()
        assert any("stopped" in r.getMessage() for r in pool_records(caplog, manager, mark))


# ----------------------------------------------------------------------------------- stopping

def test_stop_one_deadline_for_the_pool(tmp_path: Path, no_leaks: set[int]) -> None:
    manager = make(tmp_path, cw.ignore_term, num_workers=4, process_stop_timeout=1.0)
    with started(manager, no_leaks, tmp_path):
        pids = [wait_record(tmp_path, i)["pid"] for i in range(4)]
        t0 = time.monotonic()
        manager.stop()
        took = time.monotonic() - t0
        assert not any(pid_alive(p) for p in pids)
        # One deadline: ~1 s, not 4 x 1 s (and the original never killed them at all).
        assert 0.8 <= took < 3.0, took
        assert all(s["last_exit"] == "shut down: SIGKILL(-9)" for s in manager.status())


def test_stop_not_graceful_kills_at_once(tmp_path: Path, no_leaks: set[int]) -> None:
    manager = make(tmp_path, cw.ignore_term, num_workers=2, process_stop_timeout=30)
    with started(manager, no_leaks, tmp_path):
        pids = [wait_record(tmp_path, i)["pid"] for i in range(2)]
        t0 = time.monotonic()
        manager.stop(graceful=False)
        assert time.monotonic() - t0 < 5
        assert not any(pid_alive(p) for p in pids)
        assert all(s["last_exit"] == "shut down: SIGKILL(-9)" for s in manager.status())


def test_stop_without_wait_still_kills(tmp_path: Path, no_leaks: set[int]) -> None:
    manager = make(tmp_path, cw.ignore_term, num_workers=2, process_stop_timeout=0.3)
    with started(manager, no_leaks, tmp_path):
        pids = [wait_record(tmp_path, i)["pid"] for i in range(2)]
        manager.stop(wait=False, monitor_stop_timeout=0.1)
        assert manager.running is False
        wait_for(lambda: not any(pid_alive(p) for p in pids), 10, "workers killed")
        sup = manager.supervisor
        assert sup is not None and sup.wait(10)


# --------------------------------------------------------------- heartbeat, Duck's own pattern

@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", START_METHODS)
def test_duck_pattern_survives_killed_and_hung_workers(method: str, tmp_path: Path,
                                                       no_leaks: set[int]) -> None:
    # As duck.http.core.httpd.httpd starts its workers (with a module-level worker here, which
    # every start method can send, and a shorter heartbeat timeout).
    hc = HeartbeatHealthCheck(heartbeat_timeout=1.0)
    manager = WorkerProcessManager(
        worker_fn=functools.partial(cw.duck_server, str(tmp_path)),
        num_workers=3,
        args_fn=lambda idx: (True),
        worker_name_fn=lambda idx: f"duck-worker-{idx}",
        health_check_fn=hc,
        restart_timeout=2,
        enable_logs=True,
        verbose_logs=False,
        enable_monitoring=True,
        process_stop_timeout=3,
        start_method=method,
    )
    with started(manager, no_leaks, tmp_path):
        first = {i: wait_record(tmp_path, i) for i in range(3)}
        for i, rec in first.items():
            assert rec["args"] == [{"hc": 1.0}, "True"] and rec["title"] == f"duck-worker-{i}"
        assert all(hc.check_health(p, p.index) for p in manager.worker_processes)
        assert hc(None, 2) is True
        os.kill(first[0]["pid"], signal.SIGKILL)  # killed
        (tmp_path / f"hang-{first[1]['pid']}").touch()  # hung: alive, no more beats
        new0 = wait_record(tmp_path, 0, not_pids={first[0]["pid"]})
        new1 = wait_record(tmp_path, 1, not_pids={first[1]["pid"]})
        assert not pid_alive(first[1]["pid"])
        status = status_by_index(manager)
        assert status[0]["last_exit"] == "killed by signal: SIGKILL(-9)"
        assert status[1]["last_exit"].startswith("hung: ")
        assert status[2]["pid"] == first[2]["pid"] and status[2]["restarts"] == 0
        assert {status[0]["pid"], status[1]["pid"]} == {new0["pid"], new1["pid"]}
        wait_for(lambda: all(hc(None, i) for i in range(3)), 10, "every worker beating")
        pids = manager.running_pids()
        t0 = time.monotonic()
        manager.stop()
        assert time.monotonic() - t0 < 5 and not any(pid_alive(p) for p in pids)


def test_duck_closure_worker_under_fork(tmp_path: Path, no_leaks: set[int]) -> None:
    flagdir = str(tmp_path)

    def start_server_loop_in_worker(idx: int, healthcheck_obj: HeartbeatHealthCheck,
                                    restart_background_workers: bool = True) -> None:
        # Duck's worker is a closure: fine under fork, the default start method up to 3.13.
        cw.duck_server(flagdir, idx, healthcheck_obj, restart_background_workers)

    manager = WorkerProcessManager(
        worker_fn=start_server_loop_in_worker, num_workers=2,
        args_fn=lambda idx: (True),
        worker_name_fn=lambda idx: f"duck-worker-{idx}",
        health_check_fn=HeartbeatHealthCheck(heartbeat_timeout=3.01), restart_timeout=2,
        process_stop_timeout=3, start_method="fork")
    with started(manager, no_leaks, tmp_path):
        for i in range(2):
            assert wait_record(tmp_path, i)["args"] == [{"hc": 3.01}, "True"]


def test_never_beating_worker_is_restarted_after_its_grace(
        tmp_path: Path, no_leaks: set[int], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="corral")
    hc = HeartbeatHealthCheck(0.3, startup_grace=1.0)
    manager = make(tmp_path, cw.never_beats, num_workers=1, health_check_fn=hc,
                   restart_timeout=0)
    with started(manager, no_leaks, tmp_path):
        first = wait_record(tmp_path, 0)["pid"]
        with pytest.raises(HeartbeatUpdateNeverCalled):
            hc.check_health(None, 0)
        wait_record(tmp_path, 0, not_pids={first})
        assert status_by_index(manager)[0]["last_exit"].startswith("startup timeout: ")
    hints = [r for r in pool_records(caplog, manager)
             if r.levelno == logging.WARNING and "update_heartbeat" in r.getMessage()]
    assert hints


def test_slow_booting_worker_is_not_killed(tmp_path: Path, no_leaks: set[int]) -> None:
    # It boots for 4 heartbeat timeouts before its first beat (the original killed it in a
    # loop); the startup grace covers it, then the heartbeat timeout applies.
    hc = HeartbeatHealthCheck(0.3, startup_grace=10)
    manager = make(tmp_path, cw.slow_boot, num_workers=1, health_check_fn=hc,
                   args_fn=lambda idx: 1.2)
    with started(manager, no_leaks, tmp_path):
        (proc,) = manager.worker_processes
        assert status_by_index(manager)[0]["state"] == "starting"
        rec = wait_record(tmp_path, 0)
        assert rec["pid"] == proc.pid
        # Its first beat made it ready (the monitor learns of it through its wakeup pipe).
        wait_for(lambda: status_by_index(manager)[0]["state"] == "running", 10, "ready")
        s = status_by_index(manager)[0]
        assert s["restarts"] == 0 and s["pid"] == proc.pid and hc(proc, 0)


class _StrictHeartbeat(HeartbeatHealthCheck):
    """A subclass with a check of its own: polled like a health_check_fn function."""

    fail_pid = 0

    def check_health(self, process: Any, idx: int) -> bool:
        return process.pid != self.fail_pid and super().check_health(process, idx)


def test_heartbeat_subclass_with_own_check_is_polled(tmp_path: Path,
                                                     no_leaks: set[int]) -> None:
    hc = _StrictHeartbeat(5)
    manager = make(tmp_path, cw.duck_server, num_workers=2, health_check_fn=hc,
                   restart_timeout=0)
    manager.health_check_interval = 0.05
    with started(manager, no_leaks, tmp_path):
        first = {i: wait_record(tmp_path, i)["pid"] for i in range(2)}
        assert first[0] in manager.running_pids()
        hc.fail_pid = first[0]
        wait_record(tmp_path, 0, not_pids={first[0]})
        assert status_by_index(manager)[0]["last_exit"] == "unhealthy: SIGTERM(-15)"
        assert status_by_index(manager)[1]["pid"] == first[1]


def test_forked_copy_of_a_manager_refuses_instead_of_hanging(tmp_path: Path,
                                                             no_leaks: set[int]) -> None:
    manager = make(tmp_path, num_workers=1)
    with started(manager, no_leaks, tmp_path):
        ctx = multiprocessing.get_context("fork")
        reader, writer = ctx.Pipe(duplex=False)

        def child() -> None:
            try:
                manager.status()
            except RuntimeError as exc:
                writer.send(str(exc))
            else:
                writer.send("no error")

        proc = ctx.Process(target=child)
        proc.start()
        no_leaks.add(proc.pid)  # type: ignore[arg-type]
        assert reader.poll(20)
        assert "only be used in the process that created it" in reader.recv()
        proc.join(10)
