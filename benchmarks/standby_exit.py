"""SIGKILL of a worker holding a large heap -> the standby's first line of user code, with the
death watch (the standby goes in as the exit begins) and without it (it goes in once the pidfd
says the exit is over), alternating in one run.

    .venv/bin/python benchmarks/standby_exit.py [--method fork] [--mib 100] [--kills 8] [--runs 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import corral

FIFO_ENV = "CORRAL_BENCH_FIFO"


def heavy(index: int, mib: int) -> None:
    """Report when user code starts, then hold ``mib`` MiB of touched memory."""
    t0 = time.monotonic()
    ballast = bytearray(mib << 20)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    fd = os.open(os.environ[FIFO_ENV], os.O_WRONLY)
    os.write(fd, f"{index} {os.getpid()} {t0}\n".encode())
    os.close(fd)
    while True:
        time.sleep(1)


def one_run(method: str, mib: int, kills: int, watch: bool) -> list[float]:
    import corral._robust as robust

    robust._checked = None if watch else False  # off: as on a machine without the calls
    fifo = os.environ[FIFO_ENV]
    r = os.open(fifo, os.O_RDWR)
    out = []
    with os.fdopen(r, "r", buffering=1) as f, corral.Supervisor(
            heavy, workers=2, args=lambda i: (mib,), standby=1, start_method=method,
            backoff=corral.Backoff(reset_after=0.5)) as sup:
        seen: set[str] = set()
        while len(seen) < 2:
            seen.add(f.readline().split()[0])
        for _ in range(kills):
            deadline = time.monotonic() + 60
            while not any(s.standby and s.ready for s in sup.status()):
                if time.monotonic() > deadline:
                    raise RuntimeError("no ready standby within 60 s")
                time.sleep(0.05)
            time.sleep(0.6)  # past reset_after: the restart is at once
            victim = next(s.pid for s in sup.status() if s.index == 0)
            t0 = time.monotonic()
            os.kill(victim, 9)  # type: ignore[arg-type]
            while True:
                index, pid, started = f.readline().split()
                if index == "0" and int(pid) != victim:
                    break
            out.append((float(started) - t0) * 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="fork")
    ap.add_argument("--mib", type=int, default=100)
    ap.add_argument("--kills", type=int, default=8)
    ap.add_argument("--runs", type=int, default=2)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        os.environ[FIFO_ENV] = fifo = os.path.join(d, "fifo")
        os.mkfifo(fifo)
        got: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(a.runs):
            for watch in (True, False):
                got[watch] += one_run(a.method, a.mib, a.kills, watch)
    print(f"{a.method}, a {a.mib} MiB worker, {len(got[True])} kills each, load "
          f"{os.getloadavg()[0]:.2f}")
    for watch in (True, False):
        v = sorted(got[watch])
        print(f"  death watch {'on ' if watch else 'off'}: SIGKILL -> standby's first line "
              f"median {statistics.median(v):.2f} ms, min {v[0]:.2f}, max {v[-1]:.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
