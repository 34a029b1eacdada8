"""The pool's brakes: the restart budget, backoff between failed starts, and when to give up.

Policy on a clock the caller passes in: the manager reports each unplanned exit and each failed
start, and learns whether to start again now, later, or never (:class:`Break`: the pool is
broken). The log lines about failed starts are written here, once each.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from dataclasses import dataclass

from corral._fdlimit import explain_fd_error
from corral.events import ExitRecord
from corral.exitstatus import ExitStatus
from corral.policy import BackoffState, BudgetWindow
from corral.pool._records import PoolConfig

__all__ = ["HISTORY", "BootFailure", "Brakes", "Break", "last_line"]

log = logging.getLogger("corral.procpool")

HISTORY = 10  # exits quoted when the pool breaks


def last_line(text: str) -> str:
    """The last non-empty line of a traceback: ``ValueError: the message``."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else text


@dataclass(frozen=True, slots=True)
class Break:
    """The pool must break: the message of its :class:`~corral.pool.PoolBroken`, and its
    ``__cause__``."""

    message: str
    cause: BaseException | None = None


@dataclass(frozen=True, slots=True)
class BootFailure:
    """A worker that died before it was ready, as the manager saw it."""

    pid: int
    status: ExitStatus
    how: str  # its status described, with a likely cause
    record: ExitRecord
    init_error: str | None  # its initializer's traceback, or its stack at a startup timeout
    init_summary: str | None  # the traceback's last line, if its initializer raised
    init_exc: BaseException | None  # what its initializer raised (if it could be pickled)


class Brakes:
    """Restart budget, start backoff and the "twice the same way" rule of one pool.

    Example: after two workers whose initializer raised ``KeyError: 'x'``, the second report
    returns ``Break("... failed the same way in two new workers in a row: KeyError: 'x'")``:
    the pool breaks at once instead of spending its whole budget on a failure that repeats.
    """

    def __init__(self, cfg: PoolConfig, rng: random.Random | None = None) -> None:
        self._cfg = cfg
        self._budget = BudgetWindow(cfg.budget)
        self._backoff = BackoffState(cfg.backoff)
        self._rng = rng or random.Random()
        self.history: deque[ExitRecord] = deque(maxlen=HISTORY)  # the last unplanned exits
        # The last worker that could not start because of its initializer (or a startup
        # timeout): quoted when the budget runs out.
        self._last_init_error: str | None = None
        # How the last worker that could not start failed; a worker that boots clears it.
        # Example: "exit: exit code 1".
        self._last_start_failure: str | None = None

    @property
    def streak(self) -> int:
        """Failed starts in a row."""
        return self._backoff.streak

    def booted(self) -> None:
        """A worker said hello: a crash loop is over."""
        self._backoff.streak = 0
        self._last_start_failure = None

    def _same_twice(self, key: str, reason: str, cause: BaseException | None,
                    record: ExitRecord) -> Break | None:
        # An initializer that raises, or arguments that cannot reach the worker, fail the same
        # way every time: retrying until the budget runs out only delays the error.
        if key != self._last_start_failure:
            self._last_start_failure = key
            return None
        self.history.append(record)
        return Break(f"pool {self._cfg.name!r} is broken: {reason}", cause)

    def start_error(self, error: BaseException, record: ExitRecord) -> Break | None:
        """A worker process could not be started at all (the error the start raised)."""
        what = explain_fd_error(error)  # the text, and the fd limit when it was hit
        # An OSError (no memory, process or fd limits) may pass; anything else (pickling the
        # initializer's arguments, say) fails the same way every time.
        if not isinstance(error, OSError):
            verdict = self._same_twice(what, f"a worker could not be started ({what})", error,
                                       record)
            if verdict is not None:
                return verdict
        log.error("pool %r: could not start a worker: %s", self._cfg.name, what)
        return None

    def boot_failure(self, f: BootFailure, broken: bool) -> Break | None:
        """A worker died before its hello: log why; a Break if that breaks the pool."""
        name = self._cfg.name
        if not f.init_error:
            if f.status.code and not broken:
                verdict = self._same_twice(
                    f"exit: {f.how}", f"two new workers in a row died while starting: {f.how}. "
                    "Their stderr says why (an import error, most likely).", None, f.record)
                if verdict is not None:
                    return verdict
            log.error("pool %r: worker pid %d died while starting: %s", name, f.pid, f.how)
            return None
        self._last_init_error = f.init_error
        if broken:
            log.debug("pool %r: worker pid %d could not start either: %s", name, f.pid,
                      last_line(f.init_error))
            return None
        if f.init_summary is not None:
            verdict = self._same_twice(
                f"initializer: {f.init_summary}", "its initializer failed the same way in two "
                f"new workers in a row: {f.init_summary}", f.init_exc, f.record)
            if verdict is not None:
                return verdict
            # The traceback is logged here, once: a second failure like it breaks the pool
            # with a one-line summary. (The drop-in's workers log it themselves, as
            # concurrent.futures' do.)
            log.warning("pool %r: worker pid %d could not start: its initializer raised %s; "
                        "trying a new worker%s", name, f.pid, f.init_summary,
                        "" if self._cfg.drop_in else "\n" + f.init_error.rstrip())
        else:  # a startup timeout, with a stack dump
            log.error("pool %r: worker pid %d could not start (%s): %s", name, f.pid, f.how,
                      f.init_error.rstrip())
        return None

    def charge(self, record: ExitRecord, now: float, boot: bool) -> float | Break:
        """An unplanned exit: spend from the budget.

        Returns:
            The seconds to wait before the next start (0: at once; only a worker that never
            booted is backed off), or a Break if the budget is used up.
        """
        self.history.append(record)
        if not self._budget.try_spend(now):
            return Break(self._budget_message())
        return self._backoff.on_death(record.uptime, self._rng) if boot else 0.0

    def _budget_message(self) -> str:
        budget = self._cfg.budget
        lines = "\n".join("  " + r.describe() for r in self.history)
        message = (f"pool {self._cfg.name!r} is broken: its workers died more than "
                   f"{budget.max_restarts} times within {budget.window:g}s (the restart "
                   f"budget). Last exits:\n{lines}")
        if self._last_init_error:
            message += ("\nThe last worker that could not start: "
                        f"{self._last_init_error.rstrip()}")
        return message
