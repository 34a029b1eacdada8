"""Evidence from a hung worker: a stack dump of every thread, taken before it is killed.

Every worker's bootstrap registers faulthandler's C-level handler on :data:`DUMP_SIGNAL`, writing
into a memfd (see :mod:`corral._bootstrap`); it runs even when the interpreter is stuck. The
supervisor sends the signal (and SIGCONT, so a stopped worker can run the handler), then looks at
the memfd's size every :data:`STEP` seconds until it stops growing, at most :data:`LIMIT`
seconds, and reads the text.

The memfd is opened once, through ``/proc/<pid>/fd/<n>``, and checked on that open file before
the signal: every later look goes through it, never through the number again. A worker that
closes its fds and opens files of its own meanwhile can get the rest of the dump written into
its file (faulthandler writes to a number), but its file is never read as the dump.

One collector with one set of timing constants serves the supervisor and the process pool.
"""

from __future__ import annotations

import contextlib
import os
import signal
import weakref
from typing import Protocol

from corral.process import DUMP_SIGNAL, disown_fd, open_dump_fd, own_fd

__all__ = ["LIMIT", "NOT_OURS", "STEP", "StackDump"]

STEP = 0.005  # how often a dump is checked for completion (only while one is being taken)
LIMIT = 0.1  # the longest a hung worker may take to write its dump

NOT_OURS = "(no stack dump: the worker closed or replaced corral's dump file, fd {fd})"
NOTHING = "(no stack dump: the process could not run the handler, e.g. it was stopped)"


class Signalable(Protocol):
    """What a dump needs of a process (a :class:`corral.process.WorkerProcess`, or a fake)."""

    @property
    def pid(self) -> int: ...

    def send(self, sig: int) -> bool: ...


def _close(fd: int, pid: int) -> None:
    if os.getpid() != pid:
        return  # a fork child's copy: the number was closed at its start, may be reused since
    disown_fd(fd)
    with contextlib.suppress(OSError):
        os.close(fd)


class StackDump:
    """One dump being taken: :meth:`begin`, then :meth:`poll` every :data:`STEP` seconds.
    Holds an fd of its own on the memfd until the dump is read (or the object is dropped)."""

    __slots__ = ("__weakref__", "_close", "fd", "proc", "size", "started")

    def __init__(self, proc: Signalable, fd: int, now: float) -> None:
        self.proc = proc
        self.fd = fd  # ours: the memfd, opened through /proc
        self.started = now
        self.size = -1
        self._close = weakref.finalize(self, _close, own_fd(fd, released_by_owner=True),
                                       os.getpid())
        self._close.atexit = False

    @classmethod
    def begin(cls, proc: Signalable, fd: int, now: float) -> StackDump | str:
        """Ask ``proc`` for a dump into its memfd ``fd``.

        Returns:
            The dump being taken, or why there will be none (a note for the exit record): the
            worker has no handler yet, or closed or replaced the memfd (a dump would land in a
            user's file), or it is already gone.
        """
        if fd < 0:
            return "(no stack dump: the worker has no dump handler, not set up yet or failed)"
        ours = open_dump_fd(proc.pid, fd)
        if ours is None:
            return NOT_OURS.format(fd=fd)
        dump = cls(proc, ours, now)
        if not proc.send(DUMP_SIGNAL):
            dump.close()
            return "(no stack dump: the worker was already gone)"
        proc.send(signal.SIGCONT)  # a SIGSTOPped worker can still run the C handler
        return dump

    def poll(self, now: float, limit: int = 256 * 1024) -> str | None:
        """The dump's text once it is complete (or the limit passed), else None: look again
        after :data:`STEP` seconds. Once the text is returned, the fd is closed."""
        try:
            size = os.fstat(self.fd).st_size
        except OSError:
            size = 0
        if not (size > 0 and size == self.size) and now - self.started < LIMIT:
            self.size = size
            return None
        try:
            text = os.pread(self.fd, limit, 0).decode("utf-8", "replace")
        except OSError:
            text = ""
        self.close()
        return text or NOTHING

    def close(self) -> None:
        """Let go of the memfd (idempotent; dropping the object does it too)."""
        self._close()
