"""``corral run`` as a child subreaper (or PID 1): the orphans it adopts, reaped after a
grace, and killed at exit; what is below corral in the process tree."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass

log = logging.getLogger("corral.run")

_PR_SET_CHILD_SUBREAPER = 36


def _become_subreaper() -> None:
    """Orphans below us (a worker's child that called setsid(), say) are reparented to us
    instead of init: we reap them, and kill what is left when we exit."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _children(pid: int | str = "self") -> set[int]:
    out: set[int] = set()
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as fh:
                out.update(int(p) for p in fh.read().split())
    return out


def _below(roots: set[int]) -> set[int]:
    """``roots`` and every process below them."""
    out: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo.extend(_children(pid))
    return out


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


class _Adopted:
    """Zombies of processes that are not ours to watch: orphans the kernel handed us (we are
    a child subreaper, or PID 1 in a container), reaped quietly, by pid.

    Never ``waitpid(-1)``: it would steal the status of a worker its monitor waits for. A
    zombie that is not a known worker is only reaped when it is still unknown a moment later:
    a command that exits at once can be a zombie before the spawner thread has handed its
    process to the monitor.
    """

    GRACE = 0.5

    def __init__(self) -> None:
        self._suspects: dict[int, float] = {}
        self.reaped = 0

    def sweep(self, known: set[int], now: float) -> bool:
        """Reap what has been an unknown zombie for GRACE; True if a look is due later."""
        suspects: dict[int, float] = {}
        for pid in _children() - known:
            if not _zombie(pid) or _is_helper(pid):
                continue
            first = self._suspects.get(pid, now)
            if now - first >= self.GRACE:
                with contextlib.suppress(ChildProcessError, OSError):
                    if os.waitpid(pid, os.WNOHANG)[0]:
                        self.reaped += 1
                        log.debug("reaped adopted orphan pid %d", pid)
                        continue
            suspects[pid] = first
        self._suspects = suspects
        return bool(suspects)


def _is_helper(pid: int) -> bool:
    from corral._keeper import keeper

    if pid == keeper.pid:
        return True
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmd = fh.read()
    except OSError:
        return False
    return b"forkserver" in cmd or b"resource_tracker" in cmd


def _kill_adopted(deadline: float = 5.0) -> int:
    """At exit: whatever is still below us (adopted orphans, setsid() escapees, their own
    children) is killed and reaped; helpers (the keeper, the forkserver) end by themselves.
    Returns how many were killed."""
    killed = 0
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        helpers = {p for p in _children() if _is_helper(p)}
        victims = _below(_children() - helpers) - helpers
        live = [p for p in victims if not _zombie(p)]
        for pid in live:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        killed += len(live)
        # Reap ours (killing an escapee hands its children to us: the next round takes them).
        for pid in _children() - helpers:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, 0)
        if not live and not (_children() - helpers):
            break
    if killed:
        log.warning("killed %d process(es) left below corral at exit (orphans or setsid() "
                    "escapees of the workers)", killed)
    return killed
