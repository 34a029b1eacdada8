"""A pool's first fork workers, forked by one of them: a single-threaded start template.

Under fork, every worker forked from the supervisor pays Python's after-fork clean-up of the
supervisor's other threads, and the spawner thread that forks competes for the GIL with the
monitor thread. For a pool's start the spawner forks the first worker as usual (an ordinary
``os.fork()``, so it holds the supervisor's state as of that moment, the pool's ``start()``),
and that process, the *template*, which has one thread, forks the others before it boots.
With more than one CPU it forks the first worker of each other chunk of the batch, which forks
the rest of its chunk (:func:`_chunks`). Each worker boots as soon as it is forked, on the
other CPU while its forker goes on (holding them back until the chunk was forked measured
about 1 ms slower for 8 workers on 2 CPUs, and no faster for 32 or 128).

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

Each forker reports its workers' pids and multiprocessing's two pipe ends for each (as ``Popen``
of the fork start method keeps them) over a socketpair, in one message for up to
:data:`_PER_MSG` workers, then the end of its chunk. Between two forks it does as little as it
can: after a fork, each page the forker writes costs it a copy-on-write fault (~3 us on a
virtual machine), so the pipes are made ahead and the reports sent after the forks. Anything
that goes wrong is logged by the caller with the reason: a fork that fails (reported; the
workers already forked are kept), a forker that dies or says nothing for :data:`TIMEOUT`
seconds (killed and reaped, with whatever it forked and did not report). The workers not
started are started the ordinary way. Linux with glibc, x86-64 only.
"""
from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # (no stubs)
import contextlib
import ctypes
import errno
import functools
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
from collections.abc import Callable, Iterable, Sequence
from multiprocessing import popen_fork
from typing import Any

from corral._forkchild import run_forked
from corral._keeper import keeper
from corral.process import disown_fd, forked_here, forking, own_fd, usable_cpus

__all__ = ["OFF_VARIABLE", "TIMEOUT", "ClonedPopen", "fork_batch", "unavailable"]

log = logging.getLogger(__name__)

# Seconds without news from the template before it is killed and the batch falls back.
TIMEOUT = 5.0

# clone, set_/get_robust_list. x86-64 only: clone's argument order differs between
# architectures (arm64 takes tls before child_tid), and a child_tid in the wrong place would
# leave glibc's thread id stale without any error; other machines use the ordinary path.
_NR = {"x86_64": (56, 273, 274)}
_CLONE_PARENT = 0x00008000
_CLONE_CHILD_SETTID = 0x01000000
_PR_SET_PDEATHSIG = 1
# Every message starts (kind, chunk, count or status).
_MSG = struct.Struct("=iii")
# (_WORKERS, chunk, n), then n (index, pid) pairs: workers forked, with 2n fds (each one's
# two pipe ends, as multiprocessing's fork Popen keeps them)
_WORKERS = 1
_END = 2  # (_END, chunk, 0 or an errno): a forker is done with its chunk
# Workers per report, and per group of pipes made ahead (4 fds a worker, held until the group
# is forked; a group that finds no room for all of them goes in smaller ones): at most 253
# fds go in one message.
_PER_MSG = 32
# The fewest workers a forker takes on: a chunk's first worker starts forking only once it
# runs (after its own after-fork work), and boots only after it has forked its chunk.
CHUNK_MIN = 8

# keeper_slots: the batch's keeper slots by worker index, set on the spawner thread before
# the template's fork (the template's thread inherits it).
_tls = threading.local()
_checked: dict[int, tuple[str | None, int, int, int]] = {}  # by thread: (reason, head, len, tid)
_libc: Any = None
_clone_with: tuple[Any, ...] | None = None


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


# The escape hatch: CORRAL_START_TEMPLATE=0 in the environment forks every worker the
# ordinary way (read at each pool start, so a program can also set it before start()).
OFF_VARIABLE = "CORRAL_START_TEMPLATE"


def unavailable() -> str | None:
    """Why the calling thread cannot use a template here (None: it can)."""
    if os.environ.get(OFF_VARIABLE, "").strip() in ("0", "false", "no", "off"):
        return f"turned off by {OFF_VARIABLE}={os.environ[OFF_VARIABLE]}"
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
    global _clone_with
    if _clone_with is None or _clone_with[0] is not facts:
        # Built once per template: every object the child touches is a page it copies.
        lib = _syscall()
        api = ctypes.pythonapi
        nr = _NR[platform.machine()]
        _clone_with = (
            facts, lib.syscall, api.PyOS_BeforeFork, api.PyOS_AfterFork_Parent,
            api.PyOS_AfterFork_Child,
            (ctypes.c_long(nr[0]),
             ctypes.c_ulong(_CLONE_PARENT | _CLONE_CHILD_SETTID | signal.SIGCHLD),
             ctypes.c_void_p(0), ctypes.c_void_p(0), ctypes.c_void_p(facts[3]),
             ctypes.c_void_p(0)),
            (ctypes.c_long(nr[1]), ctypes.c_void_p(facts[1]), ctypes.c_size_t(facts[2])))
    _, syscall, before, after_parent, after_child, clone_args, robust_args = _clone_with
    before()
    pid = syscall(*clone_args)
    if pid == 0:
        # glibc's fork() does this for the calling thread: a robust list of its own (empty).
        syscall(*robust_args)
        after_child()
        return 0
    err = ctypes.get_errno()
    after_parent()
    if pid < 0:
        raise OSError(err, f"clone: {os.strerror(err)}")
    return int(pid)


def _exit(code: int) -> None:
    """End a worker the template forked, whatever its exit code: a code out of the C int's
    range (``sys.exit(2**40)``) makes ``os._exit`` raise, and the worker must never unwind
    into its forker's code (the forking loop, whose frames it inherited)."""
    try:
        os._exit(code)
    finally:
        os._exit(1)


def _template(sock: socket.socket, procs: Sequence[multiprocessing.process.BaseProcess],
              supervisor: int, facts: tuple[str | None, int, int, int],
              prepare: Callable[[int], None] | None, bounds: list[tuple[int, int]],
              own_ends: tuple[int, int]) -> bool:
    """The template's part, before it boots as the batch's first worker: fork the others.

    The batch is cut into chunks, one per CPU (see :func:`_chunks`): the template forks the
    first worker of every other chunk, which forks the rest of its own chunk before it boots,
    so a batch is forked in parallel. Every one of them is a child of the supervisor
    (CLONE_PARENT), however deep it was forked. False: the supervisor is gone.
    """
    # No handler of the supervisor's runs here, and each worker is born with every signal
    # blocked: its bootstrap resets the handlers, then unblocks (a stop signal sent meanwhile
    # is delivered then, to the defaults).
    # (_signal's: signal's makes an enum of every signal, in and out: ~0.2 ms of the start.)
    _signal.pthread_sigmask(signal.SIG_BLOCK, _signal.valid_signals())
    _syscall().prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != supervisor:
        return False
    if prepare is not None:
        prepare(sock.fileno())
    _forker(sock, procs, 0, bounds, facts, own_ends)
    return True


def _chunks(n: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges of a batch of ``n``: one per CPU we may run on, at least
    :data:`CHUNK_MIN` workers each."""
    ways = max(1, min(usable_cpus(), n // CHUNK_MIN))
    bounds = [n * k // ways for k in range(ways + 1)]
    return [(bounds[k], bounds[k + 1]) for k in range(ways)]


def _forker(sock: socket.socket, procs: Sequence[multiprocessing.process.BaseProcess],
            chunk: int, bounds: list[tuple[int, int]], facts: tuple[str | None, int, int, int],
            own_ends: tuple[int, int]) -> None:
    """In the first worker of a chunk, before it boots: fork the rest of the chunk (and, in
    the template, the first worker of every other chunk), report them, then the chunk's end.
    A failure is reported, never raised: this worker boots all the same, and the supervisor
    starts what is missing. ``own_ends``: this worker's pipe ends, not its children's."""
    status = 0
    # (index, the chunk it forks or -1). The other chunks' first workers first, and reported
    # at once, before the rest: a forker the supervisor does not know of could still be
    # forking when a failed batch is swept.
    heads = [(lo, other) for other, (lo, _) in enumerate(bounds) if other and not chunk]
    rest = [(i, -1) for i in range(bounds[chunk][0] + 1, bounds[chunk][1])]
    groups = [heads] if heads else []
    groups += [rest[at:at + _PER_MSG] for at in range(0, len(rest), _PER_MSG)]
    try:
        for group in groups:
            while group:
                group = _fork_group(sock, procs, chunk, bounds, facts, own_ends, group)
    except OSError as exc:
        status = exc.errno or -1
    except Exception:
        status = -1
    sock.send(_MSG.pack(_END, chunk, status))


def _fork_group(sock: socket.socket, procs: Sequence[multiprocessing.process.BaseProcess],
                chunk: int, bounds: list[tuple[int, int]],
                facts: tuple[str | None, int, int, int], own_ends: tuple[int, int],
                group: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Fork ``group`` (its pipes made first, then the forks, then one report); returns what is
    left of it: the workers whose pipes found no room (another round, once these are closed).
    Raises OSError if not even one worker's pipes could be made, or a fork failed."""
    # The pipes before the first fork: after a fork each page this process writes is copied
    # again, so the less the loop below does, the sooner the batch is forked.
    fds: list[int] = []  # per worker: parent_r, child_w, child_r, parent_w
    try:
        for _ in group:
            fds += os.pipe()
            fds += os.pipe()
    except OSError as exc:
        # Out of fds (the program's own may fill the limit): fork the workers with pipes.
        whole = 4 * (len(fds) // 4)
        if not whole or exc.errno not in (errno.EMFILE, errno.ENFILE):
            _Runs(fds).close_all()
            raise
        _Runs(fds[whole:]).close_all()
        del fds[whole:]
    fit = group[:len(fds) // 4]
    made = _Runs(fds)
    forked: list[tuple[int, int, int, int]] = []  # (index, pid, parent_r, parent_w)
    try:
        for k, (i, heads) in enumerate(fit):
            then = None if heads < 0 else functools.partial(
                _forker, sock, procs, heads, bounds, facts)
            forked.append(_fork_one(sock, procs, i, facts, fds[4 * k:4 * k + 4], made,
                                    own_ends, then))
    finally:
        try:
            if forked:
                socket.send_fds(
                    sock, [_MSG.pack(_WORKERS, chunk, len(forked)),
                           struct.pack(f"={2 * len(forked)}i",
                                       *(v for f in forked for v in f[:2]))],
                    [fd for f in forked for fd in f[2:]])
        finally:
            made.close_all()  # the supervisor has its copies of the parent's ends
    return group[len(fit):]


class _Runs:
    """A set of fds, closed in as few system calls as their numbers allow (pipes made in a
    row are numbered in a row)."""

    def __init__(self, fds: Iterable[int]) -> None:
        self.fds = sorted(fds)

    def close_all(self, keep: tuple[int, ...] = ()) -> None:
        """Close every fd of the set but ``keep``."""
        lo = hi = -1
        for fd in self.fds:
            if fd in keep:
                continue
            if fd != hi + 1 or hi < 0:
                if hi >= 0:
                    os.closerange(lo, hi + 1)
                lo = fd
            hi = fd
        if hi >= 0:
            os.closerange(lo, hi + 1)


def _fork_one(sock: socket.socket, procs: Sequence[multiprocessing.process.BaseProcess],
              i: int, facts: tuple[str | None, int, int, int], ends: Sequence[int],
              made: _Runs, inherited: tuple[int, int],
              then: Callable[[tuple[int, int]], None] | None) -> tuple[int, int, int, int]:
    """Fork worker ``i``: (i, pid, and the supervisor's two pipe ends). In it, before it
    boots: every pipe of the batch but its own and ``inherited`` fds (its forker's own ends)
    are closed, and ``then(its pipe ends)`` runs (a chunk's first worker forks the chunk)."""
    parent_r, child_w, child_r, parent_w = ends
    pid = _clone(facts)
    if pid == 0:
        keeper.claim(_tls.keeper_slots[i])
        code = 1
        try:
            # The pipes of the others and of the process we were forked from are not ours.
            made.close_all(keep=(child_r, child_w))
            os.close(inherited[0])
            os.close(inherited[1])
            if then is not None:
                then((child_r, child_w))
            os.close(sock.fileno())  # (never used again: we end with os._exit)
            code = run_forked(procs[i], child_r)
        finally:
            _exit(code)
    return (i, pid, parent_r, parent_w)


def fork_batch(procs: Sequence[multiprocessing.process.BaseProcess],
               take: Callable[[int, multiprocessing.process.BaseProcess], None],
               prepare: Callable[[int], None] | None = None) -> str | None:
    """On the spawner thread: start ``procs`` (unstarted fork-method processes), the first
    forked as usual, the others by it before it boots (the template).

    ``take(i, proc)`` is called for each one started (``proc`` then has its ``_popen``), once
    the template is done. ``prepare(fd)`` runs in the template before its first fork (with
    every signal blocked): what each worker would otherwise do alone, done once; ``fd`` is the
    template's socket, which it must leave open. Returns None if all were started, else why
    not (the processes not taken were not started; the caller starts them the ordinary way).
    """
    facts = _thread_facts()
    if facts[0] is not None:
        return facts[0]
    me = threading.get_native_id()
    # The sweep after a failure tells what the template forked from this thread's children
    # that were here before. A thread that never forked has none (a pool's spawner thread
    # starts here): ~0.1 ms less before the template's fork.
    before = _children(me) if forked_here() else set()
    if before is None or not _have_children_file():
        return "no /proc/self/task/<tid>/children here"
    bounds = _chunks(len(procs))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    own_fd(ours.fileno())
    own_fd(theirs.fileno())
    supervisor = os.getpid()
    multiprocessing.util._flush_std_streams()  # type: ignore[attr-defined]
    # The first worker's pipes, as multiprocessing's fork Popen makes them.
    pipes: list[int] = []
    try:
        pipes += os.pipe()
        pipes += os.pipe()
    except OSError:
        for fd in pipes:
            os.close(fd)
        for sock in (ours, theirs):
            disown_fd(sock.fileno())
            sock.close()
        raise
    parent_r, child_w, child_r, parent_w = pipes
    # Each worker claims its keeper slot first thing, before it can start anything (see
    # corral._keeper): the template's and the clones' alike. This thread's own: the template's
    # only thread is its copy (two pools may start at once, on two spawner threads).
    _tls.keeper_slots = slots = keeper.reserve(len(procs))
    try:
        with forking(keeper_slot=slots[0]):
            pid = os.fork()
    except BaseException:
        for slot in slots:
            keeper.release(slot)
        for sock in (ours, theirs):
            disown_fd(sock.fileno())
            sock.close()
        for fd in (parent_r, child_w, child_r, parent_w):
            os.close(fd)
        raise
    if pid == 0:  # the template, then the first worker
        code = 1
        try:
            ours.close()
            os.close(parent_r)
            os.close(parent_w)
            if _template(theirs, procs, supervisor, facts, prepare, bounds, (child_r, child_w)):
                os.close(theirs.fileno())  # (never used again: we end with os._exit)
                code = run_forked(procs[0], child_r)
        finally:
            _exit(code)
    os.close(child_w)
    os.close(child_r)
    disown_fd(theirs.fileno())
    theirs.close()
    started: dict[int, tuple[int, int, int]] = {0: (pid, parent_r, parent_w)}
    ended: dict[int, int] = {}
    try:
        reason = _receive(ours, len(procs), len(bounds), started, ended)
    except Exception as exc:  # whatever it is, the batch falls back
        reason = f"{type(exc).__name__}: {exc}"
    finally:
        disown_fd(ours.fileno())
        ours.close()
    if reason is not None:
        # A forker that did not end its chunk may be stuck: it goes, and its worker is
        # started the ordinary way.
        for chunk, (lo, _) in enumerate(bounds):
            if chunk not in ended and lo in started:
                _kill(*started.pop(lo))
    elif any(ended.values()):
        errno = next(e for e in ended.values() if e)
        reason = f"a fork failed ({os.strerror(errno) if errno > 0 else 'error'})"
    if reason is not None:
        _sweep(me, before | {p for p, _, _ in started.values()})
    for i, slot in enumerate(slots):
        if i in started:
            keeper.adopt(slot, started[i][0])
        else:
            keeper.release(slot)  # never forked, or killed and reaped with its forker
    for i, (child, r, w) in sorted(started.items()):
        _adopt(procs[i], child, r, w)
        take(i, procs[i])
    return reason


def _receive(sock: socket.socket, n: int, chunks: int,
             started: dict[int, tuple[int, int, int]], ended: dict[int, int]) -> str | None:
    """Take the template's reports until every chunk has ended: None, or what went wrong."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    size = _MSG.size + 8 * _PER_MSG
    while len(ended) < chunks:
        if not poller.poll(int(TIMEOUT * 1000)):
            return f"no word from the template for {TIMEOUT:g} s"
        msg, fds, _, _ = socket.recv_fds(sock, size, 2 * _PER_MSG, socket.MSG_CMSG_CLOEXEC)
        if len(msg) < _MSG.size:
            for fd in fds:
                os.close(fd)
            return "the template ended early"
        kind, chunk, count = _MSG.unpack_from(msg)
        ok = 0 <= chunk < chunks and chunk not in ended
        if (ok and kind == _WORKERS and 0 < count <= _PER_MSG
                and len(msg) == _MSG.size + 8 * count and len(fds) == 2 * count):
            pairs = struct.unpack_from(f"={2 * count}i", msg, _MSG.size)
            indexes = pairs[0::2]
            if all(0 < i < n and i not in started for i in indexes) \
                    and len(set(indexes)) == count:
                for k, i in enumerate(indexes):
                    started[i] = (pairs[2 * k + 1], fds[2 * k], fds[2 * k + 1])
                continue
        elif ok and kind == _END and not fds and len(msg) == _MSG.size:
            ended[chunk] = count
            continue
        for fd in fds:
            os.close(fd)
        return "a malformed message from the template"
    return None


def _adopt(proc: multiprocessing.process.BaseProcess, pid: int, parent_r: int,
           parent_w: int) -> None:
    """What Process.start() records once its Popen exists (corral keeps its processes out of
    multiprocessing's _children, see WorkerProcess.start)."""
    popen = ClonedPopen(pid, parent_r, parent_w)
    proc._popen = popen  # type: ignore[attr-defined]
    proc._sentinel = popen.sentinel  # type: ignore[attr-defined]
    for attr in ("_target", "_args", "_kwargs"):
        with contextlib.suppress(AttributeError):
            delattr(proc, attr)


def _kill(pid: int, parent_r: int, parent_w: int) -> None:
    """SIGKILL and reap our child ``pid`` (a stuck forker), close its pipe ends."""
    log.warning("killing pid %d, a start template that did not finish", pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    os.close(parent_r)
    os.close(parent_w)


_children_file: bool | None = None


def _have_children_file() -> bool:
    """Whether this kernel lists a thread's children in /proc (asked once)."""
    global _children_file
    if _children_file is None:
        _children_file = os.path.exists(f"/proc/self/task/{threading.get_native_id()}/children")
    return _children_file


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
