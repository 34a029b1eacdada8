"""Where a fork start-up's CPU goes: corral against the floor, each start in a fresh process.

For each start (``start()`` -> every worker's first line) it reports the wall time, the CPU the
starting process used meanwhile (all its threads: ``RUSAGE_SELF``), and the CPU each worker had
used by its first line (its ``process_time``; under corral that includes the start template's
forks of the others). On 2 cores the start is bound by that total: ``busy`` is the share of
the two cores it kept busy. Like ``make bench`` it runs ``--starts`` starts per fresh process
and counts all but the first (the program's first start pays for imports and the keeper).

    benchmarks/.venv-bench/bin/python benchmarks/startup_cpu.py --workers 8 --processes 6
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

from startup_ab import Probe, _target

import corral

SYSTEMS = ("corral", "floor")


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def child(system: str, n: int, starts: int) -> list[dict[str, float]]:
    """In a fresh process: ``starts`` starts of ``system``, one record each."""
    probe = Probe()
    out = []
    try:
        for _ in range(starts):
            procs: list[Any] = []
            sup = None
            cpu0, t0 = _cpu(), time.monotonic()
            try:
                if system == "floor":
                    ctx = multiprocessing.get_context("fork")
                    for i in range(n):
                        proc = ctx.Process(target=_target, args=(i, probe.path))
                        proc.start()
                        procs.append(proc)
                else:
                    sup = corral.Supervisor(_target, workers=n, start_method="fork",
                                            args=lambda i: (probe.path,))
                    sup.start()
                got = probe.first_lines(n)
                wall = max(t for t, _ in got.values()) - t0
                parent = _cpu() - cpu0
                workers = sum(c for _, c in got.values())
                out.append({"wall": wall * 1e3, "parent": parent * 1e3,
                            "workers": workers * 1e3})
            finally:
                for proc in procs:
                    proc.kill()
                    proc.join(10)
                if sup is not None:
                    sup.stop()
    finally:
        probe.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--processes", type=int, default=6, help="fresh processes per system")
    ap.add_argument("--starts", type=int, default=3, help="starts per process (make bench: 3)")
    ap.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.child:
        print(json.dumps(child(opts.child, opts.workers, opts.starts)))
        return
    rows: dict[str, list[dict[str, float]]] = {s: [] for s in SYSTEMS}
    for _ in range(opts.processes):
        for system in SYSTEMS:  # alternating, so both see the same conditions
            res = subprocess.run(
                [sys.executable, __file__, "--child", system, "--workers", str(opts.workers),
                 "--starts", str(opts.starts)], capture_output=True, text=True, timeout=120)
            if res.returncode != 0:
                raise SystemExit(f"the {system} process failed (exit status {res.returncode}):\n"
                                 f"{res.stderr}")
            rows[system] += json.loads(res.stdout)[1:]
    print(f"{opts.workers} fork workers, {opts.processes} fresh processes of {opts.starts} starts "
          f"each (the first not counted); load average {os.getloadavg()}")
    med: dict[str, dict[str, float]] = {}
    for system, recs in rows.items():
        m = {k: statistics.median(r[k] for r in recs) for k in ("wall", "parent", "workers")}
        m["total"] = statistics.median(r["parent"] + r["workers"] for r in recs)
        m["busy"] = statistics.median((r["parent"] + r["workers"]) / (2 * r["wall"])
                                      for r in recs)
        med[system] = m
        print(f"{system:7s} wall {m['wall']:6.2f} ms  CPU: starting process {m['parent']:5.2f} "
              f"+ workers {m['workers']:5.2f} = {m['total']:5.2f} ms  (2 cores {m['busy']:.0%} "
              f"busy; medians of {len(recs)} starts)")
    c, f = med["corral"], med["floor"]
    print(f"corral/floor: wall {c['wall'] / f['wall']:.2f}x, CPU {c['total'] / f['total']:.2f}x")


if __name__ == "__main__":
    main()
