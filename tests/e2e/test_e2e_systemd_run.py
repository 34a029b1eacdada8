"""``corral run`` as a systemd service (issue 12): its sd_notify messages to a fake
NOTIFY_SOCKET bound by the test (READY after every program and serve is ready, RELOADING/READY
around reloads, STOPPING, WATCHDOG), socket activation handed over as systemd does (an exec shim
puts the test's sockets on fds 3.. with LISTEN_PID = corral's pid), and ``corral scale`` /
``corral signal`` of a ``[serve]`` table. Real processes and sockets; every process is killed
by pid at the end (the ``corral`` fixture)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_e2e_serve import APPS, _free_port

from conftest import CLI, Corral, alive, toml_argv, worker
from support import FakeSystemd, http_get, wait_for

pytestmark = pytest.mark.timeout(120)


def _serve_table(tmp_path: Path, name: str, body: str) -> str:
    shutil.copy(APPS / "asgi_app.py", tmp_path)  # the config's directory is the app dir
    return f'\n[serve.{name}]\napp = "asgi_app:app"\n{body}\n'


@pytest.fixture
def systemd(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(tmp_path, abstract=request.param == "abstract")
    yield fake
    fake.close()


@pytest.mark.parametrize("systemd", ["path", "abstract"], indirect=True)
def test_notify_ready_reload_stop_and_watchdog(corral: Any, tmp_path: Path,
                                               systemd: FakeSystemd) -> None:
    port = _free_port()
    seen = "NOTIFY_SOCKET,WATCHDOG_USEC,WATCHDOG_PID"
    text = (f'[program.slow]\ncommand = {toml_argv(worker("--ready-after", "1.5"))}\n'
            'ready = "notify"\n'
            f'[program.plain]\ncommand = {toml_argv(worker("--print-env", seen))}\n'
            + _serve_table(tmp_path, "api", f'bind = ["127.0.0.1:{port}"]\nworkers = 2\n'
                                            'graceful_timeout = "12s"'))
    c: Corral = corral(config=text, env={"NOTIFY_SOCKET": systemd.address,
                                         "WATCHDOG_USEC": "400000"})
    wait_for(lambda: "READY" in systemd.kinds(), 30, "READY=1")
    msgs = list(systemd.messages)
    ready_at = next(i for i, m in enumerate(msgs) if m.startswith("READY=1"))
    # Not before every program and the serve were ready: slow says READY after 1.5 s.
    assert "STATUS=4/4 workers ready" in msgs[ready_at], msgs[ready_at]
    assert any("waiting for" in m for m in msgs[:ready_at]), msgs[:ready_at]
    assert all(w["ready"] for w in c.workers()), c.workers()
    # The variables are corral's: a program never sees them (a notify program has its own).
    out = c.wait_out("env WATCHDOG_PID=")
    assert "env NOTIFY_SOCKET=None" in out and "env WATCHDOG_USEC=None" in out, out

    # A config reload (SIGHUP is the same path), then a serve's rolling reload.
    c.ok("reload")
    wait_for(lambda: systemd.kinds().count("READY") == 2, 30, "READY=1 after the reload")
    assert "generation 2 serves" in c.ok("reload", "api", timeout=60)
    wait_for(lambda: systemd.kinds().count("READY") == 3, 30, "READY=1 after the roll")
    assert c.stop() == 0
    wait_for(lambda: "EXTEND_TIMEOUT_USEC" in systemd.kinds(), 10, "the stop's messages")
    kinds = systemd.kinds()
    assert kinds[:6] == ["READY", "RELOADING", "READY", "RELOADING", "READY", "STOPPING"], kinds
    reloading = [m for m in systemd.messages if m.startswith("RELOADING=1")]
    assert all("MONOTONIC_USEC=" in m for m in reloading), reloading
    assert "reloading serve api" in reloading[1], reloading
    # A long drain (graceful_timeout 12 s) asks for more time.
    assert "EXTEND_TIMEOUT_USEC" in kinds[6:], kinds
    assert systemd.messages.count("WATCHDOG=1") >= 2, "WATCHDOG=1 every WATCHDOG_USEC/2"


@pytest.mark.parametrize("systemd", ["path"], indirect=True)
def test_a_program_that_gave_up_holds_ready_back_until_a_reload_fixes_it(
        corral: Any, tmp_path: Path, systemd: FakeSystemd) -> None:
    good = (f'[program.good]\ncommand = {toml_argv(worker())}\n')
    # Never ready (ready = "notify", no READY=1 before it exits): it gives up.
    bad = (f'[program.bad]\ncommand = {toml_argv(worker("--exit", "1"))}\nready = "notify"\n'
           'backoff = { initial = "100ms", cap = "100ms", jitter = 0 }\n'
           'budget = { max_restarts = 1, window = "1m" }\n')
    c: Corral = corral(config=good + bad, env={"NOTIFY_SOCKET": systemd.address})
    wait_for(lambda: any("failed: bad" in m for m in systemd.messages), 30,
             "STATUS naming the program that gave up")
    assert "READY" not in systemd.kinds(), systemd.messages
    (tmp_path / "c.toml").write_text(good + bad.replace('"--exit", "1"', '"--ready-after", "0.2"'))
    c.ok("reload")
    wait_for(lambda: "READY" in systemd.kinds(), 30, "READY=1 once it runs")
    # Not ready before: no reload to announce either.
    assert systemd.kinds()[0] == "READY", systemd.kinds()
    ready = next(m for m in systemd.messages if m.startswith("READY=1"))
    assert "STATUS=2/2 workers ready" in ready, ready
    assert c.stop() == 0


# Puts the test's sockets on fds 3.. and execs corral with LISTEN_PID = its own pid (which
# exec keeps): what systemd does for a socket-activated service.
SHIM = """
import fcntl, os, sys
sep = sys.argv.index("--")
pairs = [a.split("=") for a in sys.argv[1:sep]]
high = [fcntl.fcntl(int(fd), fcntl.F_DUPFD, 100) for _, fd in pairs]
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ.update(LISTEN_FDS=str(len(pairs)), LISTEN_PID=str(os.getpid()),
                  LISTEN_FDNAMES=":".join(name for name, _ in pairs))
os.execv(sys.argv[sep + 1], sys.argv[sep + 1:])
"""

# A program answering HTTP on the socket it got at fd 3, with what it was handed.
ECHO = """
import os, socket
sock = socket.socket(fileno=3)
env = f"{os.environ.get('LISTEN_FDS')}:{os.environ.get('LISTEN_FDNAMES')}"
while True:
    conn, _ = sock.accept()
    conn.recv(4096)
    conn.sendall(f"HTTP/1.0 200 OK\\r\\nx-pid: {os.getpid()}\\r\\n\\r\\necho {env}".encode())
    conn.close()
"""


def _listening(address: tuple[str, int] | None = None) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(address or ("127.0.0.1", 0))
    s.listen(64)
    return s


def test_socket_activation_hands_sockets_to_a_serve_and_a_program(corral: Any,
                                                                   tmp_path: Path) -> None:
    api, web, stray = _listening(), _listening(), _listening()
    api_port, web_port = api.getsockname()[1], web.getsockname()[1]
    try:
        # Each table's own address is the *other* socket's: binding it would fail (in use),
        # so serving at all proves that systemd's sockets were taken by name, not bound.
        text = (f'[program.echo]\ncommand = {toml_argv([sys.executable, "-c", ECHO])}\n'
                f'listen = {{ http = "127.0.0.1:{api_port}" }}\n'
                + _serve_table(tmp_path, "api", f'bind = ["127.0.0.1:{web_port}"]\n'
                                                'workers = 2'))
        fds = {"api": api.fileno(), "echo.http": web.fileno(), "stray": stray.fileno()}
        prefix = [sys.executable, "-c", SHIM, *(f"{n}={fd}" for n, fd in fds.items()), "--"]
        c: Corral = corral(config=text, prefix=prefix, pass_fds=list(fds.values()))
        c.wait_running(2, "api")
        c.wait_running(1, "echo")
        status, pid, body = http_get(api_port)
        assert status == 200 and body == "asgi ok"
        assert int(pid) in {w["pid"] for w in c.workers("api")}
        assert http_get(web_port)[2] == "echo 1:http"  # LISTEN_FDNAMES is the entry's name
        err = c.err()
        assert "stray" in err and "no table takes" in err, err
        assert "adopted 3 socket(s) from systemd" in err, err

        # A config reload that changes the serve's bind: a new Server, on the same socket.
        (tmp_path / "c.toml").write_text(text.replace("workers = 2", "workers = 1").replace(
            f'bind = ["127.0.0.1:{web_port}"]', 'bind = ["127.0.0.1:1"]'))
        c.ok("reload")
        wait_for(lambda: len(c.workers("api")) == 1 and c.workers("api")[0]["ready"]
                 and c.workers("api")[0]["generation"] == 1 and http_get(api_port)[0] == 200,
                 30, "the replaced serve serving on systemd's socket")
        assert http_get(web_port)[2] == "echo 1:http"
        assert c.stop() == 0
    finally:
        for s in (api, web, stray):
            s.close()


def test_socket_activation_bad_combinations_refuse_to_start(corral: Any,
                                                           tmp_path: Path) -> None:
    api = _listening()
    try:
        text = (f'[program.echo]\ncommand = {toml_argv([sys.executable, "-c", ECHO])}\n'
                'listen = { http = "fd://3" }\n'
                + _serve_table(tmp_path, "api", 'bind = ["127.0.0.1:0"]\nreuse_port = true'))
        prefix = [sys.executable, "-c", SHIM, f"api={api.fileno()}", "--"]
        c: Corral = corral(config=text, prefix=prefix, pass_fds=[api.fileno()], wait=False)
        assert c.wait_exit(30) == 6
        err = c.err()
        assert "program.echo.listen" in err and "systemd's socket 'api'" in err, err
        assert "serve.api.reuse_port" in err and "SO_REUSEPORT" in err, err
    finally:
        api.close()


def test_scale_and_signal_a_serve(corral: Any, tmp_path: Path) -> None:
    port = _free_port()
    text = _serve_table(tmp_path, "api", f'bind = ["127.0.0.1:{port}"]\nworkers = 2\n'
                                         'graceful_timeout = "5s"')
    c: Corral = corral(config=text, env={"TEST_APP_STARTUP": "2"})  # a reload to catch
    first = {w["pid"] for w in c.wait_running(2, "api")}

    assert "api: scaled to 3 (generation 1)" in c.ok("scale", "api", "3")
    grown = c.wait_running(3, "api", timeout=30)
    assert {w["index"] for w in grown} == {0, 1, 2} and first < {w["pid"] for w in grown}
    assert all(w["generation"] == 1 for w in grown)
    doc = next(p for p in c.status()["programs"] if p["name"] == "api")
    assert doc["numprocs"] == 3, doc
    assert http_get(port)[0] == 200

    c.ok("scale", "api", "1")
    left = c.wait_running(1, "api", timeout=30)
    assert left[0]["index"] == 0
    gone = {w["pid"] for w in grown} - {left[0]["pid"]}
    wait_for(lambda: not [p for p in gone if alive(p)], 20, "the removed workers gone")

    # signal: to worker 0's process group; TERM makes it drain and exit, and it is replaced.
    before = left[0]["pid"]
    assert "api:0: sent SIGTERM to 1 worker(s)" in c.ok("signal", "api:0", "TERM")
    c.wait_workers(lambda ws: len(ws) == 1 and ws[0]["pid"] not in (None, before)
                   and ws[0]["ready"], "worker 0 replaced after its SIGTERM", "api", 30)
    assert "api: sent SIGUSR2 to 1 worker(s)" in c.ok("signal", "api", "USR2")

    # Bad input: named, with the expected and the given.
    r = c.cli("scale", "nosuch", "2")
    assert r.returncode == 1 and "no program 'nosuch'" in r.stderr and "api" in r.stderr
    r = c.cli("scale", "api", "0")
    assert r.returncode == 1 and "between 1 and 4096, got 0" in r.stderr, r.stderr
    for bad in (["scale", "api", "-1"], ["scale", "api", "many"], ["signal", "api", "NOPE"]):
        r = c.cli(*bad)
        assert r.returncode == 2, (bad, r.stderr)
    r = c.cli("signal", "api:7", "TERM")
    assert r.returncode == 1 and "no worker 7" in r.stderr, r.stderr

    # During a rolling reload: refused, saying why (nothing changes).
    env = dict(os.environ)
    env.pop("CORRAL_SOCKET", None)
    reload = subprocess.Popen([*CLI, "--socket", c.socket, "reload", "api"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        wait_for(lambda: next(p for p in c.status()["programs"]
                              if p["name"] == "api")["reloading_to"] == 2, 20,
                 "the reload under way")
        r = c.cli("scale", "api", "2")
        assert r.returncode == 1 and "reload to generation 2 is under way" in r.stderr, r.stderr
        assert reload.wait(60) == 0
    finally:
        if reload.poll() is None:
            reload.kill()
            reload.wait(10)
    c.wait_running(1, "api", timeout=30)
    assert c.stop() == 0
