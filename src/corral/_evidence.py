"""Evidence from a hung worker: a stack dump of every thread, taken before it is killed.

Every worker's bootstrap registers faulthandler's C-level handler on :data:`DUMP_SIGNAL`, writing
into a memfd (see :mod:`corral._bootstrap`); it runs even when the interpreter is stuck. The
supervisor sends the signal (and SIGCONT, so a stopped worker can run the handler), then looks at
the memfd's size every :data:`STEP` seconds until it stops growing, at most :data:`LIMIT`
seconds, and reads the text through ``/proc/<pid>/fd/<n>`` while the worker still exists.

One collector with one set of timing constants serves the supervisor and the process pool.
"""

from __future__ import annotations

import signal
from typing import Protocol

from corral.process import (
    DUMP_SIGNAL,
    dump_fd_is_ours,
    read_stack_dump,
    stack_dump_size,
)

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


class StackDump:
    """One dump being taken: :meth:`begin`, then :meth:`poll` every :data:`STEP` seconds."""

    __slots__ = ("fd", "proc", "size", "started")

    def __init__(self, proc: Signalable, fd: int, now: float) -> None:
        self.proc = proc
        self.fd = fd
        self.started = now
        self.size = -1

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
        if not dump_fd_is_ours(proc.pid, fd):
            return NOT_OURS.format(fd=fd)
        if not proc.send(DUMP_SIGNAL):
            return "(no stack dump: the worker was already gone)"
        proc.send(signal.SIGCONT)  # a SIGSTOPped worker can still run the C handler
        return cls(proc, fd, now)

    def poll(self, now: float) -> str | None:
        """The dump's text once it is complete (or the limit passed), else None: look again
        after :data:`STEP` seconds."""
        size = stack_dump_size(self.proc.pid, self.fd)
        if not (size > 0 and size == self.size) and now - self.started < LIMIT:
            self.size = size
            return None
        return read_stack_dump(self.proc.pid, self.fd) or NOTHING
