"""corral in about twenty seconds: a crash, a kill -9, a crash loop, and a clean shutdown.

Run it with ``make demo`` (or ``.venv/bin/python examples/demo.py``). It prints what corral does as
it happens: lifecycle events from ``Supervisor.subscribe``, corral's own WARNING log lines, and
tables from ``Supervisor.status()``. It exits 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import signal
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

# The workers' module sits next to this file; under forkserver (and spawn) each worker imports it,
# so its directory must be on sys.path before the pool starts.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import demo_workers
import psutil

import corral

T = TypeVar("T")

BACKOFF = corral.Backoff(initial=0.2, multiplier=2.0, cap=3.0, jitter=0.1, reset_after=5.0)
BUDGET = corral.RestartBudget(max_restarts=50, window=60.0)
STOP_TIMEOUT = 5.0

_t0 = time.monotonic()
_out_lock = threading.Lock()
_quiet = False


class DemoFailed(Exception):
    """Something the demo waits for did not happen."""


# ----------------------------------------------------------------------------------- output


def out(text: str = "") -> None:
    # One lock for the narration, the event thread and the log handler: lines never interleave.
    global _quiet
    with _out_lock:
        if not _quiet:
            try:
                sys.stdout.write(text + "\n")
                sys.stdout.flush()
            except BrokenPipeError:
                # The reader went away (`make demo | head`): go quiet (Python's final flush at
                # exit must not fail either), and let the main thread end the demo.
                _quiet = True
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)
        if _quiet and threading.current_thread() is threading.main_thread():
            raise BrokenPipeError("stdout was closed")


def stamp() -> str:
    return f"[{time.monotonic() - _t0:5.1f}s]"


def say(title: str, text: str = "") -> None:
    body = "\n".join(textwrap.fill(p, 96, initial_indent="   ", subsequent_indent="   ")
                     for p in textwrap.dedent(text).strip().split("\n\n") if p.strip())
    out(f"\n{stamp()} == {title}" + (f"\n{body}" if body else ""))


class _OutHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        # A handler must never raise: corral logs from its monitor thread.
        try:
            out(f"{stamp()} log    {record.levelname} {record.name}: {self.format(record)}")
        except Exception:
            self.handleError(record)


COLUMNS = ("idx", "name", "pid", "state", "restarts", "uptime", "last exit", "reason",
           "next restart in")


def table(statuses: tuple[corral.WorkerStatus, ...]) -> str:
    rows = [COLUMNS]
    for s in statuses:
        last = s.last_exit
        rows.append((
            str(s.index),
            s.name,
            str(s.pid) if s.pid is not None else "-",
            s.state.value,
            str(s.restarts),
            f"{s.uptime:.1f}s" if s.pid is not None else "-",
            last.exit.describe() if last is not None and last.exit is not None else "-",
            last.reason.value if last is not None else "-",
            f"{s.next_restart_in:.2f}s" if s.next_restart_in is not None else "-",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join("        | " + line for line in lines)


def show(sup: corral.Supervisor, obs: Observer) -> None:
    statuses = sup.status()
    for s in statuses:
        if s.pid is not None and s.alive:
            obs.see_family(s.pid, s.name)
    out(f"{stamp()} status()\n{table(statuses)}")


# ------------------------------------------------------------------------------ observing


class Observer:
    """Prints every event, and remembers every process the demo saw (to check they are gone)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seen: dict[int, tuple[str, psutil.Process | None]] = {}
        self.loop_delays: list[float] = []
        self.exits: list[corral.Event] = []

    def see(self, pid: int, what: str) -> None:
        with self._lock:
            if pid in self.seen:
                return
            try:
                proc: psutil.Process | None = psutil.Process(pid)
            except psutil.NoSuchProcess:
                proc = None  # came and went before we looked (the crash loop)
            self.seen[pid] = (what, proc)

    def see_family(self, pid: int, name: str) -> list[int]:
        """Remember a worker and its descendants; return the descendants' pids."""
        self.see(pid, f"worker {name!r}")
        found: list[int] = []
        try:
            children = psutil.Process(pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return found
        for child in children:
            try:
                cmd = " ".join(child.cmdline())
            except psutil.Error:
                continue
            self.see(child.pid, f"grandchild ({cmd!r}, started by {name!r} pid {pid})")
            found.append(child.pid)
        return found

    def on_event(self, ev: corral.Event) -> None:
        kind = ev.kind
        if ev.pid is not None and ev.name is not None and kind is corral.EventKind.SPAWNED:
            self.see(ev.pid, f"worker {ev.name!r}")
        who = f"{ev.name or ev.pool:<10}"
        if kind is corral.EventKind.EXITED and ev.exit is not None:
            rec = ev.exit
            how = rec.exit.describe() if rec.exit is not None else "no process"
            detail = f"pid {rec.pid}  {how} ({rec.reason.value}) after {rec.uptime:.2f}s"
            with self._lock:
                self.exits.append(ev)
        elif kind is corral.EventKind.RESTARTING:
            delay = ev.delay or 0.0
            detail = f"in {delay:.2f}s" if delay > 0 else "at once"
            if ev.name == "crash-loop":
                with self._lock:
                    self.loop_delays.append(delay)
        elif ev.pid is not None:
            detail = f"pid {ev.pid}" + (f"  {ev.message}" if ev.message else "")
        else:
            detail = ev.message
        out(f"{stamp()} event  {kind.value:<11} {who} {detail}".rstrip())

    def exit_of(self, name: str, pid: int | None = None) -> corral.Event | None:
        with self._lock:
            for ev in self.exits:
                if ev.name == name and (pid is None or ev.pid == pid):
                    return ev
        return None

    def delays(self) -> list[float]:
        with self._lock:
            return list(self.loop_delays)


def gone(proc: psutil.Process | None) -> bool:
    if proc is None:
        return True
    try:
        # is_running() also compares the start time, so a reused pid does not count.
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_until(cond: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise DemoFailed(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


def worker(sup: corral.Supervisor, name: str) -> corral.WorkerStatus:
    for s in sup.status():
        if s.name == name:
            return s
    raise DemoFailed(f"no worker named {name!r}")


def running(sup: corral.Supervisor, name: str, not_pid: int | None = None,
            min_restarts: int = 0) -> corral.WorkerStatus | None:
    s = worker(sup, name)
    if (s.state is corral.WorkerState.RUNNING and s.pid != not_pid
            and s.restarts >= min_restarts):
        return s
    return None


def helper_processes() -> set[int]:
    """multiprocessing's forkserver and resource tracker, and corral's keeper (it kills what the
    workers leave behind if this process dies): shared helpers, not pool processes."""
    helpers = set()
    for child in psutil.Process().children(recursive=False):
        try:
            cmd = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "forkserver" in cmd or "resource_tracker" in cmd or "corral-keeper" in cmd:
            helpers.add(child.pid)
    return helpers


# --------------------------------------------------------------------------------- script


def script(sup: corral.Supervisor, obs: Observer) -> list[str]:
    """The demo proper; returns the checks that failed."""
    failures: list[str] = []

    say("1. Start a pool of 4 workers", f"""
        Supervisor(work, workers=4, start_method='forkserver' (the default), ready_when='ready',
        heartbeat_timeout=5, backoff=Backoff(initial=0.2, multiplier=2, cap=3, jitter=0.1,
        reset_after=5), budget=RestartBudget(max_restarts={BUDGET.max_restarts},
        window={BUDGET.window:g})).

        The workers: 'crasher' raises an exception ~{demo_workers.CRASH_AFTER:g}s after it is
        ready (once); 'victim' runs a grandchild ('sleep 600') and will be killed with SIGKILL by
        this demo; 'crash-loop' exits with code 3 the moment it starts, every time; 'steady' just
        works. Each boots for {demo_workers.BOOT_TIME}s, calls corral.ready(), then
        corral.beat() in its work loop.

        Lines marked 'event' come from sup.subscribe(...); lines marked 'log' are corral's own
        WARNING log records.
        """)
    sup.start()
    sup.wait_ready(3, timeout=30)
    wait_until(lambda: psutil.Process(worker(sup, "victim").pid or 0).children(),
               10, "the victim's grandchild")
    show(sup, obs)

    say("2. A worker crashes", """
        In a moment the crasher raises RuntimeError. The monitor thread is blocked in one
        wait() on every worker's exit handle, so it learns of the death at once (no polling)
        and decodes it: exit code 1, an uncaught exception (multiprocessing printed the
        traceback on stderr). It ran less than reset_after=5s, so it counts as a quick failure:
        the 1st in a row waits initial=0.2s (+/- 10% jitter) before the restart.
        """)
    wait_until(lambda: obs.exit_of("crasher"), 20, "the crasher to crash")
    wait_until(lambda: running(sup, "crasher", min_restarts=1), 20, "the crasher's restart")
    crash = obs.exit_of("crasher")
    if crash is None or crash.exit is None or crash.exit.exit is None \
            or crash.exit.exit.code != 1:
        failures.append(f"the crasher's exit was not 'exit code 1': {crash}")
    show(sup, obs)

    victim = worker(sup, "victim")
    assert victim.pid is not None
    if victim.uptime < BACKOFF.reset_after:
        out(f"{stamp()} (waiting until the victim has run longer than reset_after=5s)")
        wait_until(lambda: worker(sup, "victim").uptime > BACKOFF.reset_after + 0.2, 15,
                   "the victim's uptime to pass reset_after")
    victim = worker(sup, "victim")
    assert victim.pid is not None
    old_pid = victim.pid
    grandchildren = obs.see_family(old_pid, "victim")
    say(f"3. kill -9 the victim (pid {old_pid}) from outside", f"""
        It has run {victim.uptime:.1f}s, longer than reset_after=5s, so this death is a fresh
        failure: it is restarted at once, without backoff. Its grandchild
        {', '.join(map(str, grandchildren)) or '(none?)'} shares its process group: corral
        kills what is left of the group when a worker dies, so nothing is orphaned.
        """)
    killed_at = time.monotonic()
    os.kill(old_pid, signal.SIGKILL)
    wait_until(lambda: obs.exit_of("victim", old_pid), 10, "corral to notice the kill")
    noticed = time.monotonic() - killed_at
    new = wait_until(lambda: running(sup, "victim", not_pid=old_pid), 20,
                     "the victim's replacement")
    replaced = time.monotonic() - killed_at
    ev = obs.exit_of("victim", old_pid)
    desc = ev.exit.exit.describe() if ev and ev.exit and ev.exit.exit else "?"
    if desc != "SIGKILL(-9)":
        failures.append(f"the victim's exit was {desc!r}, not 'SIGKILL(-9)'")
    out(f"{stamp()} victim pid {old_pid}: {desc}, seen by this demo's event subscriber after "
        f"{noticed * 1000:.0f} ms; replacement pid {new.pid} ready after {replaced:.2f}s "
        f"(including its {demo_workers.BOOT_TIME}s boot)")
    try:
        wait_until(lambda: all(gone(obs.seen[p][1]) for p in grandchildren), 5,
                   "the killed victim's grandchild to go")
        for pid in grandchildren:
            out(f"{stamp()} grandchild pid {pid} of the killed victim: gone")
    except DemoFailed as exc:
        failures.append(str(exc))
    show(sup, obs)

    say("4. A crash loop, and backoff", f"""
        'crash-loop' has been dying since the start. Every quick failure in a row doubles the
        wait before the next start: 0.2, 0.4, 0.8, 1.6, then the cap of 3s (each +/- 10%
        jitter, so a pool does not restart in lockstep). The 'next restart in' column counts
        down; while a worker waits, the monitor sleeps until exactly that deadline. Every restart
        is also charged to the pool-wide budget: more than {BUDGET.max_restarts} in
        {BUDGET.window:g}s and the pool would stop every worker and sup.wait() would raise
        corral.GaveUp listing the last exits. Here the budget is large enough for the demo.
        """)
    watch_start = time.monotonic()
    capped = BACKOFF.cap * (1 - BACKOFF.jitter) - 0.01
    while True:
        show(sup, obs)
        at_cap = sum(1 for d in obs.delays() if d >= capped)
        elapsed = time.monotonic() - watch_start
        if (at_cap >= 3 and elapsed >= 6) or elapsed >= 20:
            break
        time.sleep(1.0)
    delays = obs.delays()
    shown = " ".join(f"{d:.2f}" for d in delays)
    out(f"{stamp()} crash-loop restart delays so far (s): {shown}")
    if len(delays) >= 4 and delays[0] < 0.5 and max(delays) >= capped:
        out(f"{stamp()} backoff grew from {delays[0]:.2f}s to {max(delays):.2f}s and stays at "
            f"the cap ({BACKOFF.cap:g}s +/- 10%)")
    else:
        failures.append(f"the crash loop's backoff did not grow to the cap: {shown}")

    say("5. Shut down", f"""
        sup.stop(): the stop signal (SIGTERM) goes to every worker's process group at once,
        with one deadline ({STOP_TIMEOUT:g}s) for the whole pool, SIGKILL for stragglers, then
        every worker is reaped. The crash-loop worker, waiting in backoff, is simply not
        started again.
        """)
    for s in sup.status():
        if s.pid is not None:
            obs.see_family(s.pid, s.name)
    began = time.monotonic()
    sup.stop()
    took = time.monotonic() - began
    out(f"{stamp()} stop() returned after {took:.3f}s")
    out(f"{stamp()} status() after stop()\n{table(sup.status())}")

    say("6. Is anything left?", f"""
        Every process this demo saw, {len(obs.seen)} in all (workers, their replacements, the
        grandchildren), checked with psutil (a pid reused by an unrelated process does not
        count as alive):
        """)
    try:
        wait_until(lambda: all(gone(p) for _, p in obs.seen.values()), 5,
                   "every process of the pool to be gone")
    except DemoFailed:
        pass  # reported pid by pid below
    for pid, (what, proc) in sorted(obs.seen.items(), key=lambda kv: kv[1][0]):
        state = "gone" if gone(proc) else "STILL ALIVE"
        if state != "gone":
            failures.append(f"pid {pid} ({what}) is still alive")
        out(f"        pid {pid:>7}  {what:<58} {state}")
    helpers = helper_processes()
    left = [p for p in psutil.Process().children(recursive=True)
            if p.pid not in helpers and not gone(p)]
    if left:
        failures.append(f"descendants left: {[p.pid for p in left]}")
        out(f"{stamp()} descendants of this demo still running: {[p.pid for p in left]}")
    elif not any(not gone(p) for _, p in obs.seen.values()):
        out(f"{stamp()} no process left: none of the {len(obs.seen)} pids is alive, and this "
            f"demo has no descendants other than multiprocessing's forkserver / resource "
            f"tracker and corral's keeper ({len(helpers)}), which exit with it")
    return failures


def main() -> int:
    global _t0
    _t0 = time.monotonic()
    handler = _OutHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])

    marker_dir = tempfile.mkdtemp(prefix="corral-demo-")
    obs = Observer()
    sup = corral.Supervisor(
        demo_workers.work,
        workers=len(demo_workers.ROLES),
        name="demo",
        names=demo_workers.worker_name,
        args=functools.partial(demo_workers.worker_args, marker_dir),
        ready_when="ready",
        heartbeat_timeout=5.0,
        stop_timeout=STOP_TIMEOUT,
        backoff=BACKOFF,
        budget=BUDGET,
    )
    sup.subscribe(obs.on_event)
    try:
        failures = script(sup, obs)
    except DemoFailed as exc:
        failures = [str(exc)]
    except BrokenPipeError:
        return 141  # the reader of our output is gone (128 + SIGPIPE, as a shell reports it)
    except KeyboardInterrupt:
        out("\ninterrupted")
        return 130
    finally:
        sup.stop()  # idempotent: a no-op after the script's own stop()
        shutil.rmtree(marker_dir, ignore_errors=True)
    total = time.monotonic() - _t0
    if failures:
        out(f"\n{stamp()} demo FAILED after {total:.1f}s:")
        for failure in failures:
            out(f"   - {failure}")
        return 1
    out(f"\n{stamp()} demo finished in {total:.1f}s: every check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
