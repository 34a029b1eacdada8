"""``[serve.NAME]`` tables under ``corral run``: a real ASGI app served by the daemon, shown by
``corral status``, rolled by ``corral reload NAME`` and by a config reload without a failed
request, drained on SIGTERM, and nothing left behind (checked by pid)."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import Corral, alive, toml_argv, worker
from obs_support import get, scrape, value
from support import Load, http_get, wait_for

pytestmark = pytest.mark.timeout(120)

APPS = Path(__file__).resolve().parent.parent / "integration" / "serve_app_dir"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int) -> tuple[int, str]:
    status, pid, _ = http_get(port)
    return status, pid


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def _serve(c: Corral, name: str) -> dict[str, Any]:
    progs = [p for p in c.status()["programs"] if p["name"] == name]
    assert len(progs) == 1, progs
    return progs[0]


def _wait_generation(c: Corral, name: str, generation: int, workers: int,
                     timeout: float = 30) -> dict[str, Any]:
    """The serve at ``generation`` with ``workers`` ready ones and no other generation."""
    box: list[dict[str, Any]] = []

    def check() -> bool:
        box[:] = [_serve(c, name)]
        p = box[0]
        return (p["generation"] == generation and p["reloading_to"] is None
                and len(p["workers"]) == workers
                and all(w["state"] == "running" and w["ready"] and w["generation"] == generation
                        for w in p["workers"]))

    wait_for(check, timeout, f"{name} at generation {generation} with {workers} workers",
             interval=0.1)
    return box[0]


def _config(tmp_path: Path, serves: dict[str, str], extra: str = "") -> str:
    shutil.copy(APPS / "asgi_app.py", tmp_path)  # the config's directory is the app dir
    return extra + "".join(f"\n[serve.{name}]\napp = \"asgi_app:app\"\n{body}\n"
                           for name, body in serves.items())


def test_serve_table_is_served_shown_reloaded_and_drained(corral: Any,
                                                          tmp_path: Path) -> None:
    port = _free_port()
    text = _config(tmp_path, {"api": f'bind = ["127.0.0.1:{port}"]\nworkers = 2\n'
                                     'graceful_timeout = "5s"'},
                   extra=f'http = "127.0.0.1:0"\n[program.after]\ncommand = '
                         f'{toml_argv(worker())}\ndepends_on = ["api"]\n')
    c: Corral = corral(config=text)
    first = _wait_generation(c, "api", 1, 2)
    assert first["kind"] == "serve" and first["state"] == "running"
    pids = {w["pid"] for w in first["workers"]}
    assert int(_get(port)[1]) in pids
    c.wait_running(1, "after")  # its dependency (the serve) was ready
    assert c.cli("status", "api").returncode == 0
    table = c.ok("status")
    assert "api.0 (gen 1)" in table and "api.1 (gen 1)" in table

    # corral run's --http endpoint shows the serve's pool under the serve's name.
    import re
    m = wait_for(lambda: re.search(r"serving /metrics /livez /readyz /status at "
                                   r"http://([0-9.]+):(\d+)", c.err()), 20, "endpoint")
    addr = (m.group(1), int(m.group(2)))
    assert get(addr, "/readyz/api").status == 200
    assert value(scrape(addr), "corral_workers_ready", pool="api") == 2

    # Verbs meant for programs say what to do instead; `reload` of a program says restart.
    r = c.cli("stop", "api")
    assert r.returncode == 1 and "corral reload api" in r.stderr, r.stderr
    r = c.cli("reload", "after")
    assert r.returncode == 1 and "restart" in r.stderr, r.stderr

    load = Load(port, interval=0.02)  # a modest rate: ~40 requests/s
    try:
        wait_for(lambda: load.ok >= 5, 10, "requests served")
        out = c.ok("reload", "api", timeout=60)
        assert "generation 2 serves" in out, out
        second = _wait_generation(c, "api", 2, 2)
        # restart NAME is the same rolling reload.
        assert "generation 3 serves" in c.ok("restart", "api", timeout=60)
        third = _wait_generation(c, "api", 3, 2)
        served = load.ok
        wait_for(lambda: load.ok > served + 5, 10, "requests after the reloads")
    finally:
        load.stop()
    assert not load.failed, load.failed[:5]
    new_pids = {w["pid"] for w in second["workers"]} | {w["pid"] for w in third["workers"]}
    assert not pids & new_pids, "every worker was replaced"
    # The serve's own workers and zygotes, seen while running: all gone after the stop.
    below = c.note_pids()
    assert below
    assert c.stop() == 0
    wait_for(lambda: not [p for p in below | pids | new_pids if alive(p)], 10,
             "every process of the serve gone")
    assert _refused(port), "the listener is closed once corral has stopped"


def test_sigterm_waits_shutdown_delay_then_drains(corral: Any, tmp_path: Path) -> None:
    port = _free_port()
    text = _config(tmp_path, {"api": f'bind = ["127.0.0.1:{port}"]\n'
                                     'shutdown_delay = "2s"\ngraceful_timeout = "5s"'})
    c: Corral = corral(config=text)
    first = _wait_generation(c, "api", 1, 1)
    c.signal(signal.SIGTERM)
    c.wait_err("still accepting for shutdown_delay")
    # Through the delay, requests are still answered (load balancers take it out meanwhile).
    t = time.monotonic()
    assert _get(port)[0] == 200
    assert c.wait_exit(30) == 0
    assert time.monotonic() - t >= 0.5  # the delay was waited for (2 s, loosely)
    assert not alive(first["workers"][0]["pid"])
    assert _refused(port)


def test_config_reload_adds_changes_and_removes_serves(corral: Any, tmp_path: Path) -> None:
    a_port, b_port = _free_port(), _free_port()
    a = f'bind = ["127.0.0.1:{a_port}"]\ngraceful_timeout = "5s"'
    b = f'bind = ["127.0.0.1:{b_port}"]\ngraceful_timeout = "5s"'
    c: Corral = corral(config=_config(tmp_path, {"a": a}))
    path = tmp_path / "c.toml"
    _wait_generation(c, "a", 1, 1)

    # Added: b starts (its socket bound at the reload).
    path.write_text(_config(tmp_path, {"a": a, "b": b}))
    assert "serve added: b" in c.ok("reload")
    b_first = _wait_generation(c, "b", 1, 1)
    assert _get(b_port)[0] == 200

    # Changed: a rolls to 2 workers, a new generation, without a failed request.
    load = Load(a_port, interval=0.02)
    try:
        wait_for(lambda: load.ok >= 5, 10, "requests served")
        path.write_text(_config(tmp_path, {"a": a + "\nworkers = 2", "b": b}))
        assert "serve changed: a (workers)" in c.ok("reload")
        _wait_generation(c, "a", 2, 2)
        served = load.ok
        wait_for(lambda: load.ok > served + 5, 10, "requests after the reload")
    finally:
        load.stop()
    assert not load.failed, load.failed[:5]

    # Removed: b drains, its socket closes, it leaves status; a keeps serving.
    path.write_text(_config(tmp_path, {"a": a + "\nworkers = 2"}))
    assert "serve removed: b" in c.ok("reload")
    b_pid = b_first["workers"][0]["pid"]
    wait_for(lambda: not alive(b_pid) and _refused(b_port), 20, "b drained and closed")
    wait_for(lambda: "b" not in {p["name"] for p in c.status()["programs"]}, 10,
             "b gone from status")
    assert _get(a_port)[0] == 200

    # A changed bind: the old sockets close after the drain, the new ones serve.
    new_port = _free_port()
    path.write_text(_config(tmp_path, {"a": a.replace(str(a_port), str(new_port))
                                        + "\nworkers = 2"}))
    assert "serve changed: a (bind)" in c.ok("reload")
    wait_for(lambda: _refused(a_port), 20, "the old address closed")
    wait_for(lambda: _serve(c, "a")["state"] == "running" and len(_serve(c, "a")["workers"])
             == 2, 30, "a serving on its new address", interval=0.1)
    assert _get(new_port)[0] == 200
    doc = json.loads(c.ok("status", "--json", "a"))
    assert doc["programs"][0]["generation"] == 1  # a new server: its generations anew
    assert c.stop() == 0


def test_a_serve_whose_code_fails_gives_up_alone_and_reload_starts_it(
        corral: Any, tmp_path: Path) -> None:
    port = _free_port()
    shutil.copy(APPS / "asgi_app.py", tmp_path)
    (tmp_path / "deploy.py").write_text("raise ImportError('broken deploy')\n")
    c: Corral = corral(config=f'[serve.api]\napp = "deploy:app"\nbind = ["127.0.0.1:{port}"]\n'
                              f'[program.other]\ncommand = {toml_argv(worker())}\n')
    c.wait_running(1, "other")
    wait_for(lambda: _serve(c, "api")["state"] == "gave up", 20, "api gave up", interval=0.1)
    assert "broken deploy" in c.err()
    assert c.cli("status", "api").returncode == 1  # dead while corral runs (LSB)
    # The code fixed: `corral reload api` starts it anew.
    (tmp_path / "deploy.py").write_text("from asgi_app import app  # noqa: F401\n")
    assert "generation 1 serves" in c.ok("reload", "api", timeout=60)
    _wait_generation(c, "api", 1, 1)
    assert _get(port)[0] == 200
    assert c.stop() == 0
