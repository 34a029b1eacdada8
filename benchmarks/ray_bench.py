"""corral on Ray: from SIGKILL of a worker actor to its replacement running, with RayWorker.

Each round starts a worker (a target that calls ``corral.ready()`` and beats), SIGKILLs its
actor's pid, and, from the ``on_exit`` callback, starts the replacement at once (no backoff),
then probes it until it reports ready. Three figures per round:

- detect: SIGKILL -> on_exit called (Ray completes the pending run() call);
- started: SIGKILL -> replacement actor answered (RayWorker.start returned);
- ready: SIGKILL -> the replacement's probe says ready() was called;

next to the floor, measured in the same run: creating a bare Ray actor to its first method
reply. A last row replaces the worker with a spare actor made ahead (RayWorker.make_spare), as
a pool could keep one warm.

A second table is ``ProcessPool(backend="ray")``: a task's round trip (submit -> result, one
worker, warm) next to a bare actor method call (the floor) and the local pool's round trip;
SIGKILL of the worker running a task -> its future fails with WorkerLost; and a 1 s task
timeout -> TaskTimeout, counted from when the task started. Needs Ray
(``pip install 'corral[ray]'``); starts its own local cluster. Run::

    python benchmarks/ray_bench.py [--quick] [--rounds N] [--cpus N]
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import corral


def target(index: int) -> None:
    corral.ready()
    while True:
        corral.beat()
        time.sleep(0.02)


def _wait_ready(worker: Any, timeout: float = 30.0) -> float:
    deadline = time.monotonic() + timeout
    while True:
        reply = worker.probe(timeout=timeout)
        if reply.ready:
            return reply.received
        if time.monotonic() > deadline:
            raise TimeoutError(f"{worker!r} not ready after {timeout}s")
        time.sleep(0.001)


def floor(ray: Any, rounds: int) -> list[float]:
    """A bare actor: creation to its first method reply (what any Ray restart costs)."""

    @ray.remote
    class Bare:
        def pid(self) -> int:
            return os.getpid()

    out = []
    for _ in range(rounds):
        t0 = time.monotonic()
        actor = Bare.remote()
        ray.get(actor.pid.remote())
        out.append(time.monotonic() - t0)
        ray.kill(actor)
    return out


def recovery(rounds: int, with_spare: bool) -> dict[str, list[float]]:
    """SIGKILL -> replacement, the replacement a new actor, or a spare made ahead of time."""
    from corral.ray import ActorExit, DeathCause, RayWorker

    times: dict[str, list[float]] = {"detect": [], "started": [], "ready": []}
    worker = RayWorker.start(target, 0, name="bench-0", pool="bench")
    _wait_ready(worker)
    for _ in range(rounds):
        done = threading.Event()
        box: dict[str, Any] = {"spare": RayWorker.make_spare() if with_spare else None}

        def on_exit(old: RayWorker, end: ActorExit, box: dict[str, Any] = box,
                    done: threading.Event = done) -> None:
            box["detect"] = time.monotonic()
            box["cause"] = end.cause
            old.close()
            # What the monitor would do with a zero backoff: start the replacement now.
            box["new"] = RayWorker.start(target, 0, name="bench-0", pool="bench",
                                         spare=box["spare"])
            box["started"] = time.monotonic()
            done.set()

        worker._on_exit = on_exit  # the bench's own callback for this round
        t0 = time.monotonic()
        os.kill(worker.pid, signal.SIGKILL)
        if not done.wait(30):
            raise TimeoutError("the death was never reported")
        assert box["cause"] is DeathCause.DIED, box["cause"]
        worker = box["new"]
        ready = _wait_ready(worker)
        times["detect"].append(box["detect"] - t0)
        times["started"].append(box["started"] - t0)
        times["ready"].append(ready - t0)
    worker.stop(grace=2)
    return times


def supervisor(rounds: int, how: str, standby: int) -> list[float]:
    """corral.Supervisor(backend="ray"): kill (SIGKILL of the pid, or ray.kill) -> status()
    shows the replacement RUNNING and ready. No backoff (reset_after=0), no budget limit."""
    import ray

    sup = corral.Supervisor(target, workers=1, backend="ray", ready_when="ready",
                            heartbeat_timeout=10, standby=standby,
                            backoff=corral.Backoff(reset_after=0),
                            budget=corral.RestartBudget(max_restarts=None))
    out = []
    with sup:
        sup.wait_ready(timeout=60)
        for _ in range(rounds):
            old = sup.status()[0].pid
            if standby:  # the spare for this round made (not a figure of the round before)
                time.sleep(1.0)
            t0 = time.monotonic()
            if how == "sigkill":
                os.kill(old, signal.SIGKILL)
            else:
                monitor = sup._monitor
                assert monitor is not None
                ray.kill(monitor._live[old].actor)  # type: ignore[attr-defined]
            while True:
                s = sup.status()[0]
                if s.pid not in (None, old) and s.ready:
                    break
                if time.monotonic() - t0 > 30:
                    raise TimeoutError("no replacement after 30 s")
                time.sleep(0.002)
            out.append(time.monotonic() - t0)
    return out


def _square(x: int) -> int:
    return x * x


def _hang_after_marker(path: str) -> None:
    Path(path).write_text(str(os.getpid()))
    while True:
        time.sleep(60)


def _wait_marker(path: Path, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.001)
    return int(path.read_text())


def pool_rows(ray: Any, rounds: int, tmp: Path) -> dict[str, list[float]]:
    """ProcessPool(backend="ray"): round trips, death noticed, timeout noticed."""
    from corral.pool import TaskTimeout, WorkerLost

    out: dict[str, list[float]] = {"floor": [], "ray": [], "local": [], "lost": [],
                                   "timeout": []}

    @ray.remote
    class Echo:
        def square(self, x: int) -> int:
            return x * x

    echo = Echo.remote()
    ray.get(echo.square.remote(1))
    calls = max(50, rounds * 10)
    for _ in range(calls):
        t0 = time.monotonic()
        ray.get(echo.square.remote(3))
        out["floor"].append(time.monotonic() - t0)
    ray.kill(echo)
    for backend in ("local", "ray"):
        with corral.ProcessPool(1, backend=backend) as pool:
            pool.submit(_square, 1).result(timeout=60)  # the worker started
            for _ in range(calls):
                t0 = time.monotonic()
                pool.submit(_square, 3).result(timeout=60)
                out[backend].append(time.monotonic() - t0)
    with corral.ProcessPool(2, backend="ray") as pool:
        for i in range(rounds):
            marker = tmp / f"lost-{i}"
            fut = pool.submit(_hang_after_marker, str(marker))
            pid = _wait_marker(marker)
            # The replacements of the last round booted: no actor start competes for the CPU.
            deadline = time.monotonic() + 60
            while len(pool.worker_pids()) + len(pool.spare_pids()) < 3:
                if time.monotonic() > deadline:
                    raise TimeoutError("the pool did not get its workers back")
                time.sleep(0.005)
            t0 = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            try:
                fut.result(timeout=30)
            except WorkerLost:
                out["lost"].append(time.monotonic() - t0)
        for i in range(max(3, rounds // 4)):
            marker = tmp / f"timeout-{i}"
            fut = pool.submit_task(_hang_after_marker, (str(marker),), timeout=1.0)
            _wait_marker(marker)
            t0 = time.monotonic()
            try:
                fut.result(timeout=30)
            except TaskTimeout:
                out["timeout"].append(time.monotonic() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--cpus", type=int, default=4, help="num_cpus of the local cluster")
    opts = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # no log line per killed worker
    rounds = 5 if opts.quick else opts.rounds
    try:
        import ray
    except ImportError:
        print("Ray is not installed: pip install 'corral[ray]'", file=sys.stderr)
        raise SystemExit(2) from None
    from corral.ray import connect

    os.environ.pop("RAY_ADDRESS", None)
    t0 = time.monotonic()
    connect(num_cpus=opts.cpus, include_dashboard=False, logging_level="ERROR",
            log_to_driver=False)
    init = time.monotonic() - t0
    import tempfile

    try:
        base = floor(ray, rounds)
        rec = recovery(rounds, with_spare=False)
        spare = recovery(rounds, with_spare=True)
        sup_kill = supervisor(rounds, "sigkill", 0)
        sup_raykill = supervisor(rounds, "ray.kill", 0)
        sup_standby = supervisor(rounds, "sigkill", 1)
        with tempfile.TemporaryDirectory() as tmp:
            pool = pool_rows(ray, rounds, Path(tmp))
    finally:
        ray.shutdown()
    print(f"Ray {ray.__version__}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"local cluster of {opts.cpus} CPUs (ray.init {init:.2f}s), {rounds} rounds")
    base_med = statistics.median(base)
    print(f"{'':<44} {'median ms':>10} {'max ms':>9} {'vs floor':>9}")
    rows = [("floor: bare actor created -> first reply", base),
            ("SIGKILL -> on_exit (death detected)", rec["detect"]),
            ("SIGKILL -> replacement actor answered", rec["started"]),
            ("SIGKILL -> replacement ready (probe)", rec["ready"]),
            ("with a spare actor: SIGKILL -> ready", spare["ready"]),
            ("Supervisor: SIGKILL -> replacement ready", sup_kill),
            ("Supervisor: ray.kill -> replacement ready", sup_raykill),
            ("Supervisor standby=1: SIGKILL -> ready", sup_standby)]
    for name, values in rows:
        med = statistics.median(values)
        print(f"{name:<44} {med * 1e3:>10.1f} {max(values) * 1e3:>9.1f} "
              f"{med / base_med:>8.2f}x")
    print()
    floor_med = statistics.median(pool["floor"])
    print(f"{'ProcessPool(backend=ray)':<44} {'median ms':>10} {'max ms':>9} {'vs floor':>9}")
    rows = [("floor: bare actor method call round trip", pool["floor"]),
            ("pool task round trip, backend=ray", pool["ray"]),
            ("pool task round trip, backend=local", pool["local"]),
            ("SIGKILL of a busy worker -> WorkerLost", pool["lost"]),
            ("task start -> TaskTimeout (timeout=1 s)", pool["timeout"])]
    for name, values in rows:
        med = statistics.median(values)
        print(f"{name:<44} {med * 1e3:>10.2f} {max(values) * 1e3:>9.1f} "
              f"{med / floor_med:>8.2f}x  (n={len(values)})")


if __name__ == "__main__":
    main()
