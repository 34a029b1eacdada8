"""Worker targets for the benchmarks (module level, so spawn/forkserver children can import them).

Every worker takes ``time.monotonic()`` as its first line and reports it through a FIFO whose
path it is given (see :class:`probe.Probe`). CLOCK_MONOTONIC is one clock for every process, so the
bench process compares these stamps with its own. Only the standard library is imported at the top:
importing this module must cost a spawn child nothing that the floor would not pay too.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import sys
import time

# One record: kind, worker index, pid, value (a monotonic time, a pid, a figure). 20 bytes, well
# under PIPE_BUF, so concurrent writers never interleave.
RECORD = struct.Struct("=iiid")
START, LAST_BEAT, RESULT, GRANDCHILD, BASELINE = 1, 2, 3, 4, 5

_fd: tuple[int, int] | None = None  # (pid that opened it, fd): never reuse a parent's fd


def report(path: str, kind: int, index: int, value: float) -> None:
    global _fd
    pid = os.getpid()
    if _fd is None or _fd[0] != pid:
        _fd = (pid, os.open(path, os.O_WRONLY | os.O_CLOEXEC))
    os.write(_fd[1], RECORD.pack(kind, index, pid, value))


def _sleep_forever() -> None:
    while True:
        time.sleep(3600)


def _random_between(lo: float, hi: float) -> float:
    return random.Random(os.urandom(8)).uniform(lo, hi)


# ------------------------------------------------------------------------------- first line


def first_line(path: str, index: int = 0) -> None:
    """The floor: a bare process that only reports its first line and exits."""
    t = time.monotonic()
    report(path, START, index, t)


def sleeper(index: int, path: str) -> None:
    """corral: report the first line, then sleep until killed."""
    t = time.monotonic()
    report(path, START, index, t)
    _sleep_forever()


MODEL: object = None  # what a slow warm-up builds (a model, a pool of connections)
WARM_UP = 2.0  # seconds


def warm_up() -> None:
    """A slow boot: what `standby_init` runs ahead in a standby."""
    global MODEL
    time.sleep(WARM_UP)
    MODEL = object()


def slow_boot_sleeper(index: int, path: str) -> None:
    """A worker that needs its model before it can serve: 2 s cold, at once from a standby."""
    if MODEL is None:
        warm_up()
    report(path, START, index, time.monotonic())
    _sleep_forever()


def beater(index: int, path: str, period: float) -> None:
    """corral: report the first line, then beat every ``period`` seconds."""
    t = time.monotonic()
    report(path, START, index, t)
    import corral

    while True:
        corral.beat()
        time.sleep(period)


def crasher(index: int, path: str) -> None:
    """corral: report the first line, then exit with a failure at once."""
    t = time.monotonic()
    report(path, START, index, t)
    os._exit(1)


def hanger(index: int, path: str, lo: float, hi: float, period: float) -> None:
    """corral: beat every ``period`` s for a random while in [lo, hi), then stop beating."""
    t = time.monotonic()
    report(path, START, index, t)
    import corral

    until = t + _random_between(lo, hi)
    last = 0.0
    while True:
        last = time.monotonic()
        corral.beat()  # its stamp is >= last: the measured lateness errs against corral
        if last >= until:
            break
        time.sleep(period)
    report(path, LAST_BEAT, index, last)
    _sleep_forever()


def beat_cost(index: int, path: str, n: int, k: int) -> None:
    """corral: time n calls of corral.beat(), k times (and an empty loop of n, apart)."""
    t = time.monotonic()
    report(path, START, index, t)
    import corral

    beat = corral.beat
    for _ in range(k):
        report(path, RESULT, index, _time_calls(beat, n))
    report(path, BASELINE, index, _time_loop(n))
    _sleep_forever()


def _time_calls(fn, n: int, *args: object) -> float:  # type: ignore[no-untyped-def]
    r = range(n)
    t0 = time.perf_counter_ns()
    for _ in r:
        fn(*args)
    return (time.perf_counter_ns() - t0) / n


def _time_loop(n: int) -> float:
    r = range(n)
    t0 = time.perf_counter_ns()
    for _ in r:
        pass
    return (time.perf_counter_ns() - t0) / n


def floor_beat_cost(path: str, n: int, k: int) -> None:
    """The floor of a beat: store time.monotonic() in shared memory, in a bare process."""
    import mmap

    report(path, START, 0, time.monotonic())
    mm = mmap.mmap(-1, 4096)
    view = memoryview(mm).cast("d")
    mono = time.monotonic
    r = range(n)
    for _ in range(k):
        t0 = time.perf_counter_ns()
        for _ in r:
            view[0] = mono()
        report(path, RESULT, 0, (time.perf_counter_ns() - t0) / n)
    report(path, BASELINE, 0, _time_loop(n))


def manager_dict_cost(path: str, shared: object, n: int, k: int) -> None:
    """Reference: one multiprocessing.Manager().dict() update per call, in a bare process."""
    report(path, START, 0, time.monotonic())

    def update() -> None:
        shared[0] = time.time()  # type: ignore[index]

    for _ in range(k):
        report(path, RESULT, 0, _time_calls(update, n))


def stopper(index: int, path: str, ignore_term: bool) -> None:
    """corral: start a grandchild, optionally ignore SIGTERM, sleep."""
    t = time.monotonic()
    report(path, START, index, t)
    if ignore_term:
        # Before the grandchild starts, so it ignores SIGTERM too (ignored signals survive exec).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL)
    report(path, GRANDCHILD, index, float(child.pid))
    _sleep_forever()


# ------------------------------------------------ WorkerProcessManager-style (original, compat)
# Their worker_fn gets (idx, *args_fn(idx)), or (idx, healthcheck, *args) with a
# HeartbeatHealthCheck.


def wpm_sleeper(idx: int, path: str) -> None:
    t = time.monotonic()
    report(path, START, idx, t)
    _sleep_forever()


def wpm_beater(idx: int, hc: object, path: str, period: float) -> None:
    t = time.monotonic()
    report(path, START, idx, t)
    while True:
        hc.update_heartbeat(idx)  # type: ignore[attr-defined]
        time.sleep(period)


def wpm_crasher(idx: int, path: str) -> None:
    t = time.monotonic()
    report(path, START, idx, t)
    os._exit(1)


def wpm_hanger(idx: int, hc: object, path: str, lo: float, hi: float, period: float) -> None:
    t = time.monotonic()
    report(path, START, idx, t)
    until = t + _random_between(lo, hi)
    last = 0.0
    while True:
        last = time.monotonic()
        hc.update_heartbeat(idx)  # type: ignore[attr-defined]
        if last >= until:
            break
        time.sleep(period)
    report(path, LAST_BEAT, idx, last)
    _sleep_forever()


def wpm_beat_cost(idx: int, hc: object, path: str, n: int, k: int) -> None:
    t = time.monotonic()
    report(path, START, idx, t)
    for _ in range(k):
        report(path, RESULT, idx,
               _time_calls(hc.update_heartbeat, n, idx))  # type: ignore[attr-defined]
    report(path, BASELINE, idx, _time_loop(n))
    _sleep_forever()


def wpm_stopper(idx: int, path: str, ignore_term: bool) -> None:
    stopper(idx, path, ignore_term)


if __name__ == "__main__":
    sys.exit("a module of worker targets; run benchmarks/run.py")
