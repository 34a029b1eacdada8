"""``corral serve --http`` with real processes, sockets and signals: /readyz answers for the
server (503 while the workers start, 200 once min_ready accept, 200 all through a rolling
reload, 503 from SIGTERM on while the app still serves during shutdown_delay), /metrics
follows the generations, and the endpoint goes with the process."""

from __future__ import annotations

import ctypes
import http.client
import json
import os
import platform
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_serve import Serve, _free_port, _get, finish

from support import wait_for

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def servers() -> Iterator[list[Serve]]:
    started: list[Serve] = []
    yield started
    finish(started)


def probe(port: int, path: str) -> tuple[int, str] | None:
    """(status, body) of a GET on the endpoint, None if it does not answer (yet)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    except OSError:
        return None
    finally:
        conn.close()


def test_readyz_follows_the_start_and_the_shutdown_delay(tmp_path: Path,
                                                         servers: list[Serve]) -> None:
    """503 while the workers run the app's 2 s start-up, 200 once both accept; from SIGTERM
    on, 503 naming the shutdown while the app still answers for the delay; exit 0, then the
    endpoint is gone with everything else."""
    port = _free_port()
    s = Serve(tmp_path, "asgi_app:app", "--shutdown-delay", "3", "--http", f"127.0.0.1:{port}",
              env={"TEST_APP_STARTUP": "2"})
    servers.append(s)
    first = wait_for(lambda: probe(port, "/readyz"), 20, f"the endpoint ({s.text()[-500:]})")
    assert first[0] == 503 and "server 'web': starting:" in first[1], first
    assert "readyz check failed" in first[1]
    ready = wait_for(lambda: (r := probe(port, "/readyz")) and r[0] == 200 and r, 30,
                     f"/readyz 200 ({s.text()[-500:]})")
    assert "server 'web': serving: 2/2 workers ready, needs 2 (generation 1)" in ready[1]
    assert _get(s.port)[0] == 200  # the app: what /readyz says
    live = probe(port, "/livez")
    assert live is not None and live[0] == 200 and "its loop answers" in live[1]

    s.proc.send_signal(signal.SIGTERM)
    stopping = wait_for(lambda: (r := probe(port, "/readyz")) and r[0] == 503 and r, 10,
                        f"/readyz 503 after SIGTERM ({probe(port, '/readyz')}, "
                        f"{s.text()[-800:]})")
    assert "shutting down (SIGTERM): shutdown_delay 3s" in stopping[1], stopping
    # The workers still accept during the delay (a load balancer deregisters meanwhile).
    assert _get(s.port)[0] == 200
    still = probe(port, "/readyz")
    assert still is not None and still[0] == 503 and "left before the drain" in still[1], still
    assert s.proc.poll() is None
    assert s.proc.wait(30) == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


_TGKILL = {"x86_64": 234, "aarch64": 131}.get(platform.machine())  # syscall numbers


def _signal_another_thread(pid: int, sig: int) -> int:
    """``sig`` to one thread of ``pid`` that is not its main thread and does not block it
    (tgkill): what the kernel may choose itself when that thread is the one running."""
    for name in sorted(os.listdir(f"/proc/{pid}/task")):
        tid = int(name)
        if tid == pid:
            continue
        with open(f"/proc/{pid}/task/{tid}/status") as fh:
            blocked = next(int(x.split()[1], 16) for x in fh if x.startswith("SigBlk:"))
        if not blocked & (1 << (sig - 1)):
            libc = ctypes.CDLL(None, use_errno=True)
            assert libc.syscall(_TGKILL, pid, tid, sig) == 0, ctypes.get_errno()
            return tid
    raise AssertionError(f"no thread of {pid} but the main one takes signal {sig}")


@pytest.mark.skipif(_TGKILL is None, reason="tgkill's number known for x86_64 and aarch64")
def test_a_sigterm_taken_by_another_thread_still_stops_the_server(
        tmp_path: Path, servers: list[Serve]) -> None:
    """The endpoint's thread (or a spawner) may be the one the kernel hands SIGTERM to: the
    loop, asleep in epoll, must wake for it all the same (the wake pipe is the wakeup fd)."""
    port = _free_port()
    s = Serve(tmp_path, "asgi_app:app", "--shutdown-delay", "2", "--http", f"127.0.0.1:{port}")
    servers.append(s)
    s.wait_serving()
    wait_for(lambda: (r := probe(port, "/readyz")) and r[0] == 200, 20, "/readyz 200")
    _signal_another_thread(s.proc.pid, signal.SIGTERM)
    stopping = wait_for(lambda: (r := probe(port, "/readyz")) and r[0] == 503 and r, 5,
                        f"/readyz 503 after SIGTERM ({s.text()[-500:]})")
    assert "shutting down (SIGTERM)" in stopping[1]
    assert s.proc.wait(30) == 0


def _pools(port: int) -> dict[str, float]:
    """pool -> corral_workers{state="running"} of a /metrics scrape (parsed)."""
    got = probe(port, "/metrics")
    assert got is not None and got[0] == 200
    out = {}
    for family in text_string_to_metric_families(got[1]):
        if family.name == "corral_workers":
            out.update({x.labels["pool"]: x.value for x in family.samples
                        if x.labels["state"] == "running"})
    return out


def test_metrics_status_and_a_reload(tmp_path: Path, servers: list[Serve]) -> None:
    """/metrics and /status cover the serving generation; /readyz stays 200 through a rolling
    reload (max_unavailable=0); the retired generation's series leave /metrics."""
    port = _free_port()
    s = Serve(tmp_path, "asgi_app:app", "--http", f"127.0.0.1:{port}", "--graceful-timeout",
              "5", env={"TEST_APP_STARTUP": "0.3"})
    servers.append(s)
    s.wait_serving()
    wait_for(lambda: (r := probe(port, "/readyz")) and r[0] == 200, 20, "/readyz 200")
    assert _pools(port) == {"web@1": 2.0}
    got = probe(port, "/status")
    assert got is not None and got[0] == 200
    doc = json.loads(got[1])
    assert doc["schema"] == "corral.status/1" and doc["corral"]["uptime"] > 0
    assert [(p["name"], p["kind"], len(p["workers"])) for p in doc["programs"]] == [
        ("web@1", "serve", 2)]
    pool = probe(port, "/readyz/web@1")
    assert pool is not None and pool[0] == 200 and "pool 'web@1'" in pool[1]

    answers: list[tuple[int, str] | None] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            answers.append(probe(port, "/readyz"))
            done.wait(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        res = s.reload()
    finally:
        done.set()
        poller.join(10)
    assert res.returncode == 0, res.stderr
    bad = [a for a in answers if a is None or a[0] != 200]
    assert len(answers) >= 10 and not bad, bad[:3]
    assert any("reloading to generation 2" in a[1] for a in answers if a is not None)
    # Generation 1 retired: its series are gone, not left at 0.
    wait_for(lambda: _pools(port) == {"web@2": 2.0}, 20, "only generation 2 in /metrics")
    after = probe(port, "/readyz")
    assert after is not None and "(generation 2)" in after[1]
    assert s.stop() == 0


def test_http_address_in_use_is_an_error_naming_the_option(tmp_path: Path,
                                                           servers: list[Serve]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        s = Serve(tmp_path, "asgi_app:app", "--http", f"127.0.0.1:{port}")
        servers.append(s)
        assert s.proc.wait(30) == 1
    assert f"--http: cannot serve HTTP on 127.0.0.1:{port}: Address already in use" in s.text()
    # Nothing was started, and the app's listener was closed again.
    assert "zygote" not in s.text()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", s.port), timeout=5).close()
