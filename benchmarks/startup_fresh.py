"""Fork start-up as ``make bench`` measures it, repeated: fresh processes, corral and the floor
alternating.

``make bench`` runs each start-up row once, in a fresh process (``scenarios.py startup``, 3
starts, the first of them the program's first start) and reports the median. This script runs
that same job ``--rounds`` times through the bench's own job runner (``run.run_job``: the same
environment, strays swept), alternating corral and the floor, and prints each round's medians,
first starts and ratio, so one row's spread can be seen. (``startup_ab.py`` alternates in one
process instead: its floor then runs in a process that has run corral, which flatters the
ratio.) Run it with the bench's Python:

    benchmarks/.venv-bench/bin/python benchmarks/startup_fresh.py --workers 8 --rounds 8

With ``--original`` each round also runs the original (Duck's ``WorkerProcessManager``), as
the bench's row does. With ``--old <an older checkout>/src`` each round also runs corral from
that source (through ``PYTHONPATH``, ahead of the installed one), the two orders alternating:
old against new in the same conditions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import run


def one(system: str, workers: int, reps: int, tmp: str, old: str | None = None) -> list[float]:
    """One ``scenarios.py startup`` job in a fresh process: its starts, in ms (``old``: corral
    imported from that source directory)."""
    job = run.Job("startup", system,
                  {"system": system, "workers": workers, "method": "fork", "reps": reps},
                  timeout=120.0, title=f"start-up: {system}, {workers} workers, fork")
    env = run.job_env()
    if old is not None:
        env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], old])
    run.run_job(job, env, tmp, time.monotonic() + 3600)
    if job.error is not None:
        raise RuntimeError(f"{job.title}: {job.error}")
    return [s * 1e3 for s in job.result[f"startup.fork.{workers}"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3, help="starts per process (make bench: 3)")
    ap.add_argument("--original", action="store_true",
                    help="also run the original (Duck's WorkerProcessManager) each round")
    ap.add_argument("--old", metavar="SRC", help="also run corral imported from SRC (the src "
                    "directory of an older checkout), alternating with the current one")
    opts = ap.parse_args()
    run.set_subreaper()
    variants = ["corral", "old", "floor"] if opts.old else ["corral", "floor"]
    if opts.original:
        variants.insert(-1, "original")
    medians: dict[str, list[float]] = {v: [] for v in variants}
    firsts: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="corral-startup-fresh-") as tmp:
        for k in range(opts.rounds):
            order = list(variants)
            if k % 2 and opts.old:  # the two corrals in turn first
                order[:2] = ["old", "corral"]
            for v in order:
                starts = one("corral" if v == "old" else v, opts.workers, opts.reps,
                             tmp, opts.old if v == "old" else None)
                medians[v].append(statistics.median(starts))
                firsts[v].append(starts[0])
    print(f"{opts.workers} workers, fork, {opts.rounds} rounds of {opts.reps} starts; "
          f"load average {os.getloadavg()}")
    for v in variants:
        for label, values in (("median of each round", medians[v]),
                              ("first start", firsts[v])):
            print(f"{v:7s} {label:22s} " + " ".join(f"{x:5.1f}" for x in values) + " ms")
    floor = statistics.median(medians["floor"])
    for v in variants[:-1]:
        ratios = [c / f for c, f in zip(medians[v], medians["floor"], strict=True)]
        print(f"{v + ' ratio':30s} " + " ".join(f"{x:5.2f}" for x in ratios)
              + f"  (median {statistics.median(ratios):.3f}x; within 1.2x: "
              f"{sum(r <= 1.2 for r in ratios)} of {len(ratios)})")
        print(f"{v:7s} median of the rounds {statistics.median(medians[v]):.2f} ms, "
              f"{statistics.median(medians[v]) / floor:.3f}x the floor's {floor:.2f} ms")


if __name__ == "__main__":
    main()
