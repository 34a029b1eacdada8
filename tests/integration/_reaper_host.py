"""A host program that reaps every child it has, as servers with a generic SIGCHLD reaper do.

Usage: python _reaper_host.py pool|supervisor START_METHOD waitpid|wait

A thread calls os.waitpid(-1, 0) (or os.wait()) in a loop from the start, so it collects corral's
workers before corral can. The script then drives a ProcessPool or a Supervisor through worker
deaths and recycling, checks that corral's own thread is not spinning, stops, and prints one JSON
line: what it saw, every worker pid it had, and how much CPU corral's thread used while idle.
Exit status 0 if it got that far (the test checks the rest).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Any

_reaped: list[int] = []


def _reaper(how: str) -> None:
    while True:
        try:
            pid = os.waitpid(-1, 0)[0] if how == "waitpid" else os.wait()[0]
            _reaped.append(pid)
        except ChildProcessError:
            time.sleep(0.002)  # no child right now: the host's loop, not a condition


def _thread_cpu(name_prefix: str) -> float:
    """CPU seconds used so far by the first thread of this process whose name starts so."""
    thread = next(t for t in threading.enumerate() if t.name.startswith(name_prefix))
    with open(f"/proc/self/task/{thread.native_id}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _idle_cpu(name_prefix: str, seconds: float = 1.0) -> float:
    before = _thread_cpu(name_prefix)
    threading.Event().wait(seconds)  # a measuring window, not a wait for a condition
    return _thread_cpu(name_prefix) - before


def _pool(method: str, out: dict[str, Any]) -> None:
    import pool_tasks as tasks

    from corral import ProcessPool, WorkerLost

    pids: set[int] = set()
    pool = ProcessPool(2, start_method=method, max_tasks_per_worker=5, stop_timeout=2.0)
    try:
        # Recycling: workers asked to leave, whose exits the reaper takes.
        got = [pool.submit(tasks.getpid).result(timeout=30) for _ in range(30)]
        pids.update(got)
        lost = 0
        for _ in range(3):  # deaths mid-task: the reaper takes those too
            try:
                pool.submit(tasks.kill_self).result(timeout=30)
            except WorkerLost as exc:
                lost += 1
                out.setdefault("lost", []).append(str(exc))
        out["squares"] = [f.result(timeout=30) for f in
                          [pool.submit(tasks.square, i) for i in range(20)]]
        out["workers_lost"] = lost
        out["broken"] = pool.broken
        pids.update(pool.worker_pids(), pool.spare_pids())
        out["idle_cpu"] = _idle_cpu("corral-pool[")
    finally:
        pids.update(pool.worker_pids(), pool.spare_pids())
        t0 = time.monotonic()
        pool.shutdown(wait=True)
        out["shutdown_s"] = time.monotonic() - t0
    out["pids"] = sorted(pids)
    # One more pool that is never shut down: interpreter exit must still return.
    leftover = ProcessPool(1, start_method=method)
    out["pids"].append(leftover.submit(tasks.getpid).result(timeout=30))


def _supervisor(method: str, out: dict[str, Any]) -> None:
    import workers

    import corral

    pids: set[int] = set()
    sup = corral.Supervisor(workers.sleeper, workers=2, start_method=method, name="reaped",
                            backoff=corral.Backoff(initial=0.01, cap=0.05),
                            budget=corral.RestartBudget(max_restarts=None), stop_timeout=2.0)
    sup.start()
    try:
        sup.wait_ready(timeout=30)
        for _ in range(3):
            victim = sup.pids()[0]
            pids.add(victim)
            os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while victim in sup.pids() or len(sup.pids()) < 2:
                if time.monotonic() > deadline:
                    raise AssertionError(f"worker {victim} was never replaced")
                time.sleep(0.01)
            sup.wait_ready(timeout=30)
            pids.update(sup.pids())
        out["exits"] = [r.describe() for r in sup.history()]
        out["restarts"] = sum(s.restarts for s in sup.status())
        out["idle_cpu"] = _idle_cpu("corral-monitor")
    finally:
        pids.update(sup.pids())
        t0 = time.monotonic()
        sup.stop(timeout=5)
        out["shutdown_s"] = time.monotonic() - t0
    out["pids"] = sorted(pids)


def main() -> None:
    what, method, how = sys.argv[1:4]
    threading.Thread(target=_reaper, args=(how,), name="host-reaper", daemon=True).start()
    out: dict[str, Any] = {}
    if what == "pool":
        _pool(method, out)
    else:
        _supervisor(method, out)
    out["reaped_by_host"] = len(_reaped)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
