"""The versioned JSON shapes of `corral status --json`, events and logs (docs/json-schema.md).

The supervisor side builds them with these functions, the CLI reads them; both import this
module, so the shape lives in one place. It imports no CLI library, and is loaded with corral
(by :mod:`corral._eventlog`): the monitor thread formats events for its log records, and an
import there, at the first event, could fail when the process is out of fds.
"""

from __future__ import annotations

import datetime
import time
from typing import Any

from corral.events import Event, ExitRecord, StopReason
from corral.status import WorkerStatus

__all__ = [
    "EVENT_SCHEMA",
    "LOG_SCHEMA",
    "STATUS_SCHEMA",
    "command_event",
    "event_to_json",
    "exit_to_json",
    "program_to_json",
    "status_payload",
    "worker_to_json",
]

_DUMPED = (StopReason.HUNG, StopReason.STARTUP_TIMEOUT)

STATUS_SCHEMA = "corral.status/1"
LOG_SCHEMA = "corral.log/1"  # the version every JSON log line carries (docs/json-schema.md)
EVENT_SCHEMA = "corral.event/1"


def exit_to_json(rec: ExitRecord | None) -> dict[str, Any] | None:
    if rec is None:
        return None
    ex = rec.exit
    return {
        "code": ex.code if ex else None,
        "signal": ex.signal_name if ex else None,
        "signum": ex.signal if ex else None,
        "core_dumped": bool(ex and ex.core_dumped),
        "reason": rec.reason.value,
        "by_corral": rec.reason.by_corral,
        "at": rec.at,
        "uptime": round(rec.uptime, 3),
        "pid": rec.pid,
        "description": rec.describe(),
        "detail": rec.detail,
    }


def worker_to_json(ws: WorkerStatus, *, rss: int | None = None,
                   cpu_percent: float | None = None) -> dict[str, Any]:
    return {
        "index": ws.index,
        "name": ws.name,
        "pid": ws.pid,
        "state": ws.state.value,
        "ready": ws.ready,
        "restarts": ws.restarts,
        "started_at": ws.started_at,
        "uptime": round(ws.uptime, 3),
        "heartbeat_age": None if ws.heartbeat_age is None else round(ws.heartbeat_age, 3),
        "status_text": ws.status_text,
        "last_exit": exit_to_json(ws.last_exit),
        "next_restart_in": (None if ws.next_restart_in is None
                            else round(ws.next_restart_in, 3)),
        "rss": rss,
        "cpu_percent": cpu_percent,
    }


def program_to_json(name: str, kind: str, workers: list[dict[str, Any]], *,
                    numprocs: int | None = None, gave_up: bool = False) -> dict[str, Any]:
    """One program; ``state`` summarises its workers (see docs/json-schema.md)."""
    states = [w["state"] for w in workers]
    if gave_up:
        state = "gave up"
    elif not workers or all(s in ("stopped", "exited") for s in states):
        state = "stopped"
    elif all(s == "running" for s in states):
        state = "running"
    elif any(s in ("backoff", "exited", "stopped") for s in states):
        state = "degraded"
    else:
        state = "starting"
    return {"name": name, "kind": kind, "numprocs": len(workers) if numprocs is None
            else numprocs, "state": state, "gave_up": gave_up, "workers": workers}


def status_payload(programs: list[dict[str, Any]], *, pid: int, version: str,
                   uptime: float, config: str | None, socket: str | None) -> dict[str, Any]:
    return {"schema": STATUS_SCHEMA,
            "corral": {"pid": pid, "version": version, "uptime": round(uptime, 3),
                       "config": config, "socket": socket},
            "programs": programs}


def command_event(command: str, args: dict[str, Any], *, uid: int, gid: int, pid: int,
                  at: float | None = None) -> dict[str, Any]:
    """A control-socket command as a ``corral.event/1`` of kind ``command``: who asked what.

    Pool events use corral's :class:`~corral.events.EventKind` values; ``command`` is the CLI's
    own kind, for the commands that change something (queries are not recorded).
    """
    program = args.get("program")
    index = args.get("index")
    at = time.time() if at is None else at
    return {
        "schema": EVENT_SCHEMA, "kind": "command",
        "pool": program if isinstance(program, str) else None,
        "index": index if isinstance(index, int) and not isinstance(index, bool) else None,
        "name": None, "pid": None, "at": at, "time": _iso(at),
        "reason": None, "exit": None, "delay": None, "standby": False, "dump": None,
        "message": " ".join([command, *([f"{program}" if not isinstance(index, int)
                                         else f"{program}:{index}"] if program else []),
                             *(f"{k}={v}" for k, v in args.items()
                               if k not in ("program", "index") and v is not None)]),
        "command": command, "args": args,
        "caller": {"uid": uid, "gid": gid, "pid": pid},
    }


def event_to_json(ev: Event, *, caller: dict[str, int] | None = None) -> dict[str, Any]:
    """One event: what ``Event.to_json()``, ``corral events --json`` and the ``corral`` extra
    of corral's log records carry (docs/json-schema.md)."""
    rec = ev.exit
    out: dict[str, Any] = {
        "schema": EVENT_SCHEMA,
        "kind": ev.kind.value,
        "pool": ev.pool,
        "index": ev.index,
        "name": ev.name,
        "pid": ev.pid,
        "at": ev.at,
        "time": _iso(ev.at),
        "reason": rec.reason.value if rec else None,
        "exit": exit_to_json(rec),
        "delay": ev.delay,
        "message": ev.message,
        "standby": ev.standby,
        # A hung (or never ready) worker's stack dump, taken before it was killed.
        "dump": rec.detail if rec and rec.reason in _DUMPED else None,
    }
    if caller is not None:
        out["caller"] = caller
    return out


def _iso(at: float) -> str:
    """A Unix time as ISO 8601 UTC with microseconds: ``2026-12-04T16:18:03.123456Z``."""
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
