"""Is a remote worker alive and making progress? Decided from its probe replies, on our clock.

A Ray actor may run on another machine, so its heartbeat stamps are on that machine's monotonic
clock and cannot be compared with ours. What can be compared is whether its beat sequence moved
between two probes: :class:`Liveness` notes, on the supervisor's monotonic clock, when a reply
first showed a new sequence, and calls the worker hung once the sequence has stood still for
``heartbeat_timeout``. A probe that gets no answer (a stopped process, a GIL held by native code,
a partitioned node) or one that Ray calls unavailable counts as a failure; ``max_probe_failures``
in a row make the worker unresponsive, whatever its heartbeat said before.

Pure: no clock of its own, no Ray, no threads. Every method takes ``now`` from the caller.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from corral.events import StopReason

__all__ = ["Liveness", "ProbeFailure", "Verdict", "default_probe_interval"]


class ProbeFailure(enum.Enum):
    TIMEOUT = "timeout"  # no answer within the probe timeout
    UNAVAILABLE = "unavailable"  # Ray's ActorUnavailableError: unreachable for now


@dataclass(frozen=True)
class Verdict:
    """Why a worker must be stopped.

    Attributes:
        reason: HUNG (no progress, or no answer) or STARTUP_TIMEOUT (never beat / not ready).
        responsive: its probes still answer, so a stack dump and a cooperative stop are worth
            asking for; False means kill it at once (nothing in it will read a request).
        detail: what was seen, for the exit record and the log.
    """

    reason: StopReason
    responsive: bool
    detail: str


def default_probe_interval(heartbeat_timeout: float | None) -> float:
    """How often to probe: a quarter of the timeout (a hang is seen by timeout + interval),
    between 0.1 s and 1 s; 1 s without a heartbeat timeout (probes then only find a worker
    that stopped answering)."""
    if heartbeat_timeout is None:
        return 1.0
    return min(1.0, max(0.1, heartbeat_timeout / 4))


class Liveness:
    """One worker's liveness, from the probe replies the supervisor receives.

    Args:
        started: our monotonic time when the worker's process started.
        heartbeat_timeout: seconds without a new beat sequence that make it hung (None: beats
            are not required).
        startup_timeout: grace before the worker must be ready / have beaten (None: one
            heartbeat timeout for the first beat, as the local monitor does).
        max_probe_failures: failed probes in a row that make it unresponsive (>= 1).

    Raises:
        ValueError: a timeout that is not positive, or max_probe_failures < 1.
    """

    def __init__(self, started: float, *, heartbeat_timeout: float | None,
                 startup_timeout: float | None = None, max_probe_failures: int = 3) -> None:
        for what, value in (("heartbeat_timeout", heartbeat_timeout),
                            ("startup_timeout", startup_timeout)):
            if value is not None and not value > 0:
                raise ValueError(f"{what} must be a positive number of seconds or None, "
                                 f"got {value!r}")
        if isinstance(max_probe_failures, bool) or not isinstance(max_probe_failures, int) or \
                max_probe_failures < 1:
            raise ValueError(f"max_probe_failures must be an int >= 1, got "
                             f"{max_probe_failures!r}")
        self.started = started
        self.heartbeat_timeout = heartbeat_timeout
        self.startup_timeout = startup_timeout
        self.max_probe_failures = max_probe_failures
        self.seq: float | None = None  # the last beat sequence seen (0: never beat)
        self.last_progress = started  # our time of the first reply that showed self.seq
        self.last_reply: float | None = None
        self.failures = 0  # failed probes in a row
        self.last_failure: ProbeFailure | None = None

    @property
    def beaten(self) -> bool:
        return self.seq is not None and self.seq != 0

    def on_reply(self, now: float, seq: float) -> None:
        """A probe answered with beat sequence ``seq`` (0: the worker never beat)."""
        if seq != self.seq:
            if seq != 0:
                self.last_progress = now
            self.seq = seq
        self.last_reply = now
        self.failures = 0
        self.last_failure = None

    def on_failure(self, now: float, kind: ProbeFailure) -> None:
        """A probe timed out, or Ray said the actor is unavailable."""
        self.failures += 1
        self.last_failure = kind

    def due(self, *, starting: bool = False) -> float | None:
        """Our time at which :meth:`verdict` turns, if no new sequence arrives before (None:
        never, by time alone; probe failures are counted as they come)."""
        hbt, sut = self.heartbeat_timeout, self.startup_timeout
        if starting and sut is not None:
            return self.started + sut  # in its startup grace only the grace counts
        if hbt is None:
            return None
        if self.beaten:
            return self.last_progress + hbt
        return self.started + (sut if sut is not None else hbt)

    def verdict(self, now: float, *, starting: bool = False) -> Verdict | None:
        """Whether the worker must be stopped now, and why (None: it is fine).

        Args:
            starting: the worker is not ready yet (the monitor's STARTING state).
        """
        if self.failures >= self.max_probe_failures:
            what = ("unreachable (Ray: actor unavailable)"
                    if self.last_failure is ProbeFailure.UNAVAILABLE else "not answering")
            since = "" if self.last_reply is None else \
                f", last answer {now - self.last_reply:.1f}s ago"
            return Verdict(StopReason.HUNG, False,
                           f"{what}: {self.failures} probes in a row failed{since}")
        due = self.due(starting=starting)
        if due is None or now < due:
            return None
        if self.beaten and not (starting and self.startup_timeout is not None):
            return Verdict(StopReason.HUNG, True,
                           f"no heartbeat for {now - self.last_progress:.3f}s (beat sequence "
                           f"unchanged)")
        what = "not ready" if starting else "no heartbeat"
        return Verdict(StopReason.STARTUP_TIMEOUT, True,
                       f"{what} {now - self.started:.3f}s after start")
