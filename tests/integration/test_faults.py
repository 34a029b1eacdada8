"""The fault table: every way a worker (or the supervisor) can fail, under every start method.

One table, ``FAULTS``; each row names a fault and what must follow it. Rows of kind "crash" are
run under each restart policy too, since what follows a crash depends on it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import workers
from _helpers import (
    in_state,
    pool,
    read_pid,
    running_with_new_pid,
    start_supervisor_script,
    status_of,
    wait_gone,
    wait_value,
)

from corral import EventKind, RestartPolicy, StopReason, WorkerState
from support import START_METHODS, kill_pids, pid_alive, wait_for


@dataclass(frozen=True)
class Fault:
    """One row of the table.

    kind: "crash" (the worker dies while the pool runs), "stop" (a worker that makes stopping
    hard), "supervisor" (the supervisor itself dies).
    fault: what ``workers.fault_once`` does (crash rows); "wait" means the test signals it.
    send: a signal the test sends to the worker (crash rows with fault="wait").
    reason/code/sig: what ``status().last_exit`` must say.
    """

    id: str
    kind: str
    fault: str = "wait"
    send: int | None = None
    reason: StopReason | None = None
    code: int | None = None
    sig: int | None = None
    target: str = "graceful"  # supervisor rows: what its workers run (workers.py)

    @property
    def clean(self) -> bool:
        return self.reason is StopReason.EXITED and self.code == 0


FAULTS: tuple[Fault, ...] = (
    Fault("sigkill", "crash", send=signal.SIGKILL, reason=StopReason.KILLED, sig=signal.SIGKILL),
    Fault("exit-0", "crash", fault="exit0", reason=StopReason.EXITED, code=0),
    Fault("exit-1", "crash", fault="exit1", reason=StopReason.EXITED, code=1),
    Fault("segfault", "crash", fault="segfault", reason=StopReason.KILLED, sig=signal.SIGSEGV),
    Fault("exception", "crash", fault="exception", reason=StopReason.EXITED, code=1),
    # Stopping must SIGKILL it after stop_timeout.
    Fault("ignores-sigterm", "stop", reason=StopReason.SHUTDOWN, sig=signal.SIGKILL),
    # Its death (crash or stop) must take its grandchild with it: the process group.
    Fault("grandchild", "stop", reason=StopReason.SHUTDOWN, code=0),
    # SIGSTOPped when stop() comes: stop must still finish and reap it.
    Fault("sigstopped", "stop", reason=StopReason.SHUTDOWN, sig=signal.SIGTERM),
    # The supervisor is SIGKILLed: every worker must die with it, even one that is hung in
    # native code with the GIL held (no Python thread of it can run).
    Fault("supervisor-sigkilled", "supervisor"),
    Fault("supervisor-sigkilled-worker-hung", "supervisor", target="hang_holding_gil"),
)

# Known bugs, by (fault, start method): the test is expected to fail until they are fixed.
KNOWN_BUGS: dict[tuple[str, str], str] = {}

POLICIES = tuple(p.value for p in RestartPolicy)


def _cases() -> list[object]:
    cases: list[object] = []
    for fault in FAULTS:
        policies: tuple[str | None, ...] = POLICIES if fault.kind == "crash" else (None,)
        for policy in policies:
            for method in START_METHODS:
                ident = "-".join(x for x in (fault.id, policy, method) if x)
                bug = KNOWN_BUGS.get((fault.id, method))
                marks = [pytest.mark.xfail(strict=True, reason=bug)] if bug else []
                cases.append(pytest.param(fault, policy, method, id=ident, marks=marks))
    return cases


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("fault", "policy", "method"), _cases())
def test_fault(fault: Fault, policy: str | None, method: str, no_leaks: set[int],
               tmp_path: Path) -> None:
    run = _SCENARIOS.get(fault.id, _crash)
    run(fault, policy, method, no_leaks, tmp_path)


# ------------------------------------------------------------------------------------ crashes

def _crash(fault: Fault, policy: str | None, method: str, started: set[int],
           tmp_path: Path) -> None:
    """Worker 0 fails once; worker 1 runs on. Check the record and the restart decision."""
    assert policy is not None
    restarts = RestartPolicy.parse(policy).wants_restart(clean_exit=fault.clean)
    with pool(started, workers.fault_once, workers=2, start_method=method, restart=policy,
              ready_when="ready", args=lambda i: (fault.fault, str(tmp_path))) as (sup, log):
        failed = read_pid(tmp_path / "fault-0")
        started.add(failed)
        sup.wait_ready(1, timeout=15)
        other = in_state(sup, 1, WorkerState.RUNNING)
        if fault.send is not None:
            wait_for(lambda: status_of(sup, 0).pid == failed
                     and status_of(sup, 0).state is WorkerState.RUNNING, 15, "worker 0 up")
            os.kill(failed, fault.send)

        if restarts:
            now = running_with_new_pid(sup, 0, failed)
            assert now.restarts == 1
        else:
            now = in_state(sup, 0, WorkerState.EXITED)
            assert now.pid is None
            assert now.restarts == 0
        assert not pid_alive(failed)

        record = now.last_exit
        assert record is not None
        assert record.pid == failed
        assert record.reason is fault.reason, record
        assert record.exit is not None
        assert record.exit.code == fault.code, record
        assert record.exit.signal == fault.sig, record

        # The other worker never noticed.
        assert status_of(sup, 1).pid == other.pid
        assert status_of(sup, 1).restarts == 0

        # The events tell the same story.
        log.wait(lambda evs: any(e.kind is EventKind.EXITED and e.pid == failed for e in evs),
                 10, "the EXITED event")
        exited = [e for e in log.of(EventKind.EXITED, 0) if e.pid == failed]
        assert exited[0].exit == record
        if restarts:
            log.wait(lambda evs: len([e for e in evs if e.kind is EventKind.SPAWNED
                                      and e.index == 0]) == 2, 10, "the replacement's event")
            assert len(log.of(EventKind.RESTARTING, 0)) == 1
        else:
            assert log.of(EventKind.RESTARTING, 0) == []
            assert len(log.of(EventKind.SPAWNED, 0)) == 1


# ------------------------------------------------------------------------------ stop-time faults

def _ignores_sigterm(fault: Fault, policy: str | None, method: str, started: set[int],
                     tmp_path: Path) -> None:
    stop_timeout = 1.0
    with pool(started, workers.ignore_sigterm, workers=2, start_method=method,
              ready_when="ready", stop_timeout=stop_timeout) as (sup, _log):
        sup.wait_ready(timeout=15)
        pids = sup.pids()
        t0 = time.monotonic()
        sup.stop()
        elapsed = time.monotonic() - t0
    assert stop_timeout * 0.8 <= elapsed < stop_timeout + 4, elapsed
    _assert_reaped(pids)
    for s in sup.status():
        assert s.state is WorkerState.STOPPED
        assert s.last_exit is not None
        assert s.last_exit.reason is fault.reason
        assert s.last_exit.exit is not None and s.last_exit.exit.signal == fault.sig


def _grandchild(fault: Fault, policy: str | None, method: str, started: set[int],
                tmp_path: Path) -> None:
    def grandchildren() -> dict[int, int]:
        """worker pid -> grandchild pid, from the files the workers wrote."""
        out = {}
        for path in tmp_path.glob("grandchild-*-*"):
            if path.suffix != ".tmp":
                out[int(path.name.rsplit("-", 1)[1])] = int(path.read_text())
        started.update(out.values())
        return out

    def grandchildren_if(n: int) -> dict[int, int] | None:
        found = grandchildren()
        return found if len(found) == n else None

    with pool(started, workers.with_grandchild, workers=2, start_method=method,
              ready_when="ready", stop_timeout=5.0,
              args=lambda i: (str(tmp_path),)) as (sup, _log):
        sup.wait_ready(timeout=15)
        first = wait_value(lambda: grandchildren_if(2), 15, "two grandchildren")
        assert all(pid_alive(g) for g in first.values())

        # A worker that crashes takes its grandchild with it, and is replaced.
        victim = status_of(sup, 0).pid
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        wait_gone([first[victim]], 10, "the crashed worker's grandchild to die")
        replaced = running_with_new_pid(sup, 0, victim)
        assert replaced.last_exit is not None
        assert replaced.last_exit.reason is StopReason.KILLED
        all_grandchildren = wait_value(lambda: grandchildren_if(3), 15,
                                       "the replacement's grandchild")

        # Stopping the pool: the workers exit 0 on SIGTERM, their grandchildren ignore it and
        # must still die (SIGKILL to the group), without waiting for stop_timeout.
        pids = sup.pids()
        t0 = time.monotonic()
        sup.stop()
        elapsed = time.monotonic() - t0
    assert elapsed < 4.0, elapsed
    _assert_reaped(pids)
    wait_gone(list(all_grandchildren.values()), 10, "the grandchildren to die")
    for s in sup.status():
        assert s.last_exit is not None
        assert s.last_exit.reason is fault.reason
        assert s.last_exit.exit is not None and s.last_exit.exit.code == fault.code


def _sigstopped(fault: Fault, policy: str | None, method: str, started: set[int],
                tmp_path: Path) -> None:
    stop_timeout = 3.0
    with pool(started, workers.sleeper, workers=2, start_method=method,
              stop_timeout=stop_timeout) as (sup, _log):
        sup.wait_ready(timeout=15)
        frozen = status_of(sup, 0).pid
        assert frozen is not None
        os.kill(frozen, signal.SIGSTOP)
        wait_for(lambda: psutil.Process(frozen).status() == psutil.STATUS_STOPPED, 10,
                 "the worker to be stopped")
        pids = sup.pids()
        t0 = time.monotonic()
        sup.stop()
        elapsed = time.monotonic() - t0
    # SIGCONT follows the stop signal, so it need not wait for the SIGKILL deadline; but a
    # SIGKILL at the deadline would be correct too: bound it by the deadline plus slack.
    assert elapsed < stop_timeout + 3, elapsed
    _assert_reaped(pids)
    record = status_of(sup, 0).last_exit
    assert record is not None and record.pid == frozen
    assert record.reason is fault.reason
    assert record.exit is not None and record.exit.signal in (signal.SIGTERM, signal.SIGKILL)


def _assert_reaped(pids: list[int]) -> None:
    """After stop() returns, the workers are not only dead but reaped: no zombie, no pid."""
    left = [p for p in pids if psutil.pid_exists(p)]
    assert not left, f"not reaped after stop(): {left}"


# ------------------------------------------------------------------------ the supervisor dies

def _supervisor_sigkilled(fault: Fault, policy: str | None, method: str, started: set[int],
                          tmp_path: Path) -> None:
    proc, pids = start_supervisor_script(method, 3, "wait", fault.target)
    started.add(proc.pid)
    started.update(pids)
    helpers: set[int] = set()
    try:
        assert len(pids) == 3
        # Its helpers (forkserver, resource tracker) too: they must go as well.
        helpers = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)} - set(pids)
        started.update(helpers)
        assert all(pid_alive(p) for p in pids)
        t0 = time.monotonic()
        proc.kill()
        proc.wait(10)
        wait_gone(pids, 10, "every worker to die with its supervisor")
        assert time.monotonic() - t0 < 10
        wait_gone(helpers, 10, "multiprocessing's helpers to exit after the supervisor")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()
        # Not our children any more: nobody else would clean up survivors.
        kill_pids(set(pids) | helpers)
        with contextlib.suppress(AssertionError):
            wait_gone(set(pids) | helpers, 10)


_SCENARIOS: dict[str, Callable[[Fault, str | None, str, set[int], Path], None]] = {
    "ignores-sigterm": _ignores_sigterm,
    "grandchild": _grandchild,
    "sigstopped": _sigstopped,
    "supervisor-sigkilled": _supervisor_sigkilled,
    "supervisor-sigkilled-worker-hung": _supervisor_sigkilled,
}


def test_table_is_complete() -> None:
    """Every row that is not a plain crash has its scenario, and the ids are unique."""
    ids = [f.id for f in FAULTS]
    assert len(ids) == len(set(ids))
    assert {f.id for f in FAULTS if f.kind != "crash"} == set(_SCENARIOS)

