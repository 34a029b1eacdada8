"""``corral run --http`` (and ``http =`` in the file): /metrics /livez /readyz /status of every
program, served by a real ``corral run`` over a real socket, following reloads and scaling."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from conftest import Corral, toml_argv, worker
from obs_support import get, scrape, value
from support import wait_for

pytestmark = pytest.mark.timeout(120)

_SERVING = re.compile(r"serving /metrics /livez /readyz /status at http://([0-9.]+):(\d+)")


def _address(c: Corral) -> tuple[str, int]:
    """Where corral serves (port 0 in the config: read from its log line)."""
    m = wait_for(lambda: _SERVING.search(c.err()), 20, "the endpoint's log line")
    return m.group(1), int(m.group(2))


def _samples(addr: tuple[str, int], name: str, **labels: str) -> float | None:
    return value(scrape(addr), name, **labels)


def test_http_serves_every_program_through_reload_and_scale(corral: Any,
                                                           tmp_path: Path) -> None:
    cmd = toml_argv(worker())
    c: Corral = corral(config=f"""
http = "127.0.0.1:0"
[program.a]
command = {cmd}
numprocs = 2
[program.gate]
command = {cmd}
ready = "log:a line this worker never prints"
""")
    addr = _address(c)
    c.wait_running(2, "a")
    # /readyz: a is ready, gate never is (503, naming it and what it needs).
    wait_for(lambda: get(addr, "/readyz/a").status == 200, 20, "/readyz/a 200")
    r = get(addr, "/readyz")
    assert r.status == 503, r.text
    assert "[+] pool 'a': 2/2 workers ready" in r.text
    assert "[-] pool 'gate': 0/1 workers ready, needs 1" in r.text
    assert get(addr, "/livez").status == 200
    # /metrics, read with prometheus_client's parser: both programs, by state.
    got = scrape(addr)
    assert value(got, "corral_workers", pool="a", state="running") == 2
    assert value(got, "corral_workers_ready", pool="gate") == 0
    assert value(got, "corral_ready", pool="a") == 1
    assert value(got, "corral_ready", pool="gate") == 0
    assert value(got, "corral_worker_restarts_total", pool="a", reason="killed") == 0
    # /status: the document `corral status --json` prints (same programs, workers, pids).
    r = get(addr, "/status")
    assert r.status == 200 and r.headers["content-type"] == "application/json"
    doc = json.loads(r.text)
    cli = c.status()
    assert doc["schema"] == cli["schema"] == "corral.status/1"
    assert doc["corral"]["pid"] == cli["corral"]["pid"] == c.pid
    assert doc["corral"]["socket"] == c.socket
    assert [(p["name"], p["kind"]) for p in doc["programs"]] == [("a", "command"),
                                                                 ("gate", "command")]
    assert ({w["pid"] for p in doc["programs"] for w in p["workers"]}
            == {w["pid"] for p in cli["programs"] for w in p["workers"]})
    # A killed worker: its restart counted once, with reason "killed".
    victim = c.workers("a")[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: _samples(addr, "corral_worker_restarts_total", pool="a",
                              reason="killed") == 1, 20, "a restart of a counted")
    c.wait_running(2, "a")
    assert _samples(addr, "corral_worker_restarts_total", pool="a", reason="killed") == 1

    # A reload adds b and removes gate: the endpoint follows.
    (tmp_path / "c.toml").write_text(f"""
http = "127.0.0.1:0"
[program.a]
command = {cmd}
numprocs = 2
[program.b]
command = {cmd}
""")
    out = c.ok("reload", timeout=60)
    assert "added: b" in out and "removed: gate" in out
    wait_for(lambda: _samples(addr, "corral_workers", pool="b", state="running") == 1, 20,
             "b running in /metrics")
    wait_for(lambda: _samples(addr, "corral_workers", pool="gate", state="running") is None,
             20, "gate gone from /metrics")
    wait_for(lambda: get(addr, "/readyz").status == 200, 20, "/readyz 200 after the reload")
    assert get(addr, "/readyz/b").status == 200
    assert get(addr, "/readyz/gate").status == 404
    assert [p["name"] for p in json.loads(get(addr, "/status").text)["programs"]] == ["a", "b"]
    # corral scale: the same pool grows, the endpoint sees it at the next scrape.
    c.ok("scale", "a", "3")
    wait_for(lambda: _samples(addr, "corral_workers", pool="a", state="running") == 3, 20,
             "a scaled to 3 in /metrics")
    # Only GET/HEAD of its own paths.
    assert get(addr, "/metrics", method="POST").status == 405
    assert get(addr, "/nope").status == 404
    assert get(addr, "http://example.com/metrics").status in (403, 404)  # never a proxy
    # corral stops: so does the endpoint.
    assert c.stop() == 0
    with pytest.raises(OSError), socket.create_connection(addr, timeout=5):
        pass


def test_http_flag_and_bad_addresses(corral: Any, tmp_path: Path) -> None:
    # --http on a command line: one program, served at once.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c: Corral = corral("--http", f"127.0.0.1:{port}", "-n", "2", "--name", "w", "--",
                       *worker())
    c.wait_running(2, "w")
    addr = ("127.0.0.1", port)
    wait_for(lambda: get(addr, "/readyz").status == 200, 20, "/readyz 200")
    assert _samples(addr, "corral_workers", pool="w", state="running") == 2
    # The port is taken now: a second corral says so and starts nothing.
    c2: Corral = corral("--http", f"127.0.0.1:{port}", "-n", "1", "--", *worker(),
                        wait=False, name="taken")
    assert c2.wait_exit(30) == 1
    assert "cannot serve /metrics" in c2.err() and "Address already in use" in c2.err()
    assert "start index" not in c2.out()
    # Bad addresses: refused before anything starts, naming what is wrong.
    r = c.cli("run", "--http", "9100x", "--", *worker())
    assert r.returncode == 2 and "--http must end with a port number" in r.stderr
    r = c.cli("run", "--http", ":9100", "--", *worker())
    assert r.returncode == 2 and "needs a host" in r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text(f'http = "localhost:99999"\n[program.x]\ncommand = {toml_argv(worker())}\n')
    r = c.cli("run", "-c", str(bad))
    assert r.returncode == 6, r.stderr
    assert "http" in r.stderr and "'localhost:99999'" in r.stderr


def test_metrics_with_a_malformed_accept_header_serves_plain_text(corral: Any) -> None:
    """`Accept: application/openmetrics-text; version=\\xff` made prometheus_client's
    choose_encoder raise: a 500 and an ERROR traceback in corral's log carrying the request.
    Now the plain text format, as with no Accept, and nothing logged."""
    c: Corral = corral("--http", "127.0.0.1:0", "-n", "1", "--name", "w", "--", *worker())
    c.wait_running(1, "w")
    addr = _address(c)
    for accept in ("application/openmetrics-text; version=\xff",
                   "application/openmetrics-text; version=x.y"):
        r = get(addr, "/metrics", headers={"Accept": accept})
        assert r.status == 200, (accept, r.status, r.text)
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4"), r.headers
        assert "corral_workers" in r.text
    # Well-formed ones still get what they asked for.
    r = get(addr, "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert r.status == 200 and r.headers["content-type"].startswith(
        "application/openmetrics-text"), r.headers
    assert "Traceback" not in c.err() and "ERROR" not in c.err(), c.err()
    assert c.stop() == 0
