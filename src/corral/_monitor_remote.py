"""Liveness of remote workers (``backend="ray"``): probes instead of a shared heartbeat table.

A Ray actor may run on another machine, so the monitor cannot read its heartbeat slot. Instead
it asks every STARTING/RUNNING worker for a probe every ``interval`` (a quarter of the heartbeat
timeout, 0.1-1 s), at most one outstanding per worker, each timed out on the monitor's own clock,
and feeds the answers to a pure :class:`corral.ray.Liveness`: a worker whose beat sequence stood
still for ``heartbeat_timeout`` is hung; one whose probes stopped answering is killed at once. A
probe also carries readiness, the status text, the beat age and the RSS (for ``max_memory``).

A mixin of :class:`corral._monitor.Monitor`, on the monitor thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from corral._health import over_max_memory
from corral._slots import POOL, AfterStop, Deadline, DeadlineKey, WorkerSlot
from corral.events import Event, EventKind, ExitRecord, StopReason
from corral.states import WorkerState

if TYPE_CHECKING:
    from corral._reactor import DeadlineSpace
    from corral.spec import PoolSpec

    class _Core:
        spec: PoolSpec
        log: logging.Logger
        _slots: dict[int, WorkerSlot]
        _clock: Callable[[], float]
        _dl: DeadlineSpace[DeadlineKey]

        def _hand_over(self, fn: Callable[..., None], *args: Any) -> None: ...
        def _become_ready(self, w: WorkerSlot) -> None: ...
        def _stop_worker(self, w: WorkerSlot, reason: StopReason, after: AfterStop,
                         now: float, detail: str | None = None, dump: bool = False) -> None: ...
        def _kill(self, w: WorkerSlot, at_once: bool = False) -> None: ...
        def _emit(self, kind: EventKind, w: WorkerSlot | None, *,
                  exit: ExitRecord | None = None, delay: float | None = None,
                  message: str = "") -> Event: ...
else:
    _Core = object

__all__ = ["RemotePart"]

S = WorkerState


class RemotePart(_Core):
    """Probing remote workers."""

    def _remote_init(self) -> None:
        self._remote = self.spec.backend == "ray"
        if self._remote:
            from corral.ray._liveness import default_probe_interval

            self._probe_interval = default_probe_interval(self.spec.heartbeat_timeout)
            self._probe_timeout = max(1.0, 2 * self._probe_interval)

    def _remote_started(self, w: WorkerSlot, now: float) -> None:
        """A remote worker's process exists: watch it through probes from now on."""
        from corral.ray._liveness import Liveness

        w.liveness = Liveness(now, heartbeat_timeout=self.spec.heartbeat_timeout,
                              startup_timeout=self.spec.startup_timeout)
        w.probe = None
        w.remote = None
        when = self._dl.get((POOL, Deadline.PROBE))
        if when is None or when > now:
            self._dl.set((POOL, Deadline.PROBE), now)

    def _probe_round(self, now: float) -> None:
        from corral.ray._liveness import ProbeFailure

        any_watched = False
        for w in list(self._slots.values()):
            if w.proc is None or w.liveness is None or w.state not in (S.STARTING, S.RUNNING):
                continue
            any_watched = True
            pending = w.probe
            if pending is not None:
                future, sent = pending
                if now - sent < self._probe_timeout:
                    continue
                # No answer in time (a stopped actor never answers): a failure; ask again.
                w.probe = None
                w.liveness.on_failure(now, ProbeFailure.TIMEOUT)
                if self._judge(w, now):
                    continue
            future = w.proc.probe_future()  # type: ignore[attr-defined]
            w.probe = (future, now)
            generation = w.generation
            future.add_done_callback(lambda f, w=w, g=generation: self._hand_over(
                self._probe_result, w.index, g, f))
        if any_watched:
            self._dl.set((POOL, Deadline.PROBE), now + self._probe_interval)

    def _probe_result(self, index: int, generation: int, future: Future[Any]) -> None:
        from corral.ray._backend import ProbeReply
        from corral.ray._liveness import ProbeFailure

        w = self._slots.get(index)
        if (w is None or w.generation != generation or w.probe is None
                or w.probe[0] is not future or w.liveness is None):
            return  # abandoned (timed out), or its worker is gone
        w.probe = None
        now = self._clock()
        try:
            reply = ProbeReply.from_dict(future.result(), now)
        except Exception as exc:
            import ray

            if isinstance(exc, ray.exceptions.ActorUnavailableError):
                w.liveness.on_failure(now, ProbeFailure.UNAVAILABLE)
                self._judge(w, now)
            # Any other error means the actor is dead: its end comes through its waitable.
            return
        w.liveness.on_reply(now, reply.seq)
        w.remote = reply
        if reply.ready and w.state is S.STARTING:
            self._become_ready(w)
        limit = self.spec.max_memory
        if limit is not None and reply.rss > limit and w.state in (S.STARTING, S.RUNNING):
            self._stop_worker(w, StopReason.RECYCLED_MEMORY, AfterStop.RESTART, now,
                              detail=over_max_memory(reply.rss, limit))
            return
        self._judge(w, now)

    def _judge(self, w: WorkerSlot, now: float) -> bool:
        """Stop ``w`` if its probes say so; True if it was stopped."""
        verdict = w.liveness.verdict(now, starting=w.state is S.STARTING)
        if verdict is None or w.state not in (S.STARTING, S.RUNNING):
            return False
        self.log.warning("%s is %s (%s); stopping it", w.who, verdict.reason.value,
                         verdict.detail)
        self._emit(EventKind.UNHEALTHY, w, message=f"{verdict.reason.value}: {verdict.detail}")
        self._stop_worker(w, verdict.reason, AfterStop.POLICY, now, detail=verdict.detail)
        if not verdict.responsive:
            self._kill(w)  # nothing in it reads a stop request
        return True
