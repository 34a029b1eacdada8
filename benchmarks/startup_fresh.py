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
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import run

SYSTEMS = ("corral", "floor")


def one(system: str, workers: int, reps: int, tmp: str) -> list[float]:
    """One ``scenarios.py startup`` job in a fresh process: its starts, in ms."""
    job = run.Job("startup", system,
                  {"system": system, "workers": workers, "method": "fork", "reps": reps},
                  timeout=120.0, title=f"start-up: {system}, {workers} workers, fork")
    run.run_job(job, run.job_env(), tmp, time.monotonic() + 3600)
    if job.error is not None:
        raise RuntimeError(f"{job.title}: {job.error}")
    return [s * 1e3 for s in job.result[f"startup.fork.{workers}"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3, help="starts per process (make bench: 3)")
    opts = ap.parse_args()
    run.set_subreaper()
    medians: dict[str, list[float]] = {s: [] for s in SYSTEMS}
    firsts: dict[str, list[float]] = {s: [] for s in SYSTEMS}
    with tempfile.TemporaryDirectory(prefix="corral-startup-fresh-") as tmp:
        for _ in range(opts.rounds):
            for system in SYSTEMS:
                starts = one(system, opts.workers, opts.reps, tmp)
                medians[system].append(statistics.median(starts))
                firsts[system].append(starts[0])
    ratios = [c / f for c, f in zip(medians["corral"], medians["floor"], strict=True)]
    print(f"{opts.workers} workers, fork, {opts.rounds} rounds of {opts.reps} starts; "
          f"load average {os.getloadavg()}")
    for system in SYSTEMS:
        for label, values in (("median of each round", medians[system]),
                              ("first start", firsts[system])):
            print(f"{system:7s} {label:22s} " + " ".join(f"{x:5.1f}" for x in values) + " ms")
    print(f"{'ratio':30s} " + " ".join(f"{x:5.2f}" for x in ratios)
          + f"  (median {statistics.median(ratios):.2f}x; within 1.2x: "
          f"{sum(r <= 1.2 for r in ratios)} of {len(ratios)})")


if __name__ == "__main__":
    main()
