"""Decoding how a process ended: exit code, or signal name and core dump, with a likely cause."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

__all__ = ["ExitStatus", "signal_name"]

# Likely causes, for log lines and error messages.
_SIGNAL_HINTS = {
    signal.SIGKILL: "perhaps the OOM killer, or someone ran kill -9",
    signal.SIGSEGV: "a crash in native code (a C extension or ctypes)",
    signal.SIGBUS: "a crash in native code, or a truncated memory-mapped file",
    signal.SIGABRT: "abort() in native code, or a failed assertion in a C library",
    signal.SIGFPE: "an arithmetic fault in native code",
    signal.SIGILL: "an illegal instruction in native code",
    signal.SIGPIPE: "it wrote to a closed pipe or socket",
}
_CODE_HINTS = {
    # 1 is Python's uncaught exception and most programs' "it failed": name both.
    1: "an uncaught exception in Python, or a program's general failure (see its stderr)",
    2: "a usage error, or a SystemExit(2)",
    126: "a shell found the command but could not run it (not executable, or a directory)",
    127: "a shell did not find the command (not in PATH, or a missing #! interpreter)",
    120: "an error while flushing stdout/stderr at interpreter exit",
    137: "a shell or launcher reported SIGKILL (perhaps the OOM killer)",
}


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


_UNKNOWN_HINT = ("reaped by another part of the program: os.wait() or os.waitpid(-1, ...) "
                 "collected it first")


@dataclass(frozen=True)
class ExitStatus:
    """How one process ended. At most one of ``code`` and ``signal`` is set.

    Neither is set when the status is unknown (``unknown``): the process has exited, but
    another part of the program collected its status first (``os.wait()``,
    ``os.waitpid(-1, ...)``, a generic SIGCHLD reaper), so nobody can read it any more.
    """

    code: int | None = None
    signal: int | None = None
    core_dumped: bool = False
    # Why the status is unknown, when it is not "reaped elsewhere" (a Ray actor: Ray does not
    # say which signal ended it).
    why_unknown: str | None = None

    @classmethod
    def from_returncode(cls, returncode: int, core_dumped: bool = False) -> ExitStatus:
        """From a multiprocessing/subprocess style returncode (negative = killed by signal)."""
        if returncode < 0:
            return cls(signal=-returncode, core_dumped=core_dumped)
        return cls(code=returncode)

    @classmethod
    def from_wait_status(cls, status: int) -> ExitStatus:
        """From a raw ``os.waitpid`` status."""
        if os.WIFSIGNALED(status):
            return cls(signal=os.WTERMSIG(status), core_dumped=os.WCOREDUMP(status))
        return cls(code=os.waitstatus_to_exitcode(status))

    @classmethod
    def unknown_status(cls, why: str | None = None) -> ExitStatus:
        """A process that has exited, with a status nobody can read (by default: reaped
        elsewhere; ``why`` says otherwise)."""
        return cls(why_unknown=why)

    @property
    def unknown(self) -> bool:
        return self.code is None and self.signal is None

    @property
    def clean(self) -> bool:
        return self.code == 0

    @property
    def returncode(self) -> int | None:
        """multiprocessing/subprocess style: the code, or minus the signal; None if unknown."""
        if self.signal is not None:
            return -self.signal
        return self.code

    @property
    def signal_name(self) -> str | None:
        return None if self.signal is None else signal_name(self.signal)

    @property
    def hint(self) -> str | None:
        if self.unknown:
            return self.why_unknown or _UNKNOWN_HINT
        if self.signal is not None:
            return _SIGNAL_HINTS.get(signal.Signals(self.signal)) if self.signal in set(
                signal.Signals) else None
        return _CODE_HINTS.get(self.code or 0)

    def describe(self) -> str:
        """``exit code 1`` / ``SIGSEGV(-11), core dumped`` / ``unknown exit status``."""
        if self.unknown:
            return "unknown exit status"
        if self.signal is not None:
            text = f"{self.signal_name}(-{self.signal})"
            return text + (", core dumped" if self.core_dumped else "")
        return f"exit code {self.code}"

    def __str__(self) -> str:
        return self.describe()
