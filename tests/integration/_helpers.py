"""Helpers shared by the integration tests: an event recorder and a pool that cleans up."""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import corral
from corral import Event, EventKind, WorkerState
from support import pid_alive, wait_for

T = TypeVar("T")

# Keep restarts fast but still exercise the backoff path.
FAST = corral.Backoff(initial=0.01, multiplier=2.0, cap=0.05, jitter=0.0, reset_after=60.0)


class EventLog:
    """A subscriber that records every event (thread-safe) and the pids it has seen."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[Event] = []

    def __call__(self, event: Event) -> None:
        with self._lock:
            self._events.append(event)

    @property
    def events(self) -> list[Event]:
        with self._lock:
            return list(self._events)

    def of(self, kind: EventKind, index: int | None = None) -> list[Event]:
        return [e for e in self.events
                if e.kind is kind and (index is None or e.index == index)]

    def pids(self) -> set[int]:
        return {e.pid for e in self.of(EventKind.SPAWNED) if e.pid is not None}

    def wait(self, cond: Callable[[list[Event]], Any], timeout: float = 10.0,
             what: str = "events") -> Any:
        return wait_for(lambda: cond(self.events), timeout, what)


@contextmanager
def pool(started: set[int], target: Callable[..., Any], *, start: bool = True,
         **options: Any) -> Iterator[tuple[corral.Supervisor, EventLog]]:
    """A started Supervisor with an EventLog; stopped, and its pids handed to ``no_leaks``.

    ``started`` is the set yielded by the ``no_leaks`` fixture: every worker pid the pool ever
    spawned is added to it, so leftovers are killed by pid even when the test fails.
    """
    options.setdefault("backoff", FAST)
    options.setdefault("stop_timeout", 2.0)
    sup = corral.Supervisor(target, **options)
    log = EventLog()
    sup.subscribe(log)
    try:
        if start:
            sup.start()
        yield sup, log
    finally:
        try:
            sup.stop()
        finally:
            started.update(log.pids())
            for s in sup.status():
                if s.pid is not None:
                    started.add(s.pid)


def read_pid(path: Path, timeout: float = 15.0) -> int:
    """The pid a worker wrote to ``path`` (written atomically by the worker)."""
    wait_for(path.exists, timeout, f"{path.name} to be written")
    return int(path.read_text())


def status_of(sup: corral.Supervisor, index: int) -> corral.WorkerStatus:
    for s in sup.status():
        if s.index == index:
            return s
    raise AssertionError(f"no worker with index {index} in {sup.status()}")


def running_with_new_pid(sup: corral.Supervisor, index: int, old: int,
                         timeout: float = 15.0) -> corral.WorkerStatus:
    """Wait until worker ``index`` is RUNNING in a process other than ``old``."""
    def check() -> corral.WorkerStatus | None:
        s = status_of(sup, index)
        return s if s.state is WorkerState.RUNNING and s.pid not in (None, old) else None
    return wait_value(check, timeout, f"worker {index} replaced")


def in_state(sup: corral.Supervisor, index: int, state: WorkerState,
             timeout: float = 15.0) -> corral.WorkerStatus:
    """Wait until worker ``index`` is in ``state``; return its status then."""
    def check() -> corral.WorkerStatus | None:
        s = status_of(sup, index)
        return s if s.state is state else None
    return wait_value(check, timeout, f"worker {index} {state.name}")


def wait_value(condition: Callable[[], T | None], timeout: float, what: str) -> T:
    """``wait_for`` for a condition that returns a value once it holds, None before."""
    result = wait_for(condition, timeout, what)
    assert result is not None
    return result


def gone(pid: int) -> bool:
    return not pid_alive(pid)


def wait_gone(pids: set[int] | list[int], timeout: float = 10.0, what: str = "") -> None:
    wait_for(lambda: not any(pid_alive(p) for p in pids), timeout,
             what or f"pids {sorted(pids)} to die")


def stays_empty(probe: Callable[[], set[int]], duration: float) -> set[int]:
    """Watch ``probe()`` for ``duration`` seconds; return whatever it ever reported.

    The one place a test watches for something that must *not* happen, so it polls for a
    bounded while instead of waiting on a condition.
    """
    seen: set[int] = set()
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        seen |= probe()
        time.sleep(0.01)
    return seen


SCRIPT = Path(__file__).resolve().parent / "_supervisor_script.py"


def start_supervisor_script(method: str, n: int, then: str = "wait", target: str = "graceful"
                            ) -> tuple[subprocess.Popen[bytes], list[int]]:
    """Run ``_supervisor_script.py`` in a new interpreter; return it and its worker pids.

    The caller adds ``proc.pid`` and the pids to ``no_leaks`` and closes ``proc.stdout``.
    """
    proc = subprocess.Popen([sys.executable, str(SCRIPT), method, str(n), then, target],
                            stdout=subprocess.PIPE, cwd=SCRIPT.parent)
    try:
        pids = json.loads(_read_line(proc, 30))
    except BaseException:
        proc.kill()
        proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()
        raise
    return proc, pids


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    data = b""
    try:
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise AssertionError(f"no line from the supervisor script within {timeout}s")
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                raise AssertionError(f"supervisor script ended early: {data!r}")
            data += chunk
    finally:
        sel.close()
    return data
