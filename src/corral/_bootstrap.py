"""What runs first in every worker process, before the user's target.

It puts the worker in its own process group (so stopping it reaches its children), makes sure it
dies with the supervisor (a parent-death signal plus a watch on the multiprocessing parent sentinel,
which also covers forkserver children), resets signal dispositions inherited from the supervisor,
sets the process title and attaches the heartbeat slot and the stack-dump handler.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # (no stubs)
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
from dataclasses import dataclass, replace
from typing import Any

from corral import heartbeat
from corral._keeper import claim_slot
from corral.process import DUMP_NAME, close_internal_fds, take_stdin

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
    # Where stdout and stderr go (paths of the supervisor's pipe ends, for log capture).
    stdio: tuple[str | None, str | None] | None = None
    # Where and as whom the target runs (PoolSpec env/cwd/umask/user/group), or None.
    settings: WorkerSettings | None = None
    # Spawn and forkserver: the keeper's slot reserved for this process and the table's path
    # (a fork child claims its slot in corral's after-fork, through the shared mapping).
    keeper_slot: int = 0
    keeper_table: str | None = None


def with_keeper_slot(config: BootConfig, slot: int, table: str) -> BootConfig:
    """``config`` for a spawn or forkserver child that claims keeper slot ``slot`` itself."""
    return replace(config, keeper_slot=slot, keeper_table=table)


@dataclass(frozen=True)
class WorkerSettings:
    """Where and as whom a target worker runs, resolved in the supervisor (names to ids)."""

    env: dict[str, str] | None = None
    cwd: str | None = None
    umask: int | None = None
    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] | None = None


def _apply_settings(s: WorkerSettings) -> None:
    """Last step before the target (after the heartbeat slot and stdio, which are opened
    through the supervisor's /proc entries while still corral's user)."""
    if s.env is not None:
        os.environ.clear()
        os.environ.update(s.env)
    if s.umask is not None:
        os.umask(s.umask)
    if s.uid is not None or s.gid is not None:
        if s.groups is not None:
            os.setgroups(list(s.groups))
        if s.gid is not None:
            os.setgid(s.gid)
        if s.uid is not None:
            os.setuid(s.uid)
        # A change of credentials clears the parent-death signal: arm it again, and check
        # the parent did not die in between.
        _set_pdeathsig(signal.SIGKILL)
        if os.getppid() == 1:
            _kill_own_group()
    if s.cwd is not None:
        os.chdir(s.cwd)  # as the new user: its own access rights decide


def _set_pdeathsig(sig: int) -> bool:
    return _prctl is not None and _prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0


_RESET_TO_DEFAULT = (signal.SIGTERM, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU,
                     signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD, signal.SIGQUIT)


def signals_to_reset() -> tuple[int, ...]:
    """In the supervisor: the signals whose handlers a fork child must reset (usually none)."""
    # _signal's getsignal: signal's makes an enum of each answer (~25 us a call, once per
    # worker started).
    dfl = int(signal.SIG_DFL)
    out = [sig for sig in _RESET_TO_DEFAULT
           if not (isinstance(h := _signal.getsignal(sig), int) and h == dfl)]
    if _signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        out.append(signal.SIGINT)
    return tuple(out)


def reset_signal_handlers(which: tuple[int, ...] | None) -> None:
    """The handlers and the wakeup fd a forked worker must not keep, reset to the defaults.

    Called by every worker, or once by a start template for all its workers (every signal
    blocked there): the workers then only unblock signals.
    """
    for sig in signals_to_reset() if which is None else which:
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT
                      else signal.SIG_DFL)
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)


@dataclass
class _TemplateGifts:
    """What a start template did once for all its workers (see :func:`become_template`)."""

    dump_fd: int  # where faulthandler writes in every worker of the template (-1: no dump)
    template_pid: int


# Set in a start template, taken once by each of its workers (a pool started inside a worker
# later must not take them again: its workers are forked by another supervisor).
_gifts: _TemplateGifts | None = None


def become_template(keep: tuple[int, ...], reset: tuple[int, ...] | None, title: str,
                    index: int, dump_signal: int | None) -> None:
    """In a start template, before its first fork (every signal blocked): what each of its
    workers would otherwise do alone, done once.

    The supervisor's fds are closed (but ``keep``), the signal handlers reset, the title set
    (its first setting moves the environment), the supervisor's other threads forgotten, and
    the stack-dump handler registered on a memfd at a high number that each worker replaces
    with its own (the template boots as worker ``index``). The workers' stdin is the
    template's (see :func:`corral.process.take_stdin`).
    """
    global _gifts
    close_internal_fds(keep=keep)
    reset_signal_handlers(reset)
    _set_title(title)
    _forget_other_threads()
    dump_fd = -1 if dump_signal is None else _dump_handler(dump_signal, index)
    _gifts = _TemplateGifts(dump_fd, os.getpid())


def _forget_other_threads() -> None:
    """The supervisor's other threads do not exist in a template; their Thread objects are
    stopped by the template's after-fork already. Each worker's threading after-fork would
    reset and stop every one of them again (~50 us of page faults a worker for a handful)."""
    me = threading.current_thread()
    dangling = getattr(threading, "_dangling", None)
    if dangling is not None:
        for thread in list(dangling):
            if thread is not me:
                dangling.discard(thread)


def _take_gifts() -> _TemplateGifts | None:
    """A template's worker: what the template did for it (once)."""
    global _gifts
    gifts, _gifts = _gifts, None
    return gifts


def _own_dump_fd(gifts: _TemplateGifts, index: int) -> int:
    """A template's worker: its own dump memfd, put where the template registered the handler
    (in the template itself, the one it made). -1: no dump here (the handler is dropped)."""
    if gifts.dump_fd < 0 or os.getpid() == gifts.template_pid:
        return gifts.dump_fd
    try:
        fd = os.memfd_create(f"{DUMP_NAME}-{index}", os.MFD_CLOEXEC)
        try:
            os.dup2(fd, gifts.dump_fd, inheritable=False)
        finally:
            os.close(fd)
    except OSError:
        # Never the template's memfd: a dump must not land in another process's file.
        with contextlib.suppress(OSError):
            os.close(gifts.dump_fd)
        return -1
    return gifts.dump_fd


def _reset_signals(which: tuple[int, ...] | None, handlers_reset: bool = False) -> None:
    # A forked worker inherits the supervisor's Python handlers (a CLI's handlers only enqueue,
    # which would make the worker ignore SIGTERM) and the spawning thread's signal mask. Only
    # what differs is changed: every call here costs each start (page faults in a new child).
    # The handlers before the mask: a stop signal that came while blocked (a zygote's child is
    # born so) is delivered once unblocked, to the defaults, not to a handler of the parent's.
    if not handlers_reset:  # (a start template's workers: done once, in the template)
        reset_signal_handlers(which)
    # _signal's: signal's would make an enum of each signal that was blocked (all of them,
    # for a child of the start template: ~0.1 ms).
    _signal.pthread_sigmask(signal.SIG_SETMASK, ())


def _kill_own_group() -> None:
    try:
        os.killpg(os.getpgid(0), signal.SIGKILL)
    finally:
        os._exit(1)


def _supervisor_gone() -> bool:
    """Whether multiprocessing's sentinel of the supervisor (a pipe only it writes to) is at
    its end: the supervisor is gone, however it ended."""
    parent = multiprocessing.parent_process()
    sentinel = getattr(parent, "sentinel", None) if parent is not None else None
    if sentinel is None:
        return False
    try:
        return bool(multiprocessing.connection.wait([sentinel], 0))
    except (OSError, ValueError):
        return False


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


def _redirect_stdio(paths: tuple[str | None, str | None]) -> None:
    """Send fds 1 and 2 to the supervisor's log pipes (opened through /proc, which works under
    every start method), line-buffered so a worker's lines arrive as it prints them."""
    import sys

    for target, path, stream in ((1, paths[0], sys.stdout), (2, paths[1], sys.stderr)):
        if path is None:
            continue
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        os.dup2(fd, target)
        os.close(fd)
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]


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
    take_stdin()
    armed, dump_fd = _prepare(config, _take_gifts())
    _take_slot(config, config.index, config.name, dump_fd)
    if config.settings is not None:
        _apply_settings(config.settings)
    _last_steps(config, armed)
    target(config.index, *args)


@dataclass(frozen=True)
class Handover:
    """What a standby gets when it takes a worker's place (pickled through its pipe)."""

    index: int
    name: str
    args: tuple[Any, ...]
    heartbeat_path: str | None
    wake_path: str | None
    ready_on_beat: bool
    stdio: tuple[str | None, str | None] | None


@dataclass(frozen=True)
class OwnWait:
    """What a warm-up returns to wait for the handover itself, inside its own event loop.

    ``wait(conn, take)`` blocks until the pipe ``conn`` is readable, reads it, calls
    ``take(data)`` (None: the standby is told to go; else the :class:`Handover`, the slot
    taken) and then runs the worker itself (it replaces the target). A server uses it to
    start accepting in the callback that reads the handover, with no loop start in between.
    """

    wait: Callable[[Any, Callable[[bytes], Handover | None]], None]


def run_standby(config: BootConfig, target: Callable[..., Any], conn: Any,
                warm_up: Callable[[], Any] | str | None) -> None:
    """The multiprocessing target of a standby: boot, warm up, then wait for a worker's place.

    Everything that does not depend on which worker it becomes is done before it is needed
    (process group, signals, parent-death protection, the dump handler, the target's module,
    the warm-up hook); at the handover it takes the slot (heartbeats, title, stdio) and runs
    ``target(index, *args)``, so a replacement runs user code within about a millisecond.
    A warm-up that returns an :class:`OwnWait` waits for the handover and runs the worker
    itself (``target`` is then not called).

    Messages on ``conn``: to the supervisor ``("h",)`` once ready, ``("i", traceback)`` if
    ``warm_up`` raised (then it exits); from it one pickled :class:`Handover`, or EOF / an
    empty message: exit.
    """
    import pickle
    import traceback

    take_stdin()
    armed, dump_fd = _prepare(config)
    # What the handover would otherwise pay for, done now: the title's first setting (it moves
    # the environment, ~20 us), the heartbeat table's mapping and the wake fd (opened while
    # this process has one thread), the first unpickling of a Handover.
    _set_title(f"corral: {config.pool} standby")
    early: tuple[Any, int] | None = None
    if config.table is None and config.heartbeat_path is not None:
        with contextlib.suppress(OSError, ValueError):
            early = heartbeat._open_table(config.heartbeat_path, config.wake_path)
    own_wait: OwnWait | None = None
    if warm_up is not None:
        try:
            if isinstance(warm_up, str):
                import importlib

                module, _, attr = warm_up.partition(":")
                warm_up = getattr(importlib.import_module(module), attr)
            assert callable(warm_up)
            result = warm_up()
            if isinstance(result, OwnWait):
                own_wait = result
        except BaseException:
            with contextlib.suppress(OSError):
                conn.send_bytes(pickle.dumps(("i", traceback.format_exc())))
            raise SystemExit(3) from None
        _reset_signals(None)  # whatever the warm-up did, the worker starts from the defaults
    _last_steps(config, armed)
    pickle.loads(pickle.dumps(Handover(0, "", (), None, None, False, None)))
    with contextlib.suppress(Exception):  # the death lock's library, loaded before it counts
        from corral import _robust

        _robust._load()

    def take(data: bytes) -> Handover | None:
        """The handover came (or the pipe ended: None): take the worker's slot."""
        if not data:
            return None
        hand: Handover = pickle.loads(data)
        conn.close()
        _take_place(config, hand, early, dump_fd)
        return hand

    conn.send_bytes(pickle.dumps(("h",)))
    if own_wait is not None:
        own_wait.wait(conn, take)
        return
    try:
        data = conn.recv_bytes()
    except (EOFError, OSError):
        raise SystemExit(0) from None
    hand = take(data)
    if hand is None:
        raise SystemExit(0)
    target(hand.index, *hand.args)


def _take_place(config: BootConfig, hand: Handover, early: tuple[Any, int] | None,
                dump_fd: int) -> None:
    """A standby becomes worker ``hand.index``: stdio, title, heartbeat slot, settings."""
    if hand.stdio is not None:
        _redirect_stdio(hand.stdio)
    _set_title(f"corral: {config.pool} worker {hand.index}")
    table = config.table
    if table is not None and hand.index < table.capacity:
        heartbeat._attach_view(table.view, hand.index, dump_fd, config.wake_fd,
                               hand.ready_on_beat)
    elif (early is not None and hand.heartbeat_path == config.heartbeat_path
          and hand.wake_path == config.wake_path and hand.index < heartbeat._slots_in(early[0])):
        heartbeat._attach_view(early[0], hand.index, dump_fd, early[1], hand.ready_on_beat)
    else:  # the table grew (or moved) since this standby booted
        if early is not None and early[1] >= 0:
            os.close(early[1])
        if hand.heartbeat_path is not None:
            heartbeat._attach(hand.heartbeat_path, hand.index, dump_fd, hand.wake_path,
                              hand.ready_on_beat)
    if config.settings is not None:
        _apply_settings(config.settings)


def _prepare(config: BootConfig, gifts: _TemplateGifts | None = None) -> tuple[bool, int]:
    """What every worker (or standby) does first: fds, stdio, group, signals, parent death,
    the dump handler (``gifts``: what a start template did for it). Returns (the parent-death
    signal is armed, the dump memfd)."""
    if config.forked and gifts is None:
        close_internal_fds(keep=(config.wake_fd,))
    if config.stdio is not None:
        _redirect_stdio(config.stdio)
    try:
        os.setpgid(0, 0)
    except OSError:
        pass  # already a group leader (the supervisor set it first)
    if config.keeper_slot > 0 and config.keeper_table is not None:
        # Before anything can be started in the group, and before the checks below: a
        # supervisor that dies after them (before it has registered us) leaves this group to
        # the keeper.
        claim_slot(config.keeper_table, config.keeper_slot)
    _reset_signals(config.reset_signals, handlers_reset=gifts is not None)
    parent = os.getppid()
    if config.forkserver:
        _release_forkserver()
    else:
        parent = config.supervisor_pid
    if config.forkserver and config.keeper_slot > 0:
        # Our parent is multiprocessing's forkserver, which a failed start can end (CPython's
        # server dies of a request cut short, or of its own failed fork): a parent-death signal
        # against it would take every healthy worker down with it. The supervisor's death is
        # covered without it: the keeper kills this group (claimed above), and so does the
        # watch thread. The supervisor is checked here, since the forkserver may outlive it
        # for a moment and the watch thread is not running yet.
        armed = False
        if _supervisor_gone():
            _kill_own_group()
    else:
        armed = _set_pdeathsig(signal.SIGKILL)
        # If our parent died before prctl, no signal will come: check by hand.
        if os.getppid() != parent or parent == 1 or (config.forkserver and _supervisor_gone()):
            _kill_own_group()
    dump_fd = -1
    if gifts is not None:
        if config.dump_signal is not None:
            dump_fd = _own_dump_fd(gifts, max(config.index, 0))
            if dump_fd < 0:
                with contextlib.suppress(ValueError):
                    faulthandler.unregister(config.dump_signal)
    elif config.dump_signal is not None:
        # Evidence from a hung worker: a C-level handler dumps every thread's stack into a memfd
        # the supervisor reads through /proc, even when the interpreter itself is stuck.
        dump_fd = _dump_handler(config.dump_signal, max(config.index, 0))
    return armed, dump_fd


def _dump_handler(sig: int, index: int) -> int:
    """faulthandler's handler for ``sig`` on a new memfd: its fd, or -1 if either cannot be
    had (the supervisor then sends no dump signal: its default action would end the worker)."""
    try:
        fd = _make_dump_fd(index)
    except OSError:
        return -1
    try:
        faulthandler.register(sig, file=fd, all_threads=True, chain=False)
    except (OSError, ValueError, RuntimeError):
        os.close(fd)
        return -1
    return fd


def _set_title(title: str) -> None:
    if _setproctitle is not None:
        with contextlib.suppress(Exception):
            _setproctitle.setproctitle(title)


def _take_slot(config: BootConfig, index: int, name: str, dump_fd: int) -> None:
    """Become worker ``index``: its title and its heartbeat slot."""
    _set_title(f"corral: {config.pool} worker {index}")
    table = config.table
    if table is not None and index < table.capacity:
        # A fork child shares the supervisor's mapping (from when it was forked: a slot past
        # it, added since, is opened like under spawn).
        heartbeat._attach_view(table.view, index, dump_fd, config.wake_fd, config.ready_on_beat)
    elif config.heartbeat_path is not None:
        try:
            heartbeat._attach(config.heartbeat_path, index, dump_fd, config.wake_path,
                              config.ready_on_beat)
        except FileNotFoundError:
            # The pool closed its table: it stopped before this start got here (a forkserver
            # held up past the stop's deadline). Nothing of the user's has run: one line, not
            # a traceback of corral's internals.
            with contextlib.suppress(OSError):
                os.write(2, f"corral: worker {name!r} started after pool {config.pool!r} had "
                            "stopped; exiting\n".encode())
            os._exit(1)


def _last_steps(config: BootConfig, armed: bool) -> None:
    # Last: every fd above is opened while this process has one thread. With a second one,
    # growing the fd table (the dump memfd sits at a high number) waits for an RCU grace
    # period in the kernel, ~8 ms of every forkserver start.
    if config.forkserver or not armed:
        # The forkserver may outlive the supervisor for a moment (or prctl is missing): watch
        # the supervisor itself. Under fork/spawn the signal is tied to the supervisor's
        # long-lived spawner thread, and the thread would cost ~0.6 ms of every restart.
        _watch_parent()
