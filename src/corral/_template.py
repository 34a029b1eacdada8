"""A pool's first fork workers, forked by a one-shot single-threaded template.

Under fork, every worker forked from the supervisor pays Python's after-fork clean-up of the
supervisor's other threads, and the spawner thread that forks competes for the GIL with the
monitor thread. For a pool's start the spawner forks one *template* instead (an ordinary
``os.fork()``, so the template holds the supervisor's state as of that moment, the pool's
``start()``), and the template, which has one thread, forks the batch's workers.

The workers must stay the supervisor's own children (reaped by pid and pidfd, their exit
statuses, their parent-death signal tied to the spawner thread, process groups set from the
parent's side). The template creates each with a raw ``clone(CLONE_PARENT | SIGCHLD)``: the
new process's parent is the template's parent, the supervisor's spawner thread. Around that
system call the template does what ``os.fork()`` does (``PyOS_BeforeFork``,
``PyOS_AfterFork_Parent`` / ``_Child``, so ``os.register_at_fork`` hooks run in each worker),
and in the child what glibc's ``fork()`` does for the calling thread: the kernel writes the new
thread id into glibc's thread descriptor (``CLONE_CHILD_SETTID``) and the child registers its
robust-mutex list again (``set_robust_list``), so robust mutexes (corral's death locks) name the
worker. Both addresses are taken from the kernel (``get_robust_list``) and checked against the
thread id before the template is used. C-level ``pthread_atfork`` handlers run once, for the
template's fork, not for each worker's.

The template sends each worker's pid and multiprocessing's two pipe ends (as ``Popen`` of the
fork start method keeps them) over a socketpair, then exits. Anything that goes wrong (a clone
that fails, a template that dies or stays silent for :data:`TIMEOUT` seconds) ends the template;
workers it forked but never reported are killed and reaped, and the rest of the batch is started
the ordinary way, with a logged reason. Linux with glibc, x86-64 or arm64 only.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing.process
import multiprocessing.util
import os
import platform
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing import popen_fork
from typing import Any

from corral.process import disown_fd, forking, own_fd

__all__ = ["TIMEOUT", "ClonedPopen", "fork_batch", "unavailable"]

log = logging.getLogger(__name__)

# Seconds without news from the template before it is killed and the batch falls back.
TIMEOUT = 5.0

_NR = {"x86_64": (56, 273, 274), "aarch64": (220, 99, 100)}  # clone, set_/get_robust_list
_CLONE_PARENT = 0x00008000
_CLONE_CHILD_SETTID = 0x01000000
_PR_SET_PDEATHSIG = 1
_MSG = struct.Struct("=ii")  # (position in the batch, pid); the pipe ends ride as SCM_RIGHTS
# The fewest workers one forking process takes on (see _template).
CHUNK_MIN = 4

_checked: dict[int, tuple[str | None, int, int, int]] = {}  # by thread: (reason, head, len, tid)
_libc: Any = None


def _syscall() -> Any:
    global _libc
    if _libc is None:
        # PyDLL: the GIL stays held across the call, as os.fork() holds it across fork().
        lib = ctypes.PyDLL(None, use_errno=True)
        lib.syscall.restype = ctypes.c_long
        lib.prctl.restype = ctypes.c_int
        lib.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                              ctypes.c_ulong)
        for name in ("PyOS_BeforeFork", "PyOS_AfterFork_Parent", "PyOS_AfterFork_Child"):
            getattr(ctypes.pythonapi, name).restype = None
        _libc = lib
    return _libc


def _thread_facts() -> tuple[str | None, int, int, int]:
    """(why not, robust-list head, its size, the tid's address) for the calling thread."""
    ident = threading.get_ident()
    known = _checked.get(ident)
    if known is not None:
        return known
    facts: tuple[str | None, int, int, int]
    try:
        facts = _probe()
    except Exception as exc:  # anything unexpected: not here
        facts = (f"{type(exc).__name__}: {exc}", 0, 0, 0)
    _checked[ident] = facts
    return facts


def _probe() -> tuple[str | None, int, int, int]:
    nr = _NR.get(platform.machine())
    if nr is None or os.uname().sysname != "Linux":
        return (f"not supported on {os.uname().sysname} {platform.machine()}", 0, 0, 0)
    if platform.libc_ver()[0] != "glibc":
        return ("not glibc", 0, 0, 0)
    lib = _syscall()
    head, size = ctypes.c_void_p(), ctypes.c_size_t()
    if lib.syscall(ctypes.c_long(nr[2]), ctypes.c_long(0), ctypes.byref(head),
                   ctypes.byref(size)) != 0:
        return (f"get_robust_list: {os.strerror(ctypes.get_errno())}", 0, 0, 0)
    addr = head.value or 0
    # glibc's struct pthread: ... pid_t tid; pid_t unused; void *robust_prev;
    # struct robust_list_head robust_head (whose list points to itself while empty).
    tid_at = addr - 16
    if (not addr or size.value != 24
            or ctypes.c_int.from_address(tid_at).value != threading.get_native_id()
            or ctypes.c_void_p.from_address(addr - 8).value != addr):
        return ("glibc's thread descriptor is not laid out as expected", 0, 0, 0)
    return (None, addr, size.value, tid_at)


def unavailable() -> str | None:
    """Why the calling thread cannot use a template here (None: it can)."""
    return _thread_facts()[0]


class ClonedPopen(popen_fork.Popen):
    """multiprocessing's fork ``Popen`` for a worker the template forked: the same pid,
    sentinel and pipe ends, polled and closed as fork's own."""

    def __init__(self, pid: int, parent_r: int, parent_w: int) -> None:  # no _launch
        self.returncode: int | None = None
        self.pid = pid
        self.sentinel = parent_r
        self.finalizer = multiprocessing.util.Finalize(
            self, multiprocessing.util.close_fds,  # type: ignore[attr-defined]
            (parent_r, parent_w))


def _clone(facts: tuple[str | None, int, int, int]) -> int:
    """Fork a child of our parent (the supervisor), as os.fork() would: 0 in the child."""
    lib = _syscall()
    api = ctypes.pythonapi
    nr = _NR[platform.machine()]
    api.PyOS_BeforeFork()
    pid = lib.syscall(ctypes.c_long(nr[0]),
                      ctypes.c_ulong(_CLONE_PARENT | _CLONE_CHILD_SETTID | signal.SIGCHLD),
                      ctypes.c_void_p(0), ctypes.c_void_p(0), ctypes.c_void_p(facts[3]),
                      ctypes.c_void_p(0))
    if pid == 0:
        # glibc's fork() does this for the calling thread: a robust list of its own (empty).
        lib.syscall(ctypes.c_long(nr[1]), ctypes.c_void_p(facts[1]), ctypes.c_size_t(facts[2]))
        api.PyOS_AfterFork_Child()
        return 0
    err = ctypes.get_errno()
    api.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, f"clone: {os.strerror(err)}")
    return int(pid)


def _template(sock: socket.socket, procs: Sequence[multiprocessing.process.BaseProcess],
              supervisor: int, facts: tuple[str | None, int, int, int],
              prepare: Callable[[int], None] | None) -> int:
    """The template's life: fork every worker, report each, exit (returns the exit code).

    With more than one CPU the batch is cut into chunks, one per CPU: the template forks the
    last worker of every other chunk first, and that worker forks the rest of its chunk
    before it boots, so the forks of a batch run in parallel. Every one of them is a child
    of the supervisor (CLONE_PARENT), however deep it was forked.
    """
    # No handler of the supervisor's runs here, and each worker is born with every signal
    # blocked: its bootstrap resets the handlers, then unblocks (a stop signal sent meanwhile
    # is delivered then, to the defaults).
    signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    _syscall().prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != supervisor:
        return 1
    if prepare is not None:
        prepare(sock.fileno())
    chunks = _chunks(len(procs))
    for lo, hi in chunks[1:]:
        _fork_one(sock, procs, hi - 1, facts, (), (lo, hi - 1))
    for i in range(*chunks[0]):
        _fork_one(sock, procs, i, facts, (), None)
    return 0


def _chunks(n: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges of a batch of ``n``: one per CPU we may run on, at least
    :data:`CHUNK_MIN` workers each."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except OSError:
        cpus = os.cpu_count() or 1
    ways = max(1, min(cpus, n // CHUNK_MIN))
    bounds = [n * k // ways for k in range(ways + 1)]
    return [(bounds[k], bounds[k + 1]) for k in range(ways)]


def _fork_one(sock: socket.socket, procs: Sequence[multiprocessing.process.BaseProcess],
              i: int, facts: tuple[str | None, int, int, int], inherited: tuple[int, ...],
              chunk: tuple[int, int] | None) -> None:
    """Fork worker ``i`` and report it; the worker first forks ``chunk`` (a [lo, hi) range)."""
    parent_r, child_w = os.pipe()
    child_r, parent_w = os.pipe()
    pid = _clone(facts)
    if pid == 0:
        code = 1
        try:
            # The pipe ends of the process we were forked from are not ours.
            for fd in (parent_r, parent_w, *inherited):
                os.close(fd)
            if chunk is not None:
                for j in range(*chunk):
                    _fork_one(sock, procs, j, facts, (child_r, child_w), None)
            os.close(sock.fileno())  # (never used again: we end with os._exit)
            code = procs[i]._bootstrap(parent_sentinel=child_r)  # type: ignore[attr-defined]
        finally:
            os._exit(code)
    os.close(child_w)
    os.close(child_r)
    socket.send_fds(sock, [_MSG.pack(i, pid)], [parent_r, parent_w])
    os.close(parent_r)
    os.close(parent_w)


def fork_batch(procs: Sequence[multiprocessing.process.BaseProcess],
               take: Callable[[int, multiprocessing.process.BaseProcess], None],
               prepare: Callable[[int], None] | None = None) -> str | None:
    """On the spawner thread: fork ``procs`` (unstarted fork-method processes) from a template.

    ``take(i, proc)`` is called for each one started (``proc`` then has its ``_popen``), as the
    template reports it. ``prepare(fd)`` runs in the template before the first fork (with
    every signal blocked): what each worker would otherwise do alone, done once; ``fd`` is the
    template's socket, which it must leave open. Returns None if all were started, else why
    not (the processes not taken were not started; the caller starts them the ordinary way).
    """
    facts = _thread_facts()
    if facts[0] is not None:
        return facts[0]
    me = threading.get_native_id()
    before = _children(me)
    if before is None:
        return "no /proc/self/task/<tid>/children here"
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    own_fd(ours.fileno())
    own_fd(theirs.fileno())
    supervisor = os.getpid()
    multiprocessing.util._flush_std_streams()  # type: ignore[attr-defined]
    try:
        with forking():
            pid = os.fork()
    except BaseException:
        for s in (ours, theirs):
            disown_fd(s.fileno())
            s.close()
        raise
    if pid == 0:  # the template
        code = 1
        try:
            ours.close()
            code = _template(theirs, procs, supervisor, facts, prepare)
        finally:
            os._exit(code)
    disown_fd(theirs.fileno())
    theirs.close()
    taken: set[int] = set()
    reason: str | None = None
    try:
        reason = _receive(ours, procs, take, taken)
    except Exception as exc:  # whatever it is, the batch falls back
        reason = f"{type(exc).__name__}: {exc}"
    finally:
        disown_fd(ours.fileno())
        ours.close()
        status = _end(pid, reason is not None)
    if reason is None and status != 0:
        reason = f"template exited with status {status}"
    if reason is not None:
        known = {pid, *(p.pid for p in procs if p.pid is not None)}
        _sweep(me, before | known)
    return reason


def _receive(sock: socket.socket, procs: Sequence[multiprocessing.process.BaseProcess],
             take: Callable[[int, multiprocessing.process.BaseProcess], None],
             taken: set[int]) -> str | None:
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    while True:
        if not poller.poll(int(TIMEOUT * 1000)):
            return f"no word from the template for {TIMEOUT:g} s"
        msg, fds, _, _ = socket.recv_fds(sock, _MSG.size, 2, socket.MSG_CMSG_CLOEXEC)
        if len(msg) != _MSG.size:
            for fd in fds:
                os.close(fd)
            return "the template ended early"
        i, pid = _MSG.unpack(msg)
        if len(fds) != 2 or not 0 <= i < len(procs) or i in taken:
            for fd in fds:
                os.close(fd)
            return "a malformed message from the template"
        proc = procs[i]
        popen = ClonedPopen(pid, fds[0], fds[1])
        # What Process.start() records once its Popen exists (corral keeps its processes
        # out of multiprocessing's _children, see WorkerProcess.start).
        proc._popen = popen
        proc._sentinel = popen.sentinel
        for attr in ("_target", "_args", "_kwargs"):
            with contextlib.suppress(AttributeError):
                delattr(proc, attr)
        taken.add(i)
        take(i, proc)
        if len(taken) == len(procs):
            return None


def _end(pid: int, kill: bool) -> int:
    """Reap the template (killed first if it failed): its wait status, as waitpid's."""
    if kill:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + TIMEOUT
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:  # exiting: a kill cannot be refused
            os.kill(pid, signal.SIGKILL)
            return os.waitpid(pid, 0)[1]
        fd = os.pidfd_open(pid)
        try:
            select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        finally:
            os.close(fd)


def _children(tid: int) -> set[int] | None:
    try:
        with open(f"/proc/self/task/{tid}/children", "rb") as fh:
            return {int(p) for p in fh.read().split()}
    except (OSError, ValueError):
        return None


def _sweep(tid: int, known: set[int]) -> None:
    """Kill and reap what a failed template forked and never reported (our children, by pid:
    nothing else forks on this thread meanwhile)."""
    now = _children(tid) or set()
    for pid in sorted(now - known):
        log.warning("killing pid %d, forked by a failed start template and never reported", pid)
        with contextlib.suppress(ChildProcessError, ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
