"""Fork start-up as ``make bench`` measures it, repeated: fresh processes, corral and the floor
alternating.

``make bench`` runs each start-up row once, in a fresh process (``scenarios.py startup``, 3
starts, the first of them the program's first start) and reports the median. This script runs
that same job ``--rounds`` times, alternating corral and the floor, and prints each round's
medians, first starts and ratio, so one row's spread can be seen. (``startup_ab.py`` alternates
in one process instead: its floor then runs in a process that has run corral, which flatters
the ratio.)

    python benchmarks/startup_fresh.py --workers 8 --rounds 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SYSTEMS = ("corral", "floor")


def one(system: str, workers: int, reps: int) -> list[float]:
    """One ``scenarios.py startup`` job in a fresh process: its starts, in ms."""
    fd, result = tempfile.mkstemp(prefix="corral-startup-fresh-")
    os.close(fd)
    try:
        params = {"system": system, "workers": workers, "method": "fork", "reps": reps}
        subprocess.run([sys.executable, os.path.join(HERE, "scenarios.py"), "startup",
                        json.dumps(params), result], cwd=HERE, check=True,
                       stdin=subprocess.DEVNULL, timeout=120)
        with open(result) as f:
            return [s * 1e3 for s in json.load(f)[f"startup.fork.{workers}"]]
    finally:
        os.unlink(result)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3, help="starts per process (make bench: 3)")
    opts = ap.parse_args()
    medians: dict[str, list[float]] = {s: [] for s in SYSTEMS}
    firsts: dict[str, list[float]] = {s: [] for s in SYSTEMS}
    for _ in range(opts.rounds):
        for system in SYSTEMS:
            starts = one(system, opts.workers, opts.reps)
            medians[system].append(statistics.median(starts))
            firsts[system].append(starts[0])
    ratios = [c / f for c, f in zip(medians["corral"], medians["floor"], strict=True)]
    print(f"{opts.workers} workers, fork, {opts.rounds} rounds of {opts.reps} starts; "
          f"load average {os.getloadavg()}")
    for system in SYSTEMS:
        print(f"{system:7s} median of each round  " + " ".join(f"{x:5.1f}" for x in
                                                              medians[system]) + " ms")
        print(f"{system:7s} first start           " + " ".join(f"{x:5.1f}" for x in
                                                              firsts[system]) + " ms")
    print("ratio                          " + " ".join(f"{x:5.2f}" for x in ratios)
          + f"  (median {statistics.median(ratios):.2f}x; within 1.2x: "
          f"{sum(r <= 1.2 for r in ratios)} of {len(ratios)})")


if __name__ == "__main__":
    main()
