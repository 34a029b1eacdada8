"""For test_start_template.py: a fork pool started with its fd limit nearly full (run alone,
in a fresh interpreter: argv = outdir, workers, fds left free)."""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time

import corral
from corral import _template

LIMIT = 256


def target(index: int, out: str) -> None:
    fds = len(os.listdir("/proc/self/fd"))
    with open(f"{out}/w{index}.json", "w") as fh:
        fh.write(json.dumps({"pid": os.getpid(), "fds": fds}))
    while True:
        time.sleep(1)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    out, n, room = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    _template.CHUNK_MIN = 10_000  # one forker: one group of n - 1 workers' pipes
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))
    filler = [os.open(os.devnull, os.O_RDONLY)
              for _ in range(LIMIT - len(os.listdir("/proc/self/fd")) - room)]
    sup = corral.Supervisor(target, workers=n, start_method="fork", args=lambda i: (out,))
    sup.start()
    deadline = time.monotonic() + 20
    # Every worker booted, and the supervisor has taken them in (a worker can write its file
    # before the supervisor has its pid: the template reports the batch after its forks).
    while time.monotonic() < deadline and (len(os.listdir(out)) < n or len(sup.pids()) < n):
        time.sleep(0.02)
    print(json.dumps(sorted(sup.pids())), flush=True)
    sup.stop()
    for fd in filler:
        os.close(fd)


if __name__ == "__main__":
    main()
