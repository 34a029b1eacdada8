"""Turning control-socket payloads into terminal output (rich tables, log and event lines)
and LSB exit codes. Pure functions of the payload: tested without a running corral."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

__all__ = [
    "LSB_DEAD",
    "LSB_NOT_RUNNING",
    "LSB_OK",
    "LSB_UNKNOWN",
    "format_bytes",
    "format_duration",
    "format_event",
    "format_exit",
    "format_log_line",
    "status_exit_code",
    "status_table",
    "top_view",
]

# LSB Core 3.1, 20.2 "Init Script Actions": exit codes of the `status` action.
LSB_OK = 0  # program is running or service is OK
LSB_DEAD = 1  # program is dead and /var/run pid file exists (corral up, workers dead)
LSB_NOT_RUNNING = 3  # program is not running
LSB_UNKNOWN = 4  # program or service status is unknown

_STATE_STYLE = {"running": "green", "starting": "yellow", "stopping": "yellow",
                "pending": "yellow", "backoff": "red", "exited": "red", "stopped": "dim",
                "degraded": "red", "gave up": "bold red"}


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    return f"{hours // 24}d{hours % 24:02d}h"


def format_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}TiB"


def format_exit(last: dict[str, Any] | None) -> str:
    """``exit 1`` / ``SIGKILL`` / ``hung: SIGKILL`` from a last_exit object."""
    if not last:
        return "-"
    how = f"exit {last['code']}" if last.get("code") is not None else (
        last.get("signal") or "?")
    reason = last.get("reason") or ""
    if reason and reason not in ("exited", "killed by signal"):
        return f"{reason}: {how}"
    return how


def status_table(payload: dict[str, Any], programs: Sequence[str] = (), *,
                 now: float | None = None) -> Table:
    """A table of every worker: state, pid, uptime, restarts, last exit, heartbeat, RSS, CPU."""
    del now  # uptimes come computed in the payload
    cols = (("WORKER", "left"), ("STATE", "left"), ("PID", "right"), ("UPTIME", "right"),
            ("RESTARTS", "right"), ("LAST EXIT", "left"), ("HEARTBEAT", "right"),
            ("RSS", "right"), ("CPU", "right"), ("STATUS", "left"))
    rows: list[list[str | Text]] = []
    for prog in _selected(payload, programs):
        if not prog["workers"]:
            rows.append([Text(prog["name"], style="bold"), _state(prog["state"]), "-", "-",
                         "-", "-", "-", "-", "-", "numprocs = 0"])
        for w in prog["workers"]:
            state = w["state"]
            if state == "running" and not w.get("ready", True):
                state = "starting"
            if state == "backoff" and w.get("next_restart_in") is not None:
                shown = _state(state, f" ({format_duration(w['next_restart_in'])})")
            else:
                shown = _state(state)
            cpu = w.get("cpu_percent")
            # A serve's workers: two generations side by side during a rolling reload.
            label = w["name"] if w.get("generation") is None else \
                f"{w['name']} (gen {w['generation']})"
            rows.append([
                label, shown, str(w["pid"]) if w.get("pid") else "-",
                format_duration(w["uptime"]) if w.get("pid") else "-",
                str(w["restarts"]), format_exit(w.get("last_exit")),
                format_duration(w.get("heartbeat_age")), format_bytes(w.get("rss")),
                "-" if cpu is None else f"{cpu:.1f}%", w.get("status_text") or ""])
    table = Table(box=None, pad_edge=False, header_style="bold")
    for i, (col, justify) in enumerate(cols):
        # One line per worker, always. On a narrow terminal only LAST EXIT and STATUS give
        # way (cut with an ellipsis); the short columns keep their width.
        flexible = col in ("LAST EXIT", "STATUS")
        width = max([len(col), *(len(str(r[i])) for r in rows)])
        table.add_column(col, justify=justify, no_wrap=True,  # type: ignore[arg-type]
                         overflow="ellipsis", min_width=min(width, 12) if flexible else width)
    for r in rows:
        table.add_row(*r)
    return table


def top_view(payload: dict[str, Any], *, now: float | None = None) -> Group:
    """``corral top``: a one-line summary over the status table."""
    info = payload.get("corral") or {}
    workers = [w for p in payload.get("programs", []) for w in p["workers"]]
    running = sum(1 for w in workers if w["state"] == "running")
    clock = time.strftime("%H:%M:%S", time.localtime(time.time() if now is None else now))
    head = Text(f"corral pid {info.get('pid', '?')}, up {format_duration(info.get('uptime'))}"
                f" | {running}/{len(workers)} workers running | {clock}", style="bold")
    return Group(head, Text(""), status_table(payload))


def _state(state: str, extra: str = "") -> Text:
    return Text(state + extra, style=_STATE_STYLE.get(state, ""))


def _selected(payload: dict[str, Any], programs: Sequence[str]) -> list[dict[str, Any]]:
    progs: list[dict[str, Any]] = payload.get("programs", [])
    if not programs:
        return progs
    return [p for p in progs if p["name"] in programs]


def status_exit_code(payload: dict[str, Any], programs: Sequence[str] = ()) -> int:
    """LSB status code for the selected programs (all of them when none is named).

    0 every worker RUNNING (ready); 3 none alive because they were stopped (or there are no
    workers); 1 some dead (BACKOFF/EXITED/STOPPED, or the program gave up) while corral runs,
    including none alive when one died; 4 a named program is unknown. Workers still
    STARTING count as running (the process is up).
    """
    known = {p["name"] for p in payload.get("programs", [])}
    if any(name not in known for name in programs):
        return LSB_UNKNOWN
    workers = [w for p in _selected(payload, programs) for w in p["workers"]]
    gave_up = any(p.get("gave_up") for p in _selected(payload, programs))
    alive = [w for w in workers if w["state"] in ("running", "starting", "stopping",
                                                  "pending")]
    dead = [w for w in workers if w["state"] in ("backoff", "exited")]
    if not workers or not alive:
        # Stopped on purpose: not running; died (gave up, exited for good): dead.
        return LSB_DEAD if gave_up or dead else LSB_NOT_RUNNING
    if gave_up or len(alive) < len(workers):
        return LSB_DEAD
    return LSB_OK


def format_log_line(obj: dict[str, Any], *, width: int = 0) -> str:
    """A log object (corral.log/1) as a console line: ``web.1 |  text``."""
    label = f"{obj.get('program')}.{obj.get('index')}"
    mark = "!" if obj.get("stream") == "stderr" else " "
    cont = "+" if obj.get("cont") else ""
    tail = "\\" if obj.get("more") else ""
    ts = obj.get("ts")
    stamp = ""
    if isinstance(ts, int | float):
        t = time.localtime(ts)
        stamp = f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}.{int(ts % 1 * 1000):03d} "
    return f"{stamp}{label:<{width}} |{mark}{cont} {obj.get('line', '')}{tail}"


def format_event(obj: dict[str, Any]) -> str:
    """An event object (corral.event/1) as one line."""
    ts = obj.get("at")
    stamp = time.strftime("%H:%M:%S", time.localtime(ts)) if isinstance(ts, int | float) \
        else "--:--:--"
    who = obj.get("name") or obj.get("pool") or "-"
    pid = f" pid {obj['pid']}" if obj.get("pid") else ""
    text = f"{stamp} {obj.get('kind', '?'):<10} {who}{pid}"
    exit_obj = obj.get("exit")
    if exit_obj:
        text += f": {exit_obj.get('description') or format_exit(exit_obj)}"
    if obj.get("delay") is not None:
        text += f" (restart in {format_duration(obj['delay'])})"
    if obj.get("message"):
        text += f" -- {obj['message']}"
    caller = obj.get("caller")
    if caller:
        text += f" [by uid {caller.get('uid')} pid {caller.get('pid')}]"
    return text


def label_width(objs: Iterable[dict[str, Any]]) -> int:
    return max((len(f"{o.get('program')}.{o.get('index')}") for o in objs), default=0)
