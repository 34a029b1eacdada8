"""corral.ProcessPool against concurrent.futures.ProcessPoolExecutor, loky and pebble.

Three figures, side by side in one run:

1. throughput of 10,000 tiny tasks (submit each, wait for all);
2. throughput of 200 tasks of 10 ms of CPU each;
3. from a worker SIGKILL to the next task completing (one worker), next to the floor: the time
   to start a bare worker process and hear from it. corral's default warm spare is let boot
   before each kill (its steady state); the "no spare" rows put the replacement's start on the
   path, each in a fresh process whose pool starts the forkserver (and so sets its preload).

loky and pebble are optional (``pip install loky pebble`` into a scratch venv). corral is taken
from ``src/`` beside this file; install it into that venv too (``pip install -e .``): CPython's
forkserver (3.11 to 3.13) does not get the parent's ``sys.path``, so it can preload only an
installed corral. Run::

    python benchmarks/pool_bench.py [--quick] [--workers N]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import BrokenExecutor, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from corral.pool import ProcessPool, WorkerLost

# Imported in main() only: under forkserver and spawn every worker re-runs this script's
# top-level imports, and the peers' modules would be charged to every pool's worker starts.
loky: Any = None
pebble: Any = None


def _import_peers() -> None:
    global loky, pebble
    try:
        import loky
    except ImportError:
        loky = None
    try:
        import pebble
    except ImportError:
        pebble = None


# ----------------------------------------------------------------------------- the tasks


def tiny(x: int) -> int:
    return x


def spin(seconds: float) -> int:
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += 1
    return n


def getpid() -> int:
    return os.getpid()


def block(path: str) -> None:
    Path(path).write_text(str(os.getpid()))
    time.sleep(120)


def _reply(conn: Any) -> None:
    conn.send_bytes(b"x")


# -------------------------------------------------------------------------------- the peers

Submit = Callable[..., Future[Any]]


class Peer:
    """How to make, feed and stop one kind of pool."""

    def __init__(self, name: str, make: Callable[[int], Any], submit: Submit,
                 stop: Callable[[Any], None], start_method: str) -> None:
        self.name, self.make, self.submit, self.stop = name, make, submit, stop
        self.start_method = start_method


def _executor_submit(ex: Any, fn: Callable[..., Any], *args: Any) -> Future[Any]:
    return ex.submit(fn, *args)  # type: ignore[no-any-return]


def _pebble_submit(pool: Any, fn: Callable[..., Any], *args: Any) -> Future[Any]:
    return pool.schedule(fn, args=args)  # type: ignore[no-any-return]


def _pebble_stop(pool: Any) -> None:
    pool.close()
    pool.join()


def peers() -> list[Peer]:
    out = []
    for sm in ("forkserver", "fork"):
        out.append(Peer(f"corral {sm}", lambda n, sm=sm: ProcessPool(n, start_method=sm),
                        _executor_submit, lambda ex: ex.shutdown(), sm))
    for sm in ("fork", "forkserver"):
        out.append(Peer(
            f"ProcessPoolExecutor {sm}",
            lambda n, sm=sm: ProcessPoolExecutor(n, mp_context=multiprocessing.get_context(sm)),
            _executor_submit, lambda ex: ex.shutdown(), sm))
    if loky is not None:
        out.append(Peer("loky (loky)", lambda n: loky.ProcessPoolExecutor(n),
                        _executor_submit, lambda ex: ex.shutdown(), "loky"))
    if pebble is not None:
        for sm in ("fork", "forkserver"):
            out.append(Peer(
                f"pebble {sm}",
                lambda n, sm=sm: pebble.ProcessPool(n, context=multiprocessing.get_context(sm)),
                _pebble_submit, _pebble_stop, sm))
    return out


# ------------------------------------------------------------------------------ throughput


def _worker_records(pool: Any) -> list[Any] | None:
    """corral's worker records (this tree's layout or the one before corral.pool was split)."""
    core = getattr(pool, "_core", None)
    if core is not None:
        return list(getattr(core, "_workers", {}).values())
    manager = getattr(getattr(pool, "_runner", None), "manager", None)
    if manager is not None:
        return list(manager._roster.workers.values())
    return None


def _settle_spares(pool: Any, timeout: float = 10.0) -> None:
    """Measure corral in its steady state: wait until its warm spare has booted (idle), so its
    start-up is not charged to the figure (other pools have no spare to start)."""
    if not hasattr(pool, "spare_pids"):
        return
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        records = _worker_records(pool)
        if records is None:
            return
        spares = [w for w in records if w.spare and w.proc is not None]
        if len(spares) >= pool._cfg.spare_workers and all(
                getattr(w.state, "value", w.state) == "idle" for w in spares):
            return
        time.sleep(0.005)


def throughput(peer: Peer, workers: int, n: int, fn: Callable[..., Any], arg: Any) -> float:
    pool = peer.make(workers)
    try:
        wait([peer.submit(pool, tiny, i) for i in range(workers * 4)])  # every worker up
        _settle_spares(pool)
        t0 = time.perf_counter()
        futures = [peer.submit(pool, fn, arg) for _ in range(n)]
        for f in futures:
            f.result()
        return n / (time.perf_counter() - t0)
    finally:
        peer.stop(pool)


# -------------------------------------------------------------------------------- recovery


def _wait_file(path: Path, timeout: float = 30) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and path.read_text():
            return int(path.read_text())
        time.sleep(0.001)
    raise TimeoutError(f"{path} never appeared")


def recovery(peer: Peer, reps: int) -> tuple[list[float], str]:
    """Seconds from SIGKILL of the only worker (busy) to the next task's result."""
    tmp = Path(tempfile.mkdtemp(prefix="pool-bench-"))
    times: list[float] = []
    note = ""
    pool = peer.make(1)
    try:
        peer.submit(pool, tiny, 0).result()
        for rep in range(reps):
            marker = tmp / f"busy-{rep}"
            busy = peer.submit(pool, block, str(marker))
            pid = _wait_file(marker)
            # The steady state: a warm spare that has booted. (Killed sooner, the next task
            # waits for the spare that replaced the last one to boot: a start, measured by
            # the "no spare" rows.)
            _settle_spares(pool)
            t0 = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            try:
                peer.submit(pool, tiny, 1).result(timeout=60)
            except BrokenExecutor as exc:
                # The pool is broken for good: every pending future failed. What is left is to
                # build a new pool, so that is what the figure measures.
                note = f"breaks ({type(exc).__name__}); figure = build a new pool + 1 task"
                peer.stop(pool)
                pool = peer.make(1)
                peer.submit(pool, tiny, 1).result(timeout=60)
            times.append(time.perf_counter() - t0)
            try:
                busy.result(timeout=60)
            except WorkerLost:
                pass
            except Exception as exc:  # every peer's way of saying "your worker died"
                note = note or f"the busy task fails with {type(exc).__name__}"
        return times, note
    finally:
        try:
            peer.stop(pool)
        except Exception:
            pass


def loky_recovery(reps: int) -> tuple[list[float], str]:
    """loky's own answer to a broken pool: get_reusable_executor() makes a new one."""
    assert loky is not None
    tmp = Path(tempfile.mkdtemp(prefix="pool-bench-"))
    times = []
    ex = loky.get_reusable_executor(max_workers=1)
    ex.submit(tiny, 0).result()
    for rep in range(reps):
        marker = tmp / f"busy-{rep}"
        loky.get_reusable_executor(max_workers=1).submit(block, str(marker))
        pid = _wait_file(marker)
        t0 = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        while True:
            try:
                loky.get_reusable_executor(max_workers=1).submit(tiny, 1).result(timeout=60)
                break
            except Exception:
                continue  # broken (TerminatedWorkerError): the next call builds a new one
        times.append(time.perf_counter() - t0)
    loky.get_reusable_executor(max_workers=1).shutdown()
    return times, "executor breaks; get_reusable_executor() builds a new one"


def start_floor(start_method: str, reps: int) -> float:
    """Median seconds from Process.start() to a first message from a bare child."""
    ctx = multiprocessing.get_context(start_method)
    samples = []
    for _ in range(reps + 1):  # the first one may start the forkserver
        ours, theirs = multiprocessing.Pipe()
        t0 = time.perf_counter()
        proc = ctx.Process(target=_reply, args=(theirs,))  # type: ignore[attr-defined]
        proc.start()
        ours.recv_bytes()
        samples.append(time.perf_counter() - t0)
        proc.join()
        ours.close()
        theirs.close()
    return statistics.median(samples[1:])


# ------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer tasks and repetitions")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--reps", type=int, default=3, help="repetitions (median is shown)")
    parser.add_argument("--no-spare-recovery", metavar="START_METHOD",
                        help="(internal) print the recovery times of a spare-less pool as JSON")
    opts = parser.parse_args()
    if opts.no_spare_recovery:
        sm = opts.no_spare_recovery
        peer = Peer("corral", lambda n: ProcessPool(n, start_method=sm, spare_workers=0),
                    _executor_submit, lambda ex: ex.shutdown(), sm)
        print(json.dumps(recovery(peer, opts.reps)[0]))
        return
    _import_peers()
    n_tiny, n_ten, reps = (2000, 50, 1) if opts.quick else (10_000, 200, opts.reps)
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {opts.workers} workers, "
          f"median of {reps}; loky {'yes' if loky else 'missing'}, "
          f"pebble {'yes' if pebble else 'missing'}\n")
    all_peers = peers()

    # The floor first, in a process that has no pool (threads, children) yet.
    rec_reps = 3 if opts.quick else 7
    floors = {sm: start_floor(sm, rec_reps) for sm in ("fork", "forkserver", "spawn")}

    rows: dict[str, dict[str, float]] = {}
    for peer in all_peers:
        tiny_rate = statistics.median(
            throughput(peer, opts.workers, n_tiny, tiny, 1) for _ in range(reps))
        ten_rate = statistics.median(
            throughput(peer, opts.workers, n_ten, spin, 0.01) for _ in range(reps))
        rows[peer.name] = {"tiny": tiny_rate, "ten": ten_rate}
        print(f"  measured {peer.name}", file=sys.stderr)
    ref = rows["ProcessPoolExecutor fork"]
    print(f"{'throughput':<28} {f'{n_tiny} tiny tasks/s':>20} {'vs PPE fork':>12} "
          f"{f'{n_ten} x 10 ms tasks/s':>22} {'vs PPE fork':>12}")
    for name, row in rows.items():
        print(f"{name:<28} {row['tiny']:>20,.0f} {row['tiny'] / ref['tiny']:>11.2f}x "
              f"{row['ten']:>22,.1f} {row['ten'] / ref['ten']:>11.2f}x")
    print(f"(10 ms tasks on {opts.workers} workers: at most "
          f"{opts.workers / 0.01:,.0f} tasks/s)\n")

    print(f"{'SIGKILL -> next task done (1 worker)':<32} {'median ms':>10} {'max ms':>9}  note")
    for peer in all_peers:
        if peer.name.startswith("loky"):
            times, note = loky_recovery(rec_reps)
        else:
            times, note = recovery(peer, rec_reps)
        floor = floors.get(peer.start_method)
        vs = (f"{statistics.median(times) / floor:.1f}x the {peer.start_method} start floor"
              if floor and peer.name.startswith("corral") else "")
        print(f"{peer.name:<32} {statistics.median(times) * 1e3:>10.1f} "
              f"{max(times) * 1e3:>9.1f}  {'; '.join(x for x in (note, vs) if x)}")
    # Without a warm spare the replacement's start is on the path: what a forkserver preload of
    # corral (and of the task's module) shortens. Each in a fresh process whose pool is the
    # first user of the forkserver, as in a program that makes its pool at start-up (the
    # forkserver is one per process and takes its preload list when it starts).
    for sm in ("forkserver", "fork"):
        out = subprocess.run([sys.executable, __file__, "--no-spare-recovery", sm,
                              "--reps", str(rec_reps)], capture_output=True, text=True,
                             check=True).stdout
        times = json.loads(out.strip().splitlines()[-1])
        floor = floors[sm]
        print(f"{f'corral {sm}, no spare':<32} {statistics.median(times) * 1e3:>10.1f} "
              f"{max(times) * 1e3:>9.1f}  {statistics.median(times) / floor:.1f}x the {sm} "
              "start floor")
    print("\nstart floor: Process.start() of a bare worker to its first message, median: "
          + ", ".join(f"{sm} {t * 1e3:.1f} ms" for sm, t in floors.items())
          + ".\nUnder forkserver and spawn every child re-runs this script's imports (CPython's "
          "forkserver does not preload __main__), in the floor as in every pool.")


if __name__ == "__main__":
    main()
