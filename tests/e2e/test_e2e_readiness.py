"""Readiness of command workers through ``corral run``: sd_notify (READY, STATUS, WATCHDOG as a
heartbeat), tcp:PORT, http://, log:REGEX; and depends_on (start after ready, stop in reverse)."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest

from conftest import Corral, toml_argv, worker

pytestmark = pytest.mark.timeout(90)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def events(c: Corral) -> list[dict[str, Any]]:
    return [json.loads(x) for x in c.ok("events", "-n", "1000", "--json").splitlines()]


def logs(c: Corral, target: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in c.ok("logs", target, "-n", "1000", "--json").splitlines()]


def first(evs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(e for e in evs if e["kind"] == kind and e["name"] == name)


def test_notify_ready_status_and_env(corral: Any) -> None:
    c: Corral = corral("-n", "2", "--name", "n", "--ready", "notify", "--", *worker(
        "--ready-after", "1.0", "--status", "serving", "--print-env",
        "NOTIFY_SOCKET,WATCHDOG_USEC,CORRAL_WORKER"))
    # Started but not ready until READY=1
    ws = c.wait_workers(lambda ws: len(ws) == 2 and all(w["pid"] for w in ws), "2 started")
    assert all(w["state"] == "starting" and not w["ready"] for w in ws)
    assert c.cli("status").returncode == 0  # starting counts as up
    ws = c.wait_running(2)
    assert [w["status_text"] for w in ws] == ["serving", "serving"]
    evs = events(c)
    for i in (0, 1):
        started = next(o for o in logs(c, f"n:{i}") if o["line"].startswith("start"))
        assert first(evs, "ready", f"n.{i}")["at"] >= started["ts"] + 0.9
    out = c.out()
    assert "n.0 |  env NOTIFY_SOCKET=@corral-notify-" in out
    assert "n.1 |  env CORRAL_WORKER=n.1" in out
    assert "env WATCHDOG_USEC=None" in out  # no heartbeat_timeout: no watchdog asked


def test_watchdog_heartbeat_finds_a_hung_command(corral: Any) -> None:
    # WATCHDOG=1 every 0.2 s for 1.5 s, then nothing: hung past heartbeat_timeout = 1 s.
    c: Corral = corral(config=f"""
[program.w]
command = {toml_argv(worker("--ready-after", "0", "--watchdog", "0.2", "--watchdog-for", "1.5",
                            "--print-env", "WATCHDOG_USEC"))}
ready = "notify"
heartbeat_timeout = "1s"
backoff = {{ initial = 0.1 }}
""")
    first_pid = c.wait_running(1)[0]["pid"]
    ws = c.wait_workers(lambda ws: ws[0]["last_exit"] is not None, "the hung worker's end",
                        timeout=30)
    last = ws[0]["last_exit"]
    assert last["pid"] == first_pid
    assert last["reason"] == "hung" and last["by_corral"]
    assert "no heartbeat" in last["description"] or "hung" in last["description"]
    assert last["uptime"] >= 2.0
    ws = c.wait_running(1)
    assert ws[0]["pid"] != first_pid and ws[0]["restarts"] == 1
    assert "env WATCHDOG_USEC=1000000" in c.out()
    # while pinging, the heartbeat age stays small
    assert ws[0]["heartbeat_age"] is not None and ws[0]["heartbeat_age"] < 1.0


def test_notify_stopping(corral: Any) -> None:
    """STOPPING=1 (as systemd takes it: the service begins its shutdown) is logged and shown
    in status; with a STATUS= of its own, that text is shown instead."""
    both = r"STOPPING=1\nSTATUS=draining"  # worker.py turns the two characters \n into a newline
    a_cmd = toml_argv(worker("--ready-after", "0", "--notify-after", "0.3", "STOPPING=1"))
    b_cmd = toml_argv(worker("--ready-after", "0", "--notify-after", "0.3", both))
    c: Corral = corral(config=f"""
[program.a]
command = {a_cmd}
ready = "notify"

[program.b]
command = {b_cmd}
ready = "notify"
""")
    a = c.wait_workers(lambda ws: ws[0]["status_text"] == "stopping", "a stopping", "a")
    c.wait_workers(lambda ws: ws[0]["status_text"] == "draining", "b draining", "b")
    c.wait_err(f"a.0 (pid {a[0]['pid']}) says it is stopping")
    assert "stopping" in c.ok("status")


def test_tcp_http_and_log_readiness(corral: Any) -> None:
    tcp, http = free_port(), free_port()
    c: Corral = corral(config=f"""
[program.tcp]
command = {toml_argv(worker("--listen", str(tcp), "--listen-after", "1"))}
ready = "tcp:{tcp}"

[program.http]
command = {toml_argv(worker("--http", str(http), "--listen-after", "1"))}
ready = "http://127.0.0.1:{http}/healthz"

[program.log]
command = {toml_argv(worker("--say-after", "1", "server is up"))}
ready = "log:is up$"
""")
    early = c.workers()
    assert all(not w["ready"] for w in early), early
    for prog in ("tcp", "http", "log"):
        c.wait_running(1, prog)
    evs = events(c)
    starts = {p: first(evs, "spawned", f"{p}.0")["at"] for p in ("tcp", "http", "log")}
    for p in ("tcp", "http", "log"):
        assert first(evs, "ready", f"{p}.0")["at"] >= starts[p] + 0.9, p
    said = next(o for o in logs(c, "log:0") if o["line"] == "server is up")
    assert first(evs, "ready", "log.0")["at"] >= said["ts"]


def test_depends_on_start_after_ready_stop_in_reverse(corral: Any) -> None:
    c: Corral = corral(config=f"""
[program.app]
command = {toml_argv(worker())}
depends_on = ["db"]

[program.db]
command = {toml_argv(worker("--ready-after", "1"))}
ready = "notify"
""")
    c.wait_running(1, "app")
    evs = events(c)
    db_ready = first(evs, "ready", "db.0")["at"]
    assert first(evs, "spawned", "app.0")["at"] >= db_ready
    # while db is not ready, app has not started: shown as not started yet
    assert c.stop() == 0
    err = c.err()
    app_end = err.index("'app.0'", err.index("stopping every program"))
    db_end = err.index("'db.0'", err.index("stopping every program"))
    assert app_end < db_end, err
