"""Fork start-up of a pool against the floor, interleaved over many repetitions.

``make bench`` takes the median of 3 starts per row, which on a shared 2-core machine moves by
20-30 % from run to run. This script alternates the variants (each a fresh pool: ``start()`` ->
every worker's first line) for ``--reps`` rounds in one process and prints medians and
quartiles, so two variants can be compared in the same conditions.

    python benchmarks/startup_ab.py --workers 8 --reps 30 floor corral no-template

Variants: ``floor`` (bare ``multiprocessing`` fork processes started in a loop), ``corral``,
``no-template`` (``CORRAL_START_TEMPLATE=0``: every worker forked by the spawner thread),
``chunk-N`` (the template's ``CHUNK_MIN`` set to N).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import select
import statistics
import struct
import tempfile
import time
from collections.abc import Callable

import corral
from corral import _template

REC = struct.Struct("=idd")  # index, monotonic time and process CPU at the first line


def _target(index: int, path: str) -> None:
    now, cpu = time.monotonic(), time.process_time()
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    os.write(fd, REC.pack(index, now, cpu))
    while True:
        time.sleep(3600)


class Probe:
    """A FIFO the workers write their first line's time (and CPU used so far) to."""

    def __init__(self) -> None:
        self.path = tempfile.mktemp(prefix="corral-startup-ab-")
        os.mkfifo(self.path)
        self.fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        self._keep = os.open(self.path, os.O_WRONLY)  # no EOF between rounds

    def first_lines(self, n: int, timeout: float = 30.0) -> dict[int, tuple[float, float]]:
        """{index: (monotonic time, process CPU)} of workers 0..n-1's first lines."""
        got: dict[int, tuple[float, float]] = {}
        buf = b""
        end = time.monotonic() + timeout
        while len(got) < n:
            if not select.select([self.fd], [], [], max(0.0, end - time.monotonic()))[0]:
                raise TimeoutError(f"{len(got)} of {n} workers reported")
            buf += os.read(self.fd, 65536)
            while len(buf) >= REC.size:
                i, t, cpu = REC.unpack_from(buf)
                buf = buf[REC.size:]
                got[i] = (t, cpu)
        return got

    def last_of(self, n: int, timeout: float = 30.0) -> float:
        """When the last of workers 0..n-1 ran its first line."""
        return max(t for t, _ in self.first_lines(n, timeout).values())

    def close(self) -> None:
        os.close(self.fd)
        os.close(self._keep)
        os.unlink(self.path)


def _floor(n: int, probe: Probe) -> float:
    ctx = multiprocessing.get_context("fork")
    procs = []
    t0 = time.monotonic()
    try:
        for i in range(n):
            proc = ctx.Process(target=_target, args=(i, probe.path))
            proc.start()
            procs.append(proc)
        return probe.last_of(n) - t0
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.join(10)


def _corral(n: int, probe: Probe, setup: Callable[[], Callable[[], None]] | None = None,
            ) -> float:
    undo = setup() if setup is not None else None
    try:
        sup = corral.Supervisor(_target, workers=n, start_method="fork",
                                args=lambda i: (probe.path,))
        t0 = time.monotonic()
        sup.start()
        try:
            return probe.last_of(n) - t0
        finally:
            sup.stop()
    finally:
        if undo is not None:
            undo()


def _no_template() -> Callable[[], None]:
    os.environ[_template.OFF_VARIABLE] = "0"

    def undo() -> None:
        os.environ.pop(_template.OFF_VARIABLE, None)
    return undo


def _chunk(k: int) -> Callable[[], Callable[[], None]]:
    def setup() -> Callable[[], None]:
        old = _template.CHUNK_MIN
        _template.CHUNK_MIN = k

        def undo() -> None:
            _template.CHUNK_MIN = old
        return undo
    return setup


def run(variant: str, n: int, probe: Probe) -> float:
    if variant == "floor":
        return _floor(n, probe)
    if variant == "corral":
        return _corral(n, probe)
    if variant == "no-template":
        return _corral(n, probe, _no_template)
    if variant.startswith("chunk-"):
        return _corral(n, probe, _chunk(int(variant.split("-", 1)[1])))
    raise SystemExit(f"unknown variant {variant!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--reps", type=int, default=30)
    opts = parser.parse_args()
    probe = Probe()
    try:
        for v in opts.variants:  # warm-up, not counted
            run(v, opts.workers, probe)
        samples: dict[str, list[float]] = {v: [] for v in opts.variants}
        for _ in range(opts.reps):
            for v in opts.variants:
                samples[v].append(run(v, opts.workers, probe) * 1e3)
                time.sleep(0.05)
    finally:
        probe.close()
    floor = statistics.median(samples["floor"]) if "floor" in samples else None
    print(f"{opts.workers} workers, fork, {opts.reps} rounds; load average {os.getloadavg()}")
    for v, xs in samples.items():
        med = statistics.median(xs)
        q1, _, q3 = statistics.quantiles(xs, n=4)
        ratio = f"  {med / floor:.2f}x the floor" if floor else ""
        print(f"{v:12} median {med:6.2f} ms  (q1 {q1:6.2f}, q3 {q3:6.2f}){ratio}")


if __name__ == "__main__":
    main()
