"""The keeper: a tiny process that kills the workers' process groups when the supervisor dies.

A worker dies with its supervisor through its parent-death signal, but that signal reaches the
worker alone: whatever the worker started (a subprocess, a shell pipeline) stays in its process
group and would be orphaned. Nothing the supervisor runs can help once it is SIGKILLed or calls
``os._exit()``, so one small helper per supervising process does it instead:

- it is started once, as a program of its own (exec'd: never a fork of a multi-threaded
  supervisor that goes on running Python), in a session of its own so a terminal's Ctrl-C
  does not reach it;
- the supervisor writes each worker's process group into a table in shared memory (a memfd the
  keeper holds) as the worker starts, and clears it once the worker has been reaped: a store of
  four bytes, no system call, and the keeper is never woken while the supervisor lives (a pipe
  message per start and per reap woke a second Python process on every restart, competing for
  the CPU with the replacement);
- it holds a pidfd of the supervisor (and the read end of a pipe whose write end only the
  supervisor holds); when either fires (the supervisor is gone, however it ended) it reads the
  table and SIGKILLs every group still in it, then exits.

If the supervisor ends cleanly every group has been cleared already and the keeper just exits.

A pool's start starts the keeper *gated*: ``/bin/sh`` waits on that pipe, and execs the keeper
(the same pid, its stdin still the table) once the supervisor writes a newline there, after the
pool's first starts are back, or at EOF, when the supervisor is gone. A Python interpreter's
own start (~10 ms of CPU on a 2-core VM) competed with the first workers' for the CPU (8 fork
workers' first start up ~5 ms); a shell costs ~0.7 ms. The groups are protected from the gate's
start on, with less in reserve: until the gate opens only the pipe's EOF tells of the
supervisor's death (no pidfd), and the keeper's interpreter starts then. Without a shell, or
without an absolute ``sys.executable``, the keeper starts at once.

The keeper never runs user code and imports nothing but the built-in ``_signal``, ``posix`` and
``sys`` and the small ``select``: ``os`` and ``signal`` (enum, functools, collections) doubled
the CPU its start costs, and that start competes with a pool's first workers for the CPU.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import signal
import subprocess
import sys
import threading

from corral.heartbeat import UNTRACKED

__all__ = ["KEEPER_ENV", "KEEPER_TITLE", "claim_slot", "keeper"]

log = logging.getLogger(__name__)

KEEPER_TITLE = "corral-keeper"

# The environment variable that marks a command started by this supervisor until its group is
# registered (see _Keeper.reserve_for_command).
KEEPER_ENV = "CORRAL_KEEPER"

# Runs in ``python -I -S``: argv[1] is the supervisor's pid, argv[2] the read end of a pipe only
# the supervisor writes to (EOF: it is gone; what is written there is the gate's, and read
# past), argv[3] the mark of this keeper's command starts
# (``CORRAL_KEEPER=<token>/``); stdin is the table: native int32 process group ids, 0 for a free
# slot, -1 for a slot reserved for a command being started: at the end the keeper looks in /proc
# for processes whose environment carries the mark and that slot's number.
_KEEPER_CODE = r"""# corral-keeper
import _signal, posix, select, sys
for s in (_signal.SIGINT, _signal.SIGHUP, _signal.SIGTERM, _signal.SIGPIPE):
    _signal.signal(s, _signal.SIG_IGN)
sup, gone = int(sys.argv[1]), int(sys.argv[2])
try:
    pidfd = posix.pidfd_open(sup)
except OSError:
    pidfd = -1
if posix.getppid() == sup:  # else it ended before this line
    poller = select.poll()
    if pidfd >= 0:
        poller.register(pidfd, select.POLLIN)
    poller.register(gone, select.POLLIN)
    while not any(fd != gone or not posix.read(gone, 64) for fd, _ in poller.poll()):
        pass
head = posix.pread(0, 4, 0)
used = int.from_bytes(head, sys.byteorder, signed=True) if len(head) == 4 else 0
pending = []
if used > 0:
    for i, g in enumerate(memoryview(posix.pread(0, 4 * used, 4)).cast("i"), 1):
        if g > 0:
            try:
                posix.killpg(g, _signal.SIGKILL)
            except OSError:
                pass
        elif g == -1:
            pending.append(b"\0" + sys.argv[3].encode() + b"%d\0" % i)
if pending:  # commands started, not yet registered: found by the marker in their environment
    for name in posix.listdir(b"/proc"):
        if not name.isdigit() or int(name) in (sup, posix.getpid()):
            continue
        try:
            fd = posix.open(b"/proc/" + name + b"/environ", posix.O_RDONLY)
        except OSError:
            continue
        parts = [b"\0"]
        try:
            while part := posix.read(fd, 65536):
                parts.append(part)
        except OSError:
            parts = []
        finally:
            posix.close(fd)
        env = b"".join(parts) + b"\0"
        if any(mark in env for mark in pending):
            pid = int(name)
            for kill in (posix.killpg, posix.kill):  # its group, if it leads one; then it
                try:
                    kill(pid, _signal.SIGKILL)
                except OSError:
                    pass
posix._exit(0)
"""

# The gate (``sh -c``): $0 the Python to exec, $1 the keeper's code, $2-$4 its argv. Signals
# ignored here stay ignored across the exec. ``read`` takes a pipe's bytes one at a time: the
# newline that opens the gate is consumed, nothing after it. The pipe is opened by its /proc
# path (dash's ``<&N`` takes one digit only) and whatever ``read`` meets (EOF, an error), the
# exec follows: a gate that fails opens (``set +e``: a bash that is /bin/sh would take errexit
# from an exported SHELLOPTS).
_GATE = ('set +e; trap "" INT HUP TERM PIPE; read -r _ <"/proc/self/fd/$3" || :; '
         'exec "$0" -I -S -c "$1" "$2" "$3" "$4"')
_SHELL = "/bin/sh"

# Slots in the table: far more process groups than one supervisor ever has at once. The memfd
# is sparse: only the pages of slots in use take memory.
_CAPACITY = 1 << 20


class _Keeper:
    """This process's handle on its keeper (one per supervising process, started on first use)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._table: memoryview | None = None
        self._slots: dict[int, int] = {}  # pgid -> its slot in the table
        self._free: list[int] = []  # slots cleared since, reused first
        self._next = 1  # the first slot never used ([0] holds how many have been)
        self._gone_w = -1  # the pipe the keeper sees close when this process ends
        self._pid = 0  # the supervising process the keeper protects
        self._failed = False
        self._gated = False  # the keeper waits at its gate (see open_gate)
        self._token = ""  # marks this supervisor's command starts (KEEPER_ENV)
        self._table_fd = 0  # the table's fd number in the keeper (its stdin, and this one)

    @property
    def pid(self) -> int | None:
        """The keeper's pid, or None if it is not running."""
        proc = self._proc
        return proc.pid if proc is not None and self._pid == os.getpid() else None

    def start(self, gated: bool = False) -> None:
        """Start the keeper if it is not running yet (cheap when it is).

        A keeper that cannot be started is logged once; supervision goes on without it.

        Args:
            gated: the keeper's Python starts only at :meth:`open_gate` (or once this process
                is gone): a pool opens it once its first starts are back, so that the keeper's
                start does not compete with theirs. Not gated: at once (and a gated keeper's
                gate is opened).
        """
        self._start(gated)
        if not gated:  # (whichever thread started it, and however)
            self.open_gate()

    def _start(self, gated: bool) -> None:
        if self._pid == os.getpid() and (self._proc is not None or self._failed):
            return
        with self._lock:
            if self._pid != os.getpid():
                self._reset()
            if self._proc is not None or self._failed:
                return
            # No shell (distroless), or no Python to name: no gate (a keeper that cannot start
            # is then seen here, and logged).
            gated = (gated and os.access(_SHELL, os.X_OK) and os.path.isabs(sys.executable)
                     and os.access(sys.executable, os.X_OK))
            mm: mmap.mmap | None = None
            fds: list[int] = []
            try:
                fds.append(os.memfd_create("corral-keeper", os.MFD_CLOEXEC))
                table_fd = fds[-1] = _past_stdio(fds[-1])
                os.ftruncate(table_fd, _CAPACITY * 4)
                mm = mmap.mmap(table_fd, _CAPACITY * 4, **UNTRACKED)
                gone_r, gone_w = os.pipe2(os.O_CLOEXEC)
                self._gone_w = gone_w
                fds.append(gone_r)
                gone_r = fds[-1] = _past_stdio(gone_r)
                # This end too: a daemon that gives itself stdio again (dup2 onto 0-2) would
                # close it, and the keeper would take that for this process's end.
                self._gone_w = _past_stdio(gone_w)
                self._token = f"{os.getpid()}.{os.urandom(6).hex()}"
                argv = [_KEEPER_CODE, str(os.getpid()), str(gone_r),
                        f"{KEEPER_ENV}={self._token}/"]
                # Before _proc: a start() on another thread that finds the keeper running
                # opens its gate (see the top of this method).
                self._gated = gated
                self._proc = subprocess.Popen(
                    [_SHELL, "-c", _GATE, sys.executable, *argv] if gated
                    else [sys.executable, "-I", "-S", "-c", *argv],
                    stdin=table_fd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    # The table also under its own number: at its gate the shell's stdin is
                    # the pipe while it reads (see table_path).
                    pass_fds=(gone_r, table_fd), close_fds=True, start_new_session=True)
                self._table_fd = table_fd
            except OSError as exc:
                self._failed = True
                self._gated = False
                if mm is not None:
                    mm.close()
                if self._gone_w >= 0:
                    os.close(self._gone_w)
                    self._gone_w = -1
                log.warning("could not start corral's keeper process (%s): the children of "
                            "workers may outlive a supervisor that is killed", exc)
                return
            finally:
                for fd in fds:
                    os.close(fd)
            self._table = memoryview(mm).cast("i")

    def open_gate(self) -> None:
        """Let a gated keeper start its Python now (once; cheap when there is nothing to do)."""
        if not self._gated:
            return
        with self._lock:
            if not self._gated or self._pid != os.getpid():
                return
            self._gated = False
            _write_unsignalled(self._gone_w, b"\n")

    def register(self, pgid: int) -> None:
        """Kill group ``pgid`` if this process dies before :meth:`unregister`."""
        if self._table is None or self._pid != os.getpid():
            self.start()  # pools start it up front; this covers any other caller
        table = self._table
        if table is None or self._pid != os.getpid():
            return
        with self._lock:
            if pgid in self._slots:
                return
            if self._free:
                slot = self._free.pop()
            elif self._next < _CAPACITY:
                slot, self._next = self._next, self._next + 1
                table[slot] = pgid
                table[0] = slot  # after the slot: the keeper never reads one half written
                self._slots[pgid] = slot
                return
            else:
                return  # a million live groups: the rest go unprotected
            self._slots[pgid] = slot
            table[slot] = pgid

    def reserve(self, n: int = 1) -> list[int]:
        """Slots for ``n`` processes about to be forked, each of which writes its own group
        into its slot first thing (:meth:`claim`, in the child), before it can start
        anything: a supervisor killed between the fork and :meth:`adopt` still has that group
        killed. 0 for each slot there is none for (no keeper: nothing to claim)."""
        if self._table is None or self._pid != os.getpid():
            self.start()
        table = self._table
        if table is None or self._pid != os.getpid():
            return [0] * n
        out = []
        with self._lock:
            for _ in range(n):
                if self._free:
                    out.append(self._free.pop())
                elif self._next < _CAPACITY:
                    slot, self._next = self._next, self._next + 1
                    table[slot] = 0
                    table[0] = slot  # the keeper reads slots up to here
                    out.append(slot)
                else:
                    out.append(0)
        return out

    def reserve_for_command(self) -> tuple[int, dict[str, str]]:
        """A slot for a command about to be started, and the environment entry to start it
        with. An exec'd program cannot claim its slot as a Python worker does (:meth:`claim`):
        the slot is marked, and if this process dies before :meth:`adopt` the keeper finds the
        program by the entry in its environment and kills its group. ``(0, {})``: no keeper.
        """
        slot = self.reserve(1)[0]
        table = self._table
        if slot <= 0 or table is None:
            return 0, {}
        table[slot] = -1
        return slot, {KEEPER_ENV: f"{self._token}/{slot}"}

    def table_path(self) -> str | None:
        """Where a spawn or forkserver child opens the table to claim its slot
        (:func:`claim_slot`): the table's fd in the keeper, through /proc. None if it is not
        running."""
        proc = self._proc
        if proc is None or self._table is None or self._pid != os.getpid():
            return None
        return f"/proc/{proc.pid}/fd/{self._table_fd}"

    def claim(self, slot: int) -> None:
        """In the forked child, first thing: its group (its pid: it leads its own) into the
        slot its parent reserved. One store into the shared table, no lock (the parent does
        not touch the slot until :meth:`adopt`, which stores the same value)."""
        table = self._table
        if slot > 0 and table is not None:
            table[slot] = os.getpid()

    def adopt(self, slot: int, pgid: int) -> None:
        """In the supervisor, after the fork: the reserved ``slot`` holds group ``pgid`` (as
        :meth:`register`, which then finds it there)."""
        table = self._table
        if slot <= 0 or table is None or self._pid != os.getpid():
            self.register(pgid)
            return
        with self._lock:
            old = self._slots.get(pgid)
            if old is not None and old != slot:  # (cannot happen: one slot per new process)
                table[old] = 0
                self._free.append(old)
            self._slots[pgid] = slot
            table[slot] = pgid

    def release(self, slot: int) -> None:
        """A reserved slot whose process was never started (or was killed and reaped before
        it was adopted): free it."""
        table = self._table
        if slot <= 0 or table is None or self._pid != os.getpid():
            return
        with self._lock:
            if slot not in self._slots.values():
                table[slot] = 0
                self._free.append(slot)

    def unregister(self, pgid: int) -> None:
        """Group ``pgid`` is gone (its leader was reaped): forget it."""
        table = self._table
        if table is None or self._pid != os.getpid():
            return
        with self._lock:
            slot = self._slots.pop(pgid, None)
            if slot is not None:
                table[slot] = 0
                self._free.append(slot)

    def _forked(self) -> None:
        """In a forked child: only what cannot wait (a lock another thread may have held at the
        fork, the pipe's write end); the rest is dropped at first use (:meth:`_reset`), since
        freeing the parent's table of groups here touched dozens of shared pages in every
        fork-started worker."""
        self._lock = threading.Lock()
        self._gated = False
        if self._gone_w >= 0:
            with contextlib.suppress(OSError):
                os.close(self._gone_w)
            self._gone_w = -1

    def _reset(self) -> None:
        # A forked child of a supervisor: the keeper protects the parent, not us. Drop the
        # inherited handles without touching the parent's keeper or its table (the mapping is
        # shared: one store here would change what the parent's keeper kills).
        proc = self._proc
        if proc is not None:
            proc.returncode = 0  # not ours to wait for: keep Popen.__del__ from trying
        if self._gone_w >= 0:
            with contextlib.suppress(OSError):
                os.close(self._gone_w)
        self._proc, self._table, self._gone_w, self._failed = None, None, -1, False
        self._gated = False
        self._token = ""
        self._slots, self._free, self._next = {}, [], 1
        self._lock = threading.Lock()  # another thread may have held it at the fork
        self._pid = os.getpid()


def _write_unsignalled(fd: int, data: bytes) -> None:
    """Write ``data`` to pipe ``fd``, whose reader may be gone (a keeper killed by someone):
    neither an error nor a SIGPIPE, even where the program restored SIGPIPE's default (which
    would end it). Blocked on this thread, a SIGPIPE the write raises stays pending there, and
    is taken before the mask is restored."""
    if signal.getsignal(signal.SIGPIPE) is signal.SIG_IGN:  # Python's default
        with contextlib.suppress(OSError):
            os.write(fd, data)
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGPIPE})
    try:
        os.write(fd, data)
    except BrokenPipeError:
        signal.sigtimedwait({signal.SIGPIPE}, 0)
    except OSError:
        pass
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _past_stdio(fd: int) -> int:
    """``fd``, or a copy of it numbered 3 or more (the original closed): passed to the keeper
    under its own number, it must not be one the keeper's stdio replaces (a supervisor started
    with its stdio closed gets its first new fds there)."""
    if fd > 2:
        return fd
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)  # (raises: ``fd`` is still open)
    os.close(fd)
    return new


def claim_slot(path: str, slot: int) -> None:
    """In a spawn or forkserver child, first thing: its group (its pid: it leads its own) into
    the slot its supervisor reserved, through the table's path (:meth:`_Keeper.table_path`);
    the child does not share the supervisor's mapping. A table that cannot be opened (the
    keeper is gone) is skipped: the supervisor registers the group all the same."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.pwrite(fd, os.getpid().to_bytes(4, sys.byteorder, signed=True), 4 * slot)
    except OSError:
        pass
    finally:
        os.close(fd)


keeper = _Keeper()
keeper._pid = os.getpid()


def _after_fork_in_child() -> None:
    keeper._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)
