"""corral on Ray: a worker as a Ray actor, watched by corral (optional extra ``corral[ray]``).

Nothing here imports Ray until it is used: ``import corral`` never does, and ``import
corral.ray`` does not either. The pieces, for the monitor to drive:

- :class:`RayWorker` (``_backend``): a process-like handle: start, probe, send_stop, kill,
  stop(grace), and an ``on_exit(worker, ActorExit)`` callback when the actor ends.
- :class:`WorkerActor` (``_actor``): the actor: ``run()`` runs the target with corral's
  worker API working; ``probe()``/``request_stop()``/``stacks()`` answer in a "ctl" group.
- :class:`Liveness` (``_liveness``): pure; hung or unresponsive, from probe replies.
- :class:`ActorExit` / :func:`decode` (``_exit``): Ray's death causes in corral's vocabulary.
- ``_pool`` / ``_pool_actor``: ``ProcessPool(backend="ray")``, its manager and its actor
  (reached through :class:`corral.ProcessPool`, not from here).

Measured facts about Ray behind this design: ``NOTES.md`` beside this file.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from corral.ray._actor import RayBoot, StopRequested, WorkerActor
    from corral.ray._backend import (
        ProbeFailed,
        ProbeReply,
        RayStartFailed,
        RayWorker,
        Spare,
        connect,
        validate_options,
    )
    from corral.ray._exit import ActorExit, DeathCause, decode
    from corral.ray._liveness import Liveness, ProbeFailure, Verdict, default_probe_interval

_LAZY = {
    "RayBoot": "corral.ray._actor",
    "StopRequested": "corral.ray._actor",
    "WorkerActor": "corral.ray._actor",
    "ProbeFailed": "corral.ray._backend",
    "ProbeReply": "corral.ray._backend",
    "RayStartFailed": "corral.ray._backend",
    "RayWorker": "corral.ray._backend",
    "Spare": "corral.ray._backend",
    "connect": "corral.ray._backend",
    "validate_options": "corral.ray._backend",
    "ActorExit": "corral.ray._exit",
    "DeathCause": "corral.ray._exit",
    "decode": "corral.ray._exit",
    "Liveness": "corral.ray._liveness",
    "ProbeFailure": "corral.ray._liveness",
    "Verdict": "corral.ray._liveness",
    "default_probe_interval": "corral.ray._liveness",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'corral.ray' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "ActorExit",
    "DeathCause",
    "Liveness",
    "ProbeFailed",
    "ProbeFailure",
    "ProbeReply",
    "RayBoot",
    "RayStartFailed",
    "RayWorker",
    "Spare",
    "StopRequested",
    "Verdict",
    "WorkerActor",
    "connect",
    "decode",
    "default_probe_interval",
    "validate_options",
]
