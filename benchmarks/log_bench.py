#!/usr/bin/env python3
"""Log capture throughput: N real child processes write numbered lines to pipes at a fixed rate;
corral's LogHub reads them on one event loop (no threads) into its sinks and rings.

    .venv/bin/python benchmarks/log_bench.py [--workers 4] [--rate 10000] [--seconds 5]
                                             [--sinks all|console|json|file|none]
                                             [--through-corral]

It checks that every line arrived exactly once and in order (per worker), and reports the
lines/s achieved and the reader's CPU (user+system of this process, which does nothing but run
the loop) per 10,000 lines. The floor, measured in the same run with the same children: a bare
loop that reads the pipes and counts newlines. ``--rate 0`` writes as fast as possible.

``--through-corral`` measures the whole program instead: ``corral run -n WORKERS -- python -c
CHILD`` with its default console sink (prefixes, timestamps) on a pipe this script reads and
verifies; the CPU is corral's own process (every thread), from its first line to the last.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the selectors-based test loop
sys.path.insert(0, str(HERE.parent / "src"))

from corral._logs import ConsoleSink, FileSink, JsonLinesSink, LogHub, LogRecord  # noqa: E402
from selector_loop import SelectorLoop  # noqa: E402

# A child: `rate` lines/s (0 = flat out) for `seconds`, written in 2 ms slices.
CHILD = r"""
import os, sys, time
idx = int(os.environ["CORRAL_INDEX"]) if sys.argv[1] == "-" else int(sys.argv[1])
rate, seconds = int(sys.argv[2]), float(sys.argv[3])
pad = b"x" * 48
out = os.fdopen(1, "wb", buffering=1 << 16)
start = time.monotonic()
n = 0
total = int(rate * seconds) if rate else None
while True:
    now = time.monotonic() - start
    if rate:
        due = min(total, int(now * rate) + 1)
    else:
        due = n + 500
        if now >= seconds:
            break
    if n >= due and rate:
        if n >= total:
            break
        time.sleep(0.002)
        continue
    out.write(b"".join(b"w%d %d %s\n" % (idx, i, pad) for i in range(n, due)))
    out.flush()
    n = due
out.close()
"""


class Verifier:
    """A sink that checks each worker's sequence: no loss, no duplicate, no reordering."""

    programs = None

    def __init__(self, workers: int) -> None:
        self.next = [0] * workers
        self.errors = 0
        self.lines = 0

    def bind(self, on_congestion: object) -> None:
        pass

    def emit(self, records: Sequence[LogRecord]) -> None:
        nxt = self.next
        for rec in records:
            seq = int(rec.text.split(b" ", 2)[1])
            if seq != nxt[rec.index]:
                self.errors += 1
            nxt[rec.index] = seq + 1
        self.lines += len(records)

    def close(self) -> None:
        pass


def spawn(workers: int, rate: int, seconds: float) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-c", CHILD, str(i), str(rate), str(seconds)],
                             stdout=subprocess.PIPE) for i in range(workers)]


def cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def run_corral(args: argparse.Namespace, tmp: str) -> dict[str, float]:
    loop = SelectorLoop()
    devnull = os.open(os.devnull, os.O_WRONLY)
    verifier = Verifier(args.workers)
    sinks: list[object] = [verifier]
    kinds = {"all": ["console", "json", "file"], "none": []}.get(args.sinks, [args.sinks])
    if "console" in kinds:
        sinks.append(ConsoleSink(loop, devnull, timestamps=True))
    if "json" in kinds:
        sinks.append(JsonLinesSink(loop, devnull))
    if "file" in kinds:
        sinks.append(FileSink(os.path.join(tmp, "bench.log"), loop, max_bytes=8 << 20,
                              backups=2))
    hub = LogHub(loop, sinks)  # type: ignore[arg-type]
    children = spawn(args.workers, args.rate, args.seconds)
    eofs = []
    c0, t0 = cpu(), time.monotonic()
    for i, child in enumerate(children):
        fd = os.dup(child.stdout.fileno())  # type: ignore[union-attr]
        child.stdout.close()  # type: ignore[union-attr]
        hub.attach(fd, "w", i, child.pid, "stdout", on_eof=lambda: eofs.append(1))
    loop.run_until(lambda: len(eofs) == args.workers, timeout=args.seconds * 10 + 30,
                   what="EOF from every child")
    c1, t1 = cpu(), time.monotonic()
    for child in children:
        child.wait()
    hub.close()
    os.close(devnull)
    loop.close()
    expected = sum(verifier.next) if not args.rate else int(args.rate * args.seconds) * args.workers
    return {"lines": verifier.lines, "expected": expected,
            "lost": expected - verifier.lines, "order_errors": verifier.errors,
            "wall": t1 - t0, "cpu": c1 - c0}


def run_floor(args: argparse.Namespace) -> dict[str, float]:
    """The floor: read the same pipes on the same kind of loop and count newlines."""
    loop = SelectorLoop()
    children = spawn(args.workers, args.rate, args.seconds)
    counts = [0] * args.workers
    open_fds = set()
    c0, t0 = cpu(), time.monotonic()
    for i, child in enumerate(children):
        fd = os.dup(child.stdout.fileno())  # type: ignore[union-attr]
        child.stdout.close()  # type: ignore[union-attr]
        os.set_blocking(fd, False)
        open_fds.add(fd)

        def on_read(fd: int = fd, i: int = i) -> None:
            data = os.read(fd, 65536)
            if data:
                counts[i] += data.count(b"\n")
            else:
                loop.remove_reader(fd)
                os.close(fd)
                open_fds.discard(fd)

        loop.add_reader(fd, on_read)
    loop.run_until(lambda: not open_fds, timeout=args.seconds * 10 + 30, what="floor EOFs")
    c1, t1 = cpu(), time.monotonic()
    for child in children:
        child.wait()
    loop.close()
    return {"lines": sum(counts), "wall": t1 - t0, "cpu": c1 - c0}


def run_through_corral(workers: int, rate: int, seconds: float, tmp: str,
                       python: str = sys.executable) -> dict[str, float]:
    """``corral run -n WORKERS`` of the CHILD writer, its console read from a pipe here: every
    line verified (per worker: no loss, no duplicate, in order), corral's CPU per line."""
    import select
    import signal

    from probe import process_cpu  # the bench's exact per-process CPU clock

    sock_dir = os.path.join(tmp, "corral-sock")
    os.makedirs(sock_dir, mode=0o700, exist_ok=True)
    argv = [python, "-c", "from corral.cli.main import main; main()", "--socket",
            os.path.join(sock_dir, "c.sock"), "run", "-n", str(workers), "--name", "w",
            "--restart", "never", "--", python, "-c", CHILD, "-", str(rate), str(seconds)]
    with open(os.path.join(tmp, "corral-stderr.txt"), "wb") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    expected = int(rate * seconds)
    nxt = [0] * workers
    errors = lines = 0
    buf = b""
    c0 = t0 = None
    deadline = time.monotonic() + seconds * 10 + 60
    try:
        while min(nxt) < expected and time.monotonic() < deadline:
            if not select.select([fd], [], [], 1.0)[0]:
                continue
            data = os.read(fd, 1 << 20)
            if not data:
                break
            if c0 is None:
                c0, t0 = process_cpu(proc.pid), time.monotonic()
            buf += data
            *done, buf = buf.split(b"\n")
            for raw in done:
                # "HH:MM:SS.mmm w.3 |  w3 1234 xxx..."
                _, sep, text = raw.partition(b" |  w")
                if not sep:
                    continue
                idx, seq, _ = text.split(b" ", 2)
                i = int(idx)
                if int(seq) != nxt[i]:
                    errors += 1
                nxt[i] = int(seq) + 1
                lines += 1
        c1, t1 = process_cpu(proc.pid), time.monotonic()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        proc.stdout.close()
    cpu_used = (c1 or 0.0) - (c0 or 0.0)
    return {"lines": lines, "expected": expected * workers, "lost": expected * workers - lines,
            "order_errors": errors, "wall": t1 - (t0 or t1), "cpu": cpu_used}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--rate", type=int, default=10_000, help="lines/s per worker; 0 = max")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--sinks", default="all", choices=["all", "console", "json", "file", "none"])
    ap.add_argument("--through-corral", action="store_true",
                    help="measure `corral run -n WORKERS` itself (console sink)")
    args = ap.parse_args()
    if args.through_corral:
        if not args.rate:
            ap.error("--through-corral needs a --rate > 0")
        with tempfile.TemporaryDirectory() as tmp:
            res = run_through_corral(args.workers, args.rate, args.seconds, tmp)
        per10k = res["cpu"] / max(res["lines"], 1) * 10_000
        print(f"log_bench through corral run: {args.workers} workers x {args.rate}/s lines "
              f"for {args.seconds:g}s, console sink on a pipe")
        print(f"  lines {res['lines']:,} of {res['expected']:,}  lost {res['lost']}  "
              f"out-of-order {res['order_errors']}  "
              f"{res['lines'] / max(res['wall'], 1e-9):,.0f} lines/s  "
              f"corral CPU {per10k * 1000:.1f} ms per 10k lines")
        sys.exit(1 if res["lost"] or res["order_errors"] else 0)
    with tempfile.TemporaryDirectory() as tmp:
        floor = run_floor(args)
        res = run_corral(args, tmp)
    per10k = res["cpu"] / max(res["lines"], 1) * 10_000
    floor10k = floor["cpu"] / max(floor["lines"], 1) * 10_000
    rate = "max" if not args.rate else f"{args.rate}/s"
    print(f"log_bench: {args.workers} workers x {rate} lines for {args.seconds:g}s, "
          f"sinks={args.sinks} (ring + verifier always)")
    print(f"  corral  lines {res['lines']:>9,} of {res['expected']:,}  lost {res['lost']}  "
          f"out-of-order {res['order_errors']}  {res['lines'] / res['wall']:>10,.0f} lines/s  "
          f"CPU {per10k * 1000:6.1f} ms per 10k lines")
    print(f"  floor   lines {floor['lines']:>9,}{'':>26}  "
          f"{floor['lines'] / floor['wall']:>10,.0f} lines/s  "
          f"CPU {floor10k * 1000:6.1f} ms per 10k lines")
    print(f"  ratio   corral CPU / floor CPU per line: {per10k / max(floor10k, 1e-9):.1f}x")
    if res["lost"] or res["order_errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
