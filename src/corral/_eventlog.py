"""The ``extra`` of corral's log records about lifecycle events: the event's JSON document.

A record about an event carries ``record.corral``, the same ``corral.event/1`` object that
``corral events --json`` prints and ``Event.to_json()`` returns (docs/json-schema.md), so a JSON
log formatter emits structured records. One attribute, not one per key: ``name`` and
``message`` are taken by :class:`logging.LogRecord` itself.
"""

from __future__ import annotations

import logging
from typing import Any

from corral import _json  # noqa: F401  # loaded now, never on the monitor thread
from corral.events import Event

__all__ = ["event_extra"]


def event_extra(logger: logging.Logger, level: int, event: Event) -> dict[str, Any] | None:
    """``{"corral": <event JSON>}`` if ``logger`` logs at ``level``, else None (no cost)."""
    if not logger.isEnabledFor(level):
        return None
    return {"corral": event.to_json()}
