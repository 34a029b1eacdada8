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
from collections.abc import Mapping
from typing import Any

from corral.ray._backend import RayWorker, connect, validate_options

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
    """``start_process`` of a Ray pool: one actor per start (blocking: the spawner thread)."""

    def __init__(self, pool: str, target: Any, options: Mapping[str, Any] | None,
                 ready_on_beat: bool, start_timeout: float | None) -> None:
        self.pool = pool
        self.target = target
        self.options = validate_options(options)
        self.ready_on_beat = ready_on_beat
        self.start_timeout = 60.0 if start_timeout is None else start_timeout

    def __call__(self, req: Any) -> RayWorker:
        boot = req.boot
        return RayWorker.start(self.target, req.index, tuple(req.args), name=boot.name,
                               pool=self.pool, options=self.options,
                               ready_on_beat=self.ready_on_beat,
                               start_timeout=self.start_timeout)
