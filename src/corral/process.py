"""A running worker process: start, signal (its group too), wait object, reap, exit decoding.

Every OS call the monitor and the pool make about a process goes through a :class:`ProcessLike`
(a :class:`WorkerProcess` here), so their state machines are driven by a fake in unit tests
(``tests/unit/fakes.py``). Also: the supervisor's own fds that fork children close
(:func:`own_fd`), reading stack dumps, and small process facts (:func:`pid_running`,
:func:`wait_exit`).
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # (no stubs)
import contextlib
import errno
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import os
import select
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from multiprocessing.context import BaseContext
from typing import Any, Protocol

from corral._forklocks import logging_held
from corral._keeper import keeper
from corral.exitstatus import ExitStatus

__all__ = [
    "DUMP_NAME",
    "DUMP_SIGNAL",
    "ProcessLike",
    "WorkerHandle",
    "WorkerProcess",
    "close_internal_fds",
    "disown_fd",
    "forked_here",
    "forking",
    "kill_unregistered",
    "open_dump_fd",
    "own_fd",
    "pid_running",
    "settle",
    "usable_cpus",
    "wait_exit",
]

# The signal on which every worker's bootstrap registers faulthandler's C-level handler, writing
# all threads' stacks into a memfd; rarely used by applications.
DUMP_SIGNAL = signal.SIGRTMIN + 3
# The name of a worker's stack-dump memfd (``/proc/<pid>/fd/<n>`` reads "/memfd:<name> (deleted)").
DUMP_NAME = "corral-dump"

# Raw fds the supervising process opened for its own use (wakeup pipes, pidfds, multiprocessing's
# pipes to each child, the heartbeat table): a worker started with fork inherits them all, and
# closes them first thing (close_internal_fds), so it holds no sibling's fds. Only raw ints are
# registered: an fd owned by a Python object (an epoll, a Connection) could be closed a second
# time by that object in the child, after the number was reused; those are one per pool.
# Each such fd is recorded with its identity, so a number reused before the child closes it is
# kept (_checked_fds). A worker's own pidfd and pipes (three per worker: most of them) are
# recorded without one, as their owner releases them before they can be closed (see
# WorkerProcess): they are flags in a table indexed by fd number (_released_fds), which a child
# scans for runs of consecutive numbers in C and closes with one close_range each. (An fstat
# and a close each made the start of the 128th worker 0.6 ms slower than the first's; a dict of
# Python ints cost every fork child a copied page for each few ints it touched.)
_checked_fds: dict[int, tuple[int, int]] = {}
_released_fds = bytearray()


def own_fd(fd: int, *, released_by_owner: bool = False) -> int:
    """Mark ``fd`` as the supervisor's own: fork-started workers close it. Returns ``fd``.

    Args:
        released_by_owner: the owner calls :func:`disown_fd` before the fd can be closed, on
            every path (including its own garbage collection): no identity check is needed.
    """
    flags = _released_fds
    if released_by_owner:
        if fd >= len(flags):
            flags.extend(bytes(max(fd + 1, 2 * len(flags), 64) - len(flags)))
        flags[fd] = 1
        _checked_fds.pop(fd, None)
        return fd
    try:
        st = os.fstat(fd)
    except OSError:
        return fd
    if fd < len(flags):
        flags[fd] = 0
    _checked_fds[fd] = (st.st_dev, st.st_ino)
    return fd


def disown_fd(fd: int) -> None:
    """Forget ``fd`` (call before closing it, so a worker never closes a reused number)."""
    if fd < len(_released_fds):
        _released_fds[fd] = 0
    _checked_fds.pop(fd, None)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity call on this system
        return os.cpu_count() or 1


def close_internal_fds(keep: tuple[int, ...] = ()) -> None:
    """In a fork-started worker: close the supervisor's own fds it inherited."""
    for fd, ident in list(_checked_fds.items()):
        if fd in keep:
            continue
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == ident:
            with contextlib.suppress(OSError):
                os.close(fd)
    _checked_fds.clear()
    flags = _released_fds
    start = flags.find(1)
    while start >= 0:
        end = flags.find(0, start)
        if end < 0:
            end = len(flags)
        for fd in sorted(fd for fd in keep if start <= fd < end):
            if start < fd:
                os.closerange(start, fd)
            start = fd + 1
        if start < end:
            os.closerange(start, end)
        start = flags.find(1, end)
    flags.clear()


def open_dump_fd(pid: int, fd: int) -> int | None:
    """An fd of this process on ``pid``'s stack-dump memfd (its fd ``fd``), or None if that
    number is not corral's memfd any more.

    A worker may close its fds and open its own files: the number faulthandler writes to could
    then be a user's file, which must never receive (or be read as) a stack dump. The name is
    checked before the open (a user's FIFO or device is never opened) and again through the
    opened fd, so what is checked is what is read.
    """
    memfd = f"/memfd:{DUMP_NAME}"
    try:
        if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith(memfd):
            return None
        ours = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if os.readlink(f"/proc/self/fd/{ours}").startswith(memfd):
            return ours
    except OSError:
        pass
    os.close(ours)
    return None

def _popen_fds(process: multiprocessing.process.BaseProcess) -> tuple[int, ...]:
    """The fds multiprocessing keeps in the parent for ``process`` (closed by its finalizer)."""
    popen = getattr(process, "_popen", None)
    fds: set[int] = set()
    sentinel = getattr(popen, "sentinel", None)
    if isinstance(sentinel, int):
        fds.add(sentinel)
    # Popen_fork: Finalize(self, util.close_fds, (parent_r, parent_w)).
    args = getattr(getattr(popen, "finalizer", None), "_args", None)
    if isinstance(args, tuple):
        fds.update(fd for fd in args if isinstance(fd, int) and not isinstance(fd, bool))
    return tuple(fds)


_forking = threading.local()
# Blocked across a fork whose child runs Python (_signal's set of ints: signal's makes enums).
_ALL_SIGNALS = _signal.valid_signals()
# The stdin of this process's fork children: /dev/null, made once here and never read here (so
# no thread of ours can hold its lock at a fork), with (st_dev, st_ino) to notice a program that
# closed it. The fd is never closed by the object (a reused number must stay the program's).
_spare_lock = threading.Lock()
_spare_stdin: tuple[Any, tuple[int, int]] | None = None
# In a fork child: that stdin, until the worker's bootstrap takes it (take_stdin).
_child_stdin: Any = None


@contextlib.contextmanager
def forking(python_child: bool = True, keeper_slot: int = 0) -> Iterator[None]:
    """Around a fork on this thread: the child gets a fresh stdin (see below), and, if it runs
    Python (the fork start method), no write of corral's logging half done (see
    :mod:`corral._forklocks`), and it claims ``keeper_slot`` (see
    :meth:`corral._keeper._Keeper.reserve`) before anything else."""
    _make_spare_stdin()
    _forking.active = True
    _forking.forked = True
    _forking.keeper_slot = keeper_slot
    mask = None
    parent = os.getpid()
    try:
        if python_child:
            # The child is born with every signal blocked: until its bootstrap has reset the
            # handlers it inherited (the program's own), a signal would run one of them in the
            # worker. It unblocks them then (a stop signal sent meanwhile is delivered to the
            # defaults).
            mask = _signal.pthread_sigmask(signal.SIG_BLOCK, _ALL_SIGNALS)
            with logging_held():
                yield
        else:
            yield
    finally:
        _forking.active = False
        _forking.keeper_slot = 0
        if mask is not None and os.getpid() == parent:
            _signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def forked_here() -> bool:
    """Whether corral has forked on this thread (through :func:`forking`) before."""
    return bool(getattr(_forking, "forked", False))


def _make_spare_stdin() -> None:
    global _spare_stdin
    with _spare_lock:
        if _spare_stdin is not None:
            try:
                st = os.fstat(_spare_stdin[0].fileno())
                if (st.st_dev, st.st_ino) == _spare_stdin[1]:
                    return
            except (OSError, ValueError):
                pass
        try:
            fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            st = os.fstat(fd)
            _spare_stdin = (open(fd, encoding="utf-8", closefd=False),  # noqa: SIM115
                            (st.st_dev, st.st_ino))
        except OSError:
            _spare_stdin = None  # (out of fds: the child opens its own)


def _after_fork_in_child() -> None:
    # multiprocessing's fork child closes sys.stdin first thing; if another thread of the
    # supervisor was blocked reading stdin at fork time, that object's lock is held forever in
    # the child and the worker deadlocks. The child gets the spare (made before the fork), and
    # multiprocessing sees None, so it neither closes it nor opens /dev/null once more (two
    # text streams made in every new process: ~0.3 ms of page faults); the worker's bootstrap
    # takes it back (take_stdin) before the program's code runs.
    global _spare_lock, _spare_stdin, _child_stdin
    _spare_lock = threading.Lock()  # another thread may have held it at the fork
    _forget_parents_forkserver()
    if getattr(_forking, "active", False):
        _forking.active = False
        # Its group is known to the keeper before it can start anything (a supervisor killed
        # right after this fork still has it killed).
        keeper.claim(getattr(_forking, "keeper_slot", 0))
        spare, _spare_stdin = _spare_stdin, None  # this process makes its own for its children
        _child_stdin = (spare[0] if spare is not None
                        else open(os.devnull, encoding="utf-8"))  # noqa: SIM115
        sys.stdin = None
        # fd 0 too, as multiprocessing's close-and-reopen would have left it: else whatever the
        # worker starts (a subprocess inherits fd 0) reads the supervisor's terminal or pipe.
        with contextlib.suppress(OSError, ValueError):
            if _child_stdin.fileno() != 0:
                os.dup2(_child_stdin.fileno(), 0)


def _forget_parents_forkserver() -> None:
    """In any fork child: forget the forkserver multiprocessing started for the parent.

    It is not this process's child: multiprocessing would ``waitpid`` it (ChildProcessError)
    and every forkserver start here would fail, a pool counting each failure as a crash. A
    forkserver start here now starts this process's own; our copy of the parent's server's
    "alive" pipe is closed, so this process never keeps that server alive.
    """
    module = sys.modules.get("multiprocessing.forkserver")
    server = getattr(module, "_forkserver", None)
    if server is None or getattr(server, "_forkserver_pid", None) is None:
        return
    alive = getattr(server, "_forkserver_alive_fd", None)
    if isinstance(alive, int):
        with contextlib.suppress(OSError):
            os.close(alive)
    server._forkserver_address = None
    server._forkserver_alive_fd = None
    server._forkserver_pid = None
    server._inherited_fds = None
    server._lock = threading.Lock()  # another thread may have held it at the fork


def take_stdin() -> None:
    """In a fork-started worker, first thing: its stdin back (once: a process it forks later,
    a pool of its own say, gets one of its own)."""
    global _child_stdin
    if _child_stdin is not None:
        sys.stdin, _child_stdin = _child_stdin, None


os.register_at_fork(after_in_child=_after_fork_in_child)


class ProcessLike(Protocol):
    """What the monitor and the pool use of a process (a :class:`WorkerProcess`, or a fake)."""

    pid: int
    started: float  # monotonic
    started_wall: float  # time.time()
    exit: ExitStatus | None
    stop_sent: int | None

    def waitable(self) -> int: ...

    def send(self, sig: int) -> bool: ...

    def send_group(self, sig: int) -> bool: ...

    def send_stop(self, sig: int) -> None: ...

    def kill_group_leftovers(self) -> None: ...

    def kill_and_reap(self, timeout: float = 5.0) -> None: ...

    def reap(self) -> ExitStatus | None: ...

    def close(self) -> None: ...


def pid_running(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (never reaps anything)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def wait_exit(pid: int, timeout: float | None = None) -> None:
    """Wait until ``pid`` has exited (at most ``timeout`` seconds), without reaping it: a pidfd
    becomes readable when the process ends, so there is no polling loop."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return  # already gone
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if timeout is None:
            poller.poll(None)
            return
        # In slices of a day at most: poll() takes an int of milliseconds.
        deadline = time.monotonic() + timeout
        while not poller.poll(max(0, int(min(deadline - time.monotonic(), 86400.0) * 1000))):
            if time.monotonic() >= deadline:
                return
    finally:
        os.close(fd)


class GroupSignals:
    """Signalling a worker and its process group, a stop signal once: shared by every
    ``ProcessLike`` corral starts (a worker, a command, a zygote's child)."""

    pid: int
    exit: ExitStatus | None
    stop_sent: int | None  # the signal corral already sent the group to stop it
    _pidfd: int

    def _group_is_ours(self) -> bool:
        """The pid still names the worker's group (no one else reaped the worker)."""
        return True

    def send(self, sig: int) -> bool:
        """Signal the worker process alone. False if it is already gone."""
        if self.exit is not None:
            return False
        try:
            if self._pidfd >= 0:
                signal.pidfd_send_signal(self._pidfd, sig)
            else:
                os.kill(self.pid, sig)
            return True
        except ProcessLookupError:
            return False

    def send_group(self, sig: int) -> bool:
        """Signal the worker's process group (its children too); falls back to the worker
        (not a group leader yet while booting, or the group is empty)."""
        if self.exit is None and self._group_is_ours():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)
                return True
        return self.send(sig)

    def send_stop(self, sig: int) -> None:
        """Send the stop signal to the group once (then SIGCONT, so a stopped process handles
        it); a second stop request for the same signal, or any after SIGKILL, sends nothing."""
        if self.stop_sent == sig or self.stop_sent == signal.SIGKILL:
            return
        self.stop_sent = sig
        self.send_group(sig)
        if sig != signal.SIGKILL:
            self.send_group(signal.SIGCONT)

    def kill_group_leftovers(self) -> None:
        """SIGKILL what is left of the worker's group once the worker itself has exited."""
        if self._group_is_ours():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)


def _release_fds(owner: int, pidfd: int, mp_fds: tuple[int, ...]) -> None:
    """A WorkerProcess's close(), or its garbage collection without one: disown its fds (before
    multiprocessing's own finalizer closes its pipes), close its pidfd."""
    if os.getpid() != owner:
        return  # a forked child: these numbers are not its own
    for fd in mp_fds:
        disown_fd(fd)
    if pidfd >= 0:
        disown_fd(pidfd)
        with contextlib.suppress(OSError):
            os.close(pidfd)


# Seconds the monitor waits for the forkserver to report the status of a process whose
# pidfd said it exited (the forkserver reaps it at once; this only bounds a stopped one).
FORKSERVER_STATUS_WAIT = 0.2


class WorkerProcess(GroupSignals):
    """One process of one worker. Created and started by the spawner thread."""

    def __init__(self, process: multiprocessing.process.BaseProcess, start_method: str, *,
                 settle: bool = True) -> None:
        self.process = process
        self.start_method = start_method
        self.pid: int = process.pid or 0
        self.started = time.monotonic()
        self.started_wall = time.time()
        self._pidfd = -1
        self.exit: ExitStatus | None = None
        # The signal corral already sent the group to stop it (so it is not sent twice).
        self.stop_sent: int | None = None
        try:
            self._pidfd = own_fd(os.pidfd_open(self.pid), released_by_owner=True)
        except OSError:
            pass  # already gone and reaped (forkserver): the sentinel still tells us
        # multiprocessing's pipes to this child (its sentinel, and under fork the write end
        # whose EOF tells the child we died): a sibling started later must not hold them.
        self._mp_fds = _popen_fds(process)
        for fd in self._mp_fds:
            own_fd(fd, released_by_owner=True)
        # Whatever is left in the group dies with this process, however it ends.
        keeper.register(self.pid)
        self._release: weakref.finalize[Any, Any] | None = None
        if settle:
            self.settle()

    def settle(self) -> None:
        """The rest of the start, which can wait until the spawner's batch has been forked: the
        group set from this side and the finalizer of the fds (once; before anyone else sees
        the process).

        Under fork, every page the supervisor writes between two forks is copied once for
        each of them (copy on write), so the spawner does as little as it can between forks
        (see :class:`corral._spawner.Spawner`).
        """
        if self._release is not None:
            return
        # close() runs it; dropped without close() (a bug), the GC does: either way the fds are
        # disowned before they can be closed, so a reused number is never taken for ours.
        self._release = weakref.finalize(self, _release_fds, os.getpid(), self._pidfd,
                                         self._mp_fds)
        self._release.atexit = False  # at exit the monitor may still be using them
        try:
            # Both sides set the group, so a kill right after start already reaches it.
            os.setpgid(self.pid, self.pid)
        except OSError:
            pass

    @classmethod
    def start(cls, ctx: BaseContext, target: Any, args: tuple[Any, ...], name: str,
              daemon: bool, *, settle: bool = True,
              slot_args: Callable[[int, str], tuple[Any, ...]] | None = None,
              ) -> WorkerProcess:
        """Start ``target(*args)`` in a new process; ``settle=False`` leaves :meth:`settle` to
        the caller (a spawner that forks a batch first).

        Args:
            slot_args: under spawn and forkserver, ``args`` rebuilt to carry the keeper slot
                reserved for the child and the table's path, so that the child claims the
                slot itself before it can start anything (a fork child claims it in corral's
                after-fork): a supervisor killed before :meth:`_Keeper.adopt` still has the
                child's group killed.
        """
        python_child = ctx.get_start_method() == "fork"
        slot = 0
        if python_child:
            slot = keeper.reserve()[0]
        elif slot_args is not None:
            slot = keeper.reserve()[0]
            path = keeper.table_path() if slot else None
            if path is not None:
                args = slot_args(slot, path)
        proc = ctx.Process(target=target, args=args, name=name, daemon=daemon)  # type: ignore[attr-defined]
        try:
            with forking(python_child, slot if python_child else 0):
                proc.start()
        except BaseException:
            keeper.release(slot)
            raise
        keeper.adopt(slot, proc.pid)
        # multiprocessing polls (and so reaps) every child it knows of whenever any process is
        # started; take ours out of that set so only the monitor reaps it.
        multiprocessing.process._children.discard(proc)  # type: ignore[attr-defined]
        return cls(proc, ctx.get_start_method(), settle=settle)

    def waitable(self) -> int:
        """What becomes ready when the process has exited: its pidfd.

        Not multiprocessing's sentinel: under fork and spawn a pipe that grandchildren may
        inherit (open after the worker died); under forkserver a pipe from the forkserver,
        which closes when the forkserver ends (a failed start can end it) with the worker alive,
        and says nothing while the forkserver is stopped. The sentinel only if no pidfd could
        be had.
        """
        if self._pidfd < 0:
            return self.process.sentinel
        return self._pidfd

    def kill_and_reap(self, timeout: float = 5.0) -> None:
        """SIGKILL the process and its group, wait for it (well under a millisecond), reap it
        and release it: for a process nobody wants (a start that came too late, an emergency).
        """
        self.send_group(signal.SIGKILL)
        multiprocessing.connection.wait([self.waitable()], timeout=timeout)
        self.kill_group_leftovers()
        self.reap()
        self.close()

    def reap(self) -> ExitStatus | None:
        """Collect the exit status if the process has ended (non-blocking)."""
        if self.exit is not None:
            return self.exit
        popen = getattr(self.process, "_popen", None)
        if self.start_method != "forkserver" and popen is not None:
            try:
                result = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG)
            except ChildProcessError:
                # Our own child, yet not ours to wait for: someone else collected it, so it
                # has exited. Through multiprocessing, the code is known; through the host's
                # os.wait()/waitpid(-1) (a generic SIGCHLD reaper), it is lost for good, and
                # waiting on would never end (the pidfd stays readable).
                code = popen.returncode
                self.exit = (ExitStatus.unknown_status() if code is None
                             else ExitStatus.from_returncode(code))
            else:
                if result is None:
                    return None
                if result.si_code == os.CLD_EXITED:
                    self.exit = ExitStatus(code=result.si_status)
                else:
                    self.exit = ExitStatus(signal=result.si_status,
                                           core_dumped=result.si_code == os.CLD_DUMPED)
                popen.returncode = self.exit.returncode  # keep Process.exitcode/is_alive right
        else:
            status = self._forkserver_status()
            if status is None:
                return None
            self.exit = status
        keeper.unregister(self.pid)  # reaped: its group id may be reused from now on
        return self.exit

    def _forkserver_status(self) -> ExitStatus | None:
        """The status the forkserver (the parent) sends once it has reaped the process; None
        while it runs. The forkserver reaps at once; one that has ended, or is stopped for
        longer than :data:`FORKSERVER_STATUS_WAIT`, never sends it: the status is unknown."""
        popen = getattr(self.process, "_popen", None)
        if popen is None:
            return None
        if popen.returncode is not None:
            return ExitStatus.from_returncode(popen.returncode)
        exited = self._pidfd >= 0 and bool(select.select([self._pidfd], [], [], 0)[0])
        if self._pidfd >= 0 and not exited:
            return None
        wait = FORKSERVER_STATUS_WAIT if exited else 0
        try:
            ready = multiprocessing.connection.wait([popen.sentinel], wait)
        except (OSError, ValueError):
            ready = []
        if ready:
            from multiprocessing import forkserver

            try:
                popen.returncode = forkserver.read_signed(popen.sentinel)
            except (EOFError, OSError):
                pass
            else:
                return ExitStatus.from_returncode(popen.returncode)
        elif not exited:
            return None
        return ExitStatus.unknown_status(
            "not reported by multiprocessing's forkserver, its parent (it ended, or is "
            "stopped)")

    def close(self) -> None:
        """Release the pidfd and multiprocessing's pipes (only after reaping)."""
        self.settle()  # (only if the spawner never did: a start that failed half-way)
        assert self._release is not None
        self._release()  # disowns the fds, closes the pidfd (once: a second call does nothing)
        self._pidfd = -1
        try:
            self.process.close()
        except ValueError:
            # multiprocessing still thinks it runs: reaped by someone else, status unknown
            # (see reap()). Release its sentinel all the same.
            popen = getattr(self.process, "_popen", None)
            if popen is not None and self.exit is not None:
                with contextlib.suppress(OSError):
                    popen.close()
        except OSError as exc:
            if exc.errno != errno.EBADF:
                raise


def kill_unregistered(process: multiprocessing.process.BaseProcess) -> None:
    """SIGKILL and reap our child ``process`` that never became a :class:`WorkerProcess`."""
    pid = process.pid
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        keeper.unregister(pid)  # a fork child is in the keeper's table from its first moment
    popen = getattr(process, "_popen", None)
    if popen is not None:
        popen.returncode = -signal.SIGKILL
        popen.close()


def settle(proc: object) -> None:
    """Finish the start of ``proc`` if it is a :class:`WorkerProcess` started unsettled."""
    if isinstance(proc, WorkerProcess):
        proc.settle()


class WorkerHandle:
    """A read-only, thread-safe view of one worker process, shaped like multiprocessing.Process.

    Given to health checks: ``pid``, ``name``, ``index``, ``is_alive()``, ``exitcode``. It never
    reaps (multiprocessing's ``is_alive()`` would, stealing the exit status from the monitor).
    """

    def __init__(self, proc: ProcessLike, index: int, name: str, daemon: bool = False) -> None:
        self._proc = proc
        self.index = index
        self.pid = proc.pid
        self.name = name
        self.daemon = daemon

    def is_alive(self) -> bool:
        if self._proc.exit is not None:
            return False
        return pid_running(self.pid)

    @property
    def exitcode(self) -> int | None:
        status = self._proc.exit
        return None if status is None else status.returncode

    def __repr__(self) -> str:
        state = "alive" if self.is_alive() else f"exitcode={self.exitcode}"
        return f"<WorkerHandle {self.name!r} index={self.index} pid={self.pid} {state}>"
