"""What the monitor uses to run a pool on Ray (``PoolSpec(backend="ray")``).

- :class:`RayStarter`: the monitor's ``start_process`` (on its spawner thread): one actor per
  worker start, with the pool's ``ray_options``; a :class:`~corral.ray.RayWorker` is the
  ``ProcessLike`` the monitor holds.
- :func:`attach` / :func:`detach`: the pool's use of the Ray driver. The first pool of this
  process connects (to the cluster ``ray.init(address=...)`` or ``RAY_ADDRESS`` names, else a
  local one); the local cluster it started is shut down when the last pool using it stops.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Mapping
from typing import Any

from corral.ray._backend import RayWorker, Spare, connect, validate_options

__all__ = ["RayStarter", "attach", "detach"]

log = logging.getLogger(__name__)

_lock = threading.Lock()
_users = 0
_started_here = False


def attach() -> None:
    """One more pool uses Ray in this process: connect (or start a local cluster) if needed.

    Raises:
        ImportError: Ray is not installed (``pip install corral[ray]``).
    """
    global _users, _started_here
    with _lock:
        if _users == 0:
            _started_here = connect()
        _users += 1


def detach() -> None:
    """A pool stopped using Ray; the last one shuts down a local cluster corral started."""
    global _users, _started_here
    with _lock:
        _users = max(0, _users - 1)
        if _users == 0 and _started_here:
            import ray

            _started_here = False
            ray.shutdown()


class RayStarter:
    """``start_process`` of a Ray pool: one actor per start (blocking: the spawner thread).

    With ``spares=K`` it keeps K actors made ahead (``PoolSpec(standby=K)``): a start then
    hands the target to one of them (one call, ~10 ms on one node) instead of waiting for
    Ray to start a worker process (~0.25 s), and a new spare is made in the background. A
    spare holds the resources ``ray_options`` ask for, as a running worker does.
    """

    def __init__(self, pool: str, target: Any, options: Mapping[str, Any] | None,
                 ready_on_beat: bool, start_timeout: float | None, spares: int = 0) -> None:
        self.pool = pool
        self.target = target
        self.options = validate_options(options)
        self.ready_on_beat = ready_on_beat
        self.start_timeout = 60.0 if start_timeout is None else start_timeout
        self.spares = spares
        self._ready: deque[Spare] = deque()
        self._making = 0
        self._closed = False
        self._lock = threading.Lock()

    def __call__(self, req: Any) -> RayWorker:
        boot = req.boot
        with self._lock:
            spare = self._ready.popleft() if self._ready else None
        try:
            return RayWorker.start(self.target, req.index, tuple(req.args), name=boot.name,
                                   pool=self.pool, options=self.options,
                                   ready_on_beat=self.ready_on_beat,
                                   start_timeout=self.start_timeout, spare=spare)
        finally:
            self.refill()

    def refill(self) -> None:
        """Start making spares until ``spares`` exist or are on their way."""
        with self._lock:
            wanted = 0 if self._closed else self.spares - len(self._ready) - self._making
            self._making += max(0, wanted)
        for _ in range(wanted):
            # A daemon thread each: making one blocks up to the start timeout, and must not
            # hold the spawner (nor interpreter exit).
            threading.Thread(target=self._make_one, name=f"corral-ray-spare[{self.pool}]",
                             daemon=True).start()

    def _make_one(self) -> None:
        spare: Spare | None = None
        try:
            spare = RayWorker.make_spare(self.options, self.start_timeout,
                                         who=f"a spare actor of pool {self.pool!r}")
        except Exception as exc:
            log.warning("pool %r: a spare Ray actor could not be made (%s); workers start "
                        "without one meanwhile", self.pool, exc)
        with self._lock:
            self._making -= 1
            keep = spare is not None and not self._closed
            if keep:
                assert spare is not None
                self._ready.append(spare)
        if spare is not None and not keep:
            _discard(spare)

    def close(self) -> None:
        """Kill the spares (the pool stopped); ones still being made are killed when ready."""
        with self._lock:
            self._closed = True
            spares, self._ready = list(self._ready), deque()
        for spare in spares:
            _discard(spare)


def _discard(spare: Spare) -> None:
    import ray

    try:
        ray.kill(spare.actor, no_restart=True)
    except Exception as exc:
        log.debug("could not kill a spare actor (pid %s): %s", spare.pid, exc)
