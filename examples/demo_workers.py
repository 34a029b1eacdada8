"""Worker functions for examples/demo.py.

They live in their own module because the demo's pool uses the forkserver start method, where a
worker receives its target by reference (pickled as ``module.function``) and must import it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import corral

# One role per worker index; the role is also the worker's name.
ROLES = ("crasher", "victim", "crash-loop", "steady")
CRASH_AFTER = 2.0  # seconds the crasher runs before its (only) crash
BOOT_TIME = 0.3  # stands in for loading a model or opening sockets


def worker_name(index: int) -> str:
    return ROLES[index]


def worker_args(marker_dir: str, index: int) -> tuple[str, str]:
    """``args(index)`` for the pool (bound to ``marker_dir`` with functools.partial)."""
    return (ROLES[index], marker_dir)


def work(index: int, role: str, marker_dir: str) -> None:
    """The demo worker: ``role`` decides how it behaves (and misbehaves)."""
    if role == "crash-loop":
        # Dies the moment it starts, every time: think of a missing config file.
        sys.exit(3)
    corral.set_status("booting")
    time.sleep(BOOT_TIME)
    if role == "victim":
        # A grandchild of the supervisor: it must not outlive its worker.
        subprocess.Popen(["sleep", "600"])
    corral.ready()
    corral.set_status("serving")
    started = time.monotonic()
    marker = os.path.join(marker_dir, "crasher-crashed")
    while True:
        corral.beat()  # progress from the work loop: this is what the liveness check watches
        if (role == "crasher" and time.monotonic() - started > CRASH_AFTER
                and not os.path.exists(marker)):
            # Crash only once, so the restarted crasher shows a healthy comeback.
            with open(marker, "w"):
                pass
            raise RuntimeError("simulated bug in the crasher")
        time.sleep(0.1)
