"""What runs first in every worker process, before the user's target.

It puts the worker in its own process group (so stopping it reaches its children), makes sure it
dies with the supervisor (a parent-death signal plus a watch on the multiprocessing parent sentinel,
which also covers forkserver children), resets signal dispositions inherited from the supervisor,
sets the process title and attaches the heartbeat slot and the stack-dump handler.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import fcntl
import multiprocessing
import multiprocessing.connection
import os
import resource
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from corral import heartbeat
from corral.process import DUMP_NAME, close_internal_fds

_PR_SET_PDEATHSIG = 1
# Where a worker's dump memfd goes (minus 16): far above what a program reuses after closing its
# fds, and a small fd table (a larger one costs the kernel more at every start).
_DUMP_FD_AT = 1024

# Loaded once here, in the supervisor, so forked workers inherit them instead of paying for the
# import and the dlopen at every start (about 1.4 ms of a fork restart).
try:
    import setproctitle as _setproctitle
except ImportError:  # a title is a nicety, never a reason to fail
    _setproctitle = None  # type: ignore[assignment]
_prctl: Any
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    # Looked up (and typed) here, once: a dlsym and argument conversion in every child cost
    # tens of microseconds of each start.
    _prctl = _libc.prctl
    _prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                       ctypes.c_ulong)
    _prctl.restype = ctypes.c_int
except (OSError, AttributeError):
    _prctl = None


@dataclass(frozen=True)
class BootConfig:
    pool: str
    index: int
    name: str
    supervisor_pid: int
    heartbeat_path: str | None
    wake_path: str | None
    ready_on_beat: bool
    dump_signal: int | None
    forkserver: bool  # our parent is multiprocessing's forkserver, not the supervisor
    forked: bool = False  # started with fork: we inherited the supervisor's own fds
    # fork only (never pickled): the supervisor's table, whose mapping the child shares, and
    # the write end of its wakeup pipe, which the child keeps.
    table: Any = None
    wake_fd: int = -1
    # Signals the supervisor has handlers for, which a fork child must reset (None: check all).
    reset_signals: tuple[int, ...] | None = None


def _set_pdeathsig(sig: int) -> bool:
    return _prctl is not None and _prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0


_RESET_TO_DEFAULT = (signal.SIGTERM, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU,
                     signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD, signal.SIGQUIT)


def signals_to_reset() -> tuple[int, ...]:
    """In the supervisor: the signals whose handlers a fork child must reset (usually none)."""
    out = [sig for sig in _RESET_TO_DEFAULT if signal.getsignal(sig) is not signal.SIG_DFL]
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        out.append(signal.SIGINT)
    return tuple(out)


def _reset_signals(which: tuple[int, ...] | None) -> None:
    # A forked worker inherits the supervisor's Python handlers (a CLI's handlers only enqueue,
    # which would make the worker ignore SIGTERM) and the spawning thread's signal mask. Only
    # what differs is changed: every call here costs each start (page faults in a new child).
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    for sig in signals_to_reset() if which is None else which:
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT
                      else signal.SIG_DFL)
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)


def _kill_own_group() -> None:
    try:
        os.killpg(os.getpgid(0), signal.SIGKILL)
    finally:
        os._exit(1)


def _watch_parent() -> None:
    """Backstop for the parent-death signal: the parent sentinel hits EOF when it dies."""
    parent = multiprocessing.parent_process()
    sentinel = getattr(parent, "sentinel", None) if parent is not None else None
    if sentinel is None:
        return

    def watch() -> None:
        try:
            multiprocessing.connection.wait([sentinel])
        except Exception:
            return
        _kill_own_group()

    _start_quiet_thread(watch, "corral-parent-watch")


def _start_quiet_thread(fn: Callable[[], None], name: str) -> None:
    """Start a daemon thread that never receives a signal meant for the worker.

    A thread inherits the mask of the thread that starts it: block every signal around the
    start, so the new thread is born with all of them blocked (a process-directed signal then
    goes to a thread that has not blocked it: the user's), and restore ours.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        threading.Thread(target=fn, name=name, daemon=True).start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _make_dump_fd(index: int) -> int:
    """A memfd for faulthandler's stack dumps, moved to a high fd number.

    A worker that closes its fds and opens its own files reuses low numbers; up here the dump's
    fd is unlikely to be closed or reused, and the supervisor checks it is still this memfd
    before it asks for a dump.
    """
    fd = os.memfd_create(f"{DUMP_NAME}-{index}", os.MFD_CLOEXEC)
    try:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            soft = _DUMP_FD_AT
        high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, max(3, min(soft, _DUMP_FD_AT) - 16))
    except OSError:
        return fd  # no room up there: a low number still works, the check still applies
    os.close(fd)
    return high


def _release_forkserver() -> None:
    """Drop our copy of the forkserver's "alive" pipe.

    Every forkserver child inherits the write end; while any child holds it the forkserver
    outlives a dead supervisor, and so would its children. Without it, the forkserver exits when
    the supervisor dies, and our parent-death signal (set against the forkserver) fires even if
    this worker is stuck in native code and its watch thread cannot run.
    """
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if server is not None and isinstance(fd, int):
        with contextlib.suppress(OSError):
            os.close(fd)
        server._forkserver_alive_fd = None


def run_worker(config: BootConfig, target: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """The multiprocessing target of every worker: prepare, then ``target(index, *args)``."""
    if config.forked:
        close_internal_fds(keep=(config.wake_fd,))
    try:
        os.setpgid(0, 0)
    except OSError:
        pass  # already a group leader (the supervisor set it first)
    _reset_signals(config.reset_signals)
    parent = os.getppid()
    if config.forkserver:
        _release_forkserver()
    else:
        parent = config.supervisor_pid
    armed = _set_pdeathsig(signal.SIGKILL)
    # If our parent died before prctl, no signal will come: check by hand.
    if os.getppid() != parent or parent == 1:
        _kill_own_group()
    if _setproctitle is not None:
        with contextlib.suppress(Exception):
            _setproctitle.setproctitle(f"corral: {config.pool} worker {config.index}")
    dump_fd = -1
    if config.dump_signal is not None:
        # Evidence from a hung worker: a C-level handler dumps every thread's stack into a memfd
        # the supervisor reads through /proc, even when the interpreter itself is stuck.
        dump_fd = _make_dump_fd(config.index)
        faulthandler.register(config.dump_signal, file=dump_fd, all_threads=True, chain=False)
    if config.table is not None:
        heartbeat._attach_view(config.table.view, config.index, dump_fd, config.wake_fd,
                               config.ready_on_beat)
    elif config.heartbeat_path is not None:
        heartbeat._attach(config.heartbeat_path, config.index, dump_fd, config.wake_path,
                          config.ready_on_beat)
    # Last: every fd above is opened while this process has one thread. With a second one,
    # growing the fd table (the dump memfd sits at a high number) waits for an RCU grace
    # period in the kernel, ~8 ms of every forkserver start.
    if config.forkserver or not armed:
        # The forkserver may outlive the supervisor for a moment (or prctl is missing): watch
        # the supervisor itself. Under fork/spawn the signal is tied to the supervisor's
        # long-lived spawner thread, and the thread would cost ~0.6 ms of every restart.
        _watch_parent()
    target(config.index, *args)
