"""What a pool's workers are plugged into beyond the process itself: log pipes, a notify socket,
readiness probes. The monitor calls a :class:`WorkerIO` on its loop thread; the corral command
provides one (``corral.cli.runner``), the library runs without (workers inherit its stdout)."""

from __future__ import annotations

from typing import Protocol

from corral._command import Launch
from corral.process import ProcessLike

__all__ = ["Launch", "WorkerIO"]


class WorkerIO(Protocol):
    def launch(self, index: int, name: str) -> Launch | None:
        """Before a start: the pipes and environment this start of worker ``index`` gets."""

    def started(self, index: int, name: str, proc: ProcessLike, launch: Launch) -> None:
        """The process exists: read its pipes, watch its notify socket, probe its readiness."""

    def not_started(self, launch: Launch) -> None:
        """The start failed or was not wanted: release what :meth:`launch` made."""

    def ended(self, index: int, pid: int) -> None:
        """Its process was reaped: stop probing; its pipes drain to their end."""

    def close(self) -> None:
        """The pool has finished."""
