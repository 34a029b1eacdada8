"""Restart policy, backoff and the restart budget: pure functions of time, no processes.

Everything here takes the current time as an argument, so it is tested with a fake clock.
"""

from __future__ import annotations

import enum
import math
import random
from collections import deque
from dataclasses import dataclass, field

from corral import _validate as v

__all__ = ["Backoff", "BackoffState", "BudgetWindow", "RestartBudget", "RestartPolicy",
           "Strategy"]


class RestartPolicy(enum.Enum):
    """When a worker that exited by itself is started again (OTP's vocabulary in brackets)."""

    ALWAYS = "always"  # permanent
    ON_FAILURE = "on-failure"  # transient: not after a clean exit 0
    NEVER = "never"  # temporary

    @classmethod
    def parse(cls, value: RestartPolicy | str) -> RestartPolicy:
        if isinstance(value, RestartPolicy):
            return value
        if isinstance(value, str):
            for member in cls:
                if member.value == value.replace("_", "-").lower():
                    return member
        raise ValueError(
            "restart must be one of 'always', 'on-failure', 'never' (or a RestartPolicy), "
            f"got {value!r}"
        )

    def wants_restart(self, *, clean_exit: bool) -> bool:
        if self is RestartPolicy.ALWAYS:
            return True
        if self is RestartPolicy.ON_FAILURE:
            return not clean_exit
        return False


class Strategy(enum.Enum):
    """Which workers a failure restarts (OTP's supervision strategies, by worker index)."""

    ONE_FOR_ONE = "one_for_one"  # the failed worker alone
    ONE_FOR_ALL = "one_for_all"  # every worker (one rank's death invalidates the others)
    REST_FOR_ONE = "rest_for_one"  # the failed worker and every worker of a higher index

    @classmethod
    def parse(cls, value: Strategy | str) -> Strategy:
        if isinstance(value, Strategy):
            return value
        if isinstance(value, str):
            for member in cls:
                if member.value == value.replace("-", "_").lower():
                    return member
        raise ValueError(
            "strategy must be one of 'one_for_one', 'one_for_all', 'rest_for_one' (or a "
            f"Strategy), got {value!r}")


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff between restarts of one worker.

    The n-th failure in a row (n >= 1) waits ``min(cap, initial * multiplier**(n-1))``, spread by
    +/- ``jitter`` (a fraction) so that a pool does not restart in lockstep. A worker that ran for
    at least ``reset_after`` seconds before it died is restarted at once and its streak starts over
    (``reset_after=math.inf`` never resets: every restart waits).

    Args:
        initial: delay after the first quick failure, seconds.
        multiplier: growth factor, >= 1.
        cap: the longest delay, seconds.
        jitter: fraction in [0, 1) of random spread around each delay.
        reset_after: uptime, seconds, after which a death counts as a fresh start.
    """

    initial: float = 0.1
    multiplier: float = 2.0
    cap: float = 30.0
    jitter: float = 0.1
    reset_after: float = 10.0

    def __post_init__(self) -> None:
        v.number("Backoff.initial", self.initial)
        v.number("Backoff.multiplier", self.multiplier, minimum=1.0)
        v.number("Backoff.cap", self.cap)
        if self.cap < self.initial:
            raise ValueError(
                f"Backoff.cap must be >= Backoff.initial ({self.initial!r}), got {self.cap!r}"
            )
        v.number("Backoff.jitter", self.jitter)
        if self.jitter >= 1:
            raise ValueError(f"Backoff.jitter must be a fraction in [0, 1), got {self.jitter!r}")
        v.number("Backoff.reset_after", self.reset_after, allow_inf=True)

    def base_delay(self, streak: int) -> float:
        """The delay before jitter for the ``streak``-th quick failure in a row (0 = none)."""
        if streak <= 0:
            return 0.0
        initial, multiplier, cap = self.initial, self.multiplier, self.cap
        if initial == 0.0 or multiplier == 1.0:
            return min(cap, initial)
        # Compare in log space, so a long streak never computes a huge power.
        if (streak - 1) * math.log(multiplier) >= math.log(cap / initial):
            return cap
        return min(cap, initial * multiplier ** (streak - 1))

    def delay(self, streak: int, rng: random.Random | None = None) -> float:
        base = self.base_delay(streak)
        if base == 0.0 or self.jitter == 0.0:
            return base
        r = (rng or random).uniform(-self.jitter, self.jitter)
        return max(0.0, base * (1.0 + r))


@dataclass
class BackoffState:
    """One worker's failure streak (mutable; owned by the monitor)."""

    backoff: Backoff
    streak: int = 0

    def restarts_at_once(self, uptime: float) -> bool:
        """True if :meth:`on_death` after ``uptime`` would return no delay (nothing changes)."""
        return uptime >= self.backoff.reset_after

    def on_death(self, uptime: float, rng: random.Random | None = None) -> float:
        """Record a death after ``uptime`` seconds; return the delay before the restart."""
        if uptime >= self.backoff.reset_after:
            # A long healthy run: this is a fresh failure, restart at once.
            self.streak = 0
            return 0.0
        self.streak += 1
        return self.backoff.delay(self.streak, rng)


@dataclass(frozen=True)
class RestartBudget:
    """At most ``max_restarts`` failure restarts in any ``window`` seconds, pool-wide.

    One more and the pool gives up (OTP's intensity and period). ``max_restarts=None`` never
    gives up.
    """

    max_restarts: int | None = 20
    window: float = 60.0

    def __post_init__(self) -> None:
        if self.max_restarts is not None:
            v.integer("RestartBudget.max_restarts", self.max_restarts)
        v.number("RestartBudget.window", self.window, strict=True)


@dataclass
class BudgetWindow:
    """The sliding window of restart times that a :class:`RestartBudget` is checked against."""

    budget: RestartBudget
    times: deque[float] = field(default_factory=deque)

    def try_spend(self, now: float) -> bool:
        """Count a restart at ``now``; False if it is over the budget (nothing is recorded)."""
        limit = self.budget.max_restarts
        if limit is None:
            return True
        horizon = now - self.budget.window
        while self.times and self.times[0] <= horizon:
            self.times.popleft()
        if len(self.times) >= limit:
            return False
        self.times.append(now)
        return True

    def allows(self, now: float) -> bool:
        """True if :meth:`try_spend` at ``now`` would succeed (nothing is recorded)."""
        limit = self.budget.max_restarts
        if limit is None:
            return True
        horizon = now - self.budget.window
        return sum(1 for t in self.times if t > horizon) < limit

    def remaining(self, now: float) -> int | None:
        """Restarts still allowed at ``now`` (None: no limit)."""
        limit = self.budget.max_restarts
        if limit is None:
            return None
        horizon = now - self.budget.window
        return limit - sum(1 for t in self.times if t > horizon)
