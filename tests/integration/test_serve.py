"""corral serve with real processes, real sockets and real signals: a zygote's workers serve
ASGI and WSGI, a rolling reload loses no request, a broken deploy keeps the old generation, the
systemd messages in order, and nothing is left behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from support import FakeSystemd, Load, http_get, kill_pids, wait_for

_get = http_get

APPS = Path(__file__).parent / "serve_app_dir"
CORRAL = [sys.executable, "-m", "corral.cli.main"]

pytestmark = pytest.mark.timeout(90)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ok(port: int) -> bool:
    try:
        return _get(port, timeout=1.0)[0] == 200
    except OSError:
        return False


class Serve:
    """A `corral serve` subprocess and everything below it, killed by pid at the end."""

    def __init__(self, tmp: Path, app: str, *args: str, workers: int = 2,
                 app_dir: Path = APPS, env: dict[str, str] | None = None,
                 config: Path | None = None, port: int | None = None) -> None:
        self.port = port or _free_port()
        self.sock = str(tmp / "ctl.sock")
        self.log = tmp / "serve.log"
        if config is not None:  # bind and workers come from its [serve.NAME]
            cmd = [*CORRAL, "--socket", self.sock, "-c", str(config), "serve", app,
                   "--app-dir", str(app_dir), *args]
        else:
            cmd = [*CORRAL, "--socket", self.sock, "serve", app, "--workers", str(workers),
                   "--bind", f"127.0.0.1:{self.port}", "--app-dir", str(app_dir), *args]
        full_env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", **(env or {}))
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=fh, env=full_env,
                                         stdin=subprocess.DEVNULL)
        self.seen: set[int] = {self.proc.pid}
        self.n = workers

    def tree(self) -> list[psutil.Process]:
        try:
            procs = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        self.seen.update(p.pid for p in procs)
        return procs

    def workers(self) -> set[int]:
        out = set()
        for p in self.tree():
            try:
                if " worker " in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                    out.add(p.pid)
            except psutil.Error:
                continue
        return out

    def wait_serving(self, timeout: float = 30.0) -> set[int]:
        wait_for(lambda: _ok(self.port) and len(self.workers()) == self.n, timeout,
                 f"{self.n} workers serving ({self.text()[-500:]})")
        return self.workers()

    def reload(self, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CORRAL, "--socket", self.sock, "reload"], capture_output=True,
                              text=True, timeout=timeout)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, timeout: float = 30.0) -> int:
        self.tree()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def cleanup(self) -> None:
        self.tree()
        kill_pids(self.seen)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def finish(started: list[Serve]) -> None:
    """After a test: each corral serve that exited left nothing (checked first, before the
    kill; helpers such as spawn's resource tracker leave on EOF, soon after); then whatever
    is still running is killed."""
    try:
        for s in started:
            if s.proc.poll() is not None:
                wait_for(lambda s=s: not _alive(s.seen - {s.proc.pid}), 10,
                         f"every process of corral serve gone ({_alive(s.seen)})")
    finally:
        for s in started:
            s.cleanup()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[list[Serve]]:
    started: list[Serve] = []
    yield started
    finish(started)


def _zygotes(s: Serve) -> list[int]:
    out = []
    for p in s.tree():
        with contextlib.suppress(psutil.Error):
            if "zygote" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
    return out


def _alive(pids: set[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def test_asgi_reload_under_load_loses_nothing(tmp_path: Path, serve: list[Serve]) -> None:
    s = Serve(tmp_path, "asgi_app:app", "--graceful-timeout", "5",
              env={"TEST_APP_STARTUP": "0.3"})
    serve.append(s)
    first = s.wait_serving()
    load = Load(s.port, "/slow")  # 200 ms requests: some are in flight at every drain
    try:
        wait_for(lambda: load.ok >= 5, 10, "requests served")
        max_workers = 0
        done = threading.Event()

        def sample() -> None:
            nonlocal max_workers
            while not done.is_set():
                max_workers = max(max_workers, len(s.workers()))
                time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        res = s.reload()
        assert res.returncode == 0, res.stderr + s.text()[-2000:]
        assert "reloaded" in res.stdout
        second = s.wait_serving()
        assert not first & second, "every worker was replaced"
        wait_for(lambda: len(_zygotes(s)) == 1, 10, "the old zygote retired")
        s.proc.send_signal(signal.SIGHUP)  # the signal path too
        wait_for(lambda: not (second & s.workers()) and len(s.workers()) == 2, 30,
                 "the SIGHUP reload")
        done.set()
        sampler.join(5)
        served_before = load.ok
        wait_for(lambda: load.ok > served_before + 3, 10, "requests after the reloads")
    finally:
        load.stop()
    assert not load.failed, load.failed[:5]
    assert max_workers <= 3, f"N + max_surge = 3 workers at most, saw {max_workers}"
    assert s.stop() == 0
    wait_for(lambda: not s.tree(), 10, "every process gone")


def test_wsgi_app_is_detected_and_served(tmp_path: Path, serve: list[Serve]) -> None:
    s = Serve(tmp_path, "asgi_app:wsgi", workers=1)
    serve.append(s)
    s.wait_serving()
    status, _, body = _get(s.port)
    assert (status, body) == (200, "wsgi ok")
    assert s.stop() == 0


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_stdlib_fallbacks_and_unix_socket(tmp_path: Path, serve: list[Serve],
                                          method: str) -> None:
    path = str(tmp_path / "app.sock")
    s = Serve(tmp_path, "asgi_app:app", "--start-method", method, "--bind",
              f"unix:{path}", workers=1)
    serve.append(s)
    s.wait_serving()

    def unix_get() -> str:
        c = socket.socket(socket.AF_UNIX)
        c.settimeout(5)
        c.connect(path)
        c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := c.recv(4096):
            data += chunk
        c.close()
        return data.decode()

    assert "asgi ok" in unix_get()
    assert s.stop() == 0
    assert not os.path.exists(path), "corral removes the unix socket it made"


def test_broken_deploy_keeps_the_old_generation(tmp_path: Path, serve: list[Serve]) -> None:
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    shutil.copy(APPS / "asgi_app.py", app_dir)
    (app_dir / "deploy.py").write_text("from asgi_app import app  # noqa\n")
    ready_timeout = 3.0
    s = Serve(tmp_path, "deploy:app", "--ready-timeout", str(ready_timeout), app_dir=app_dir)
    serve.append(s)
    first = s.wait_serving()
    load = Load(s.port)
    try:
        # 1. The new code does not import: the zygote says so, at once.
        (app_dir / "deploy.py").write_text("raise ImportError('broken deploy')\n")
        t = time.monotonic()
        res = s.reload()
        assert res.returncode != 0
        assert "broken deploy" in res.stderr
        assert time.monotonic() - t < ready_timeout + 1
        # 2. A worker that never becomes ready: aborted within ready_timeout (+ 1 s).
        (app_dir / "deploy.py").write_text(
            "import os\nos.environ['TEST_APP_NEVER_READY'] = '1'\n"
            "from asgi_app import app  # noqa\n")
        t = time.monotonic()
        res = s.reload()
        took = time.monotonic() - t
        assert res.returncode != 0, res.stdout
        assert "ready_timeout" in res.stderr
        assert took < ready_timeout + 1.5, took
        wait_for(lambda: s.workers() == first, 15, "the new generation's worker gone")
    finally:
        load.stop()
    assert load.ok > 0
    assert not load.failed, load.failed[:5]
    assert s.workers() == first
    assert s.stop() == 0


def test_threads_at_import_refuse_the_zygote(tmp_path: Path, serve: list[Serve]) -> None:
    s = Serve(tmp_path, "threaded_app:app", workers=1)
    serve.append(s)
    assert s.proc.wait(30) == 1
    assert "import-thread" in s.text()


def test_scale_and_signal_through_the_control_socket(tmp_path: Path,
                                                    serve: list[Serve]) -> None:
    """`corral scale web N` and `corral signal web[:INDEX] SIG` reach corral serve too: the
    workers grow (forked from the generation's zygote) and shrink (drained), a signal goes to
    one worker's group; a wrong name, count or index is refused."""
    s = Serve(tmp_path, "asgi_app:app", workers=1)
    serve.append(s)
    first = s.wait_serving()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CORRAL, "--socket", s.sock, *args], capture_output=True,
                              text=True, timeout=30)

    r = cli("scale", "web", "3")
    assert r.returncode == 0 and "web: scaled to 3" in r.stdout, r.stderr
    s.n = 3
    grown = s.wait_serving()
    assert first < grown
    r = cli("scale", "web", "1")
    assert r.returncode == 0, r.stderr
    s.n = 1
    (left,) = s.wait_serving()
    r = cli("signal", "web:0", "KILL")
    assert r.returncode == 0 and "web:0: sent SIGKILL to 1 worker(s)" in r.stdout, r.stderr
    wait_for(lambda: len(s.workers()) == 1 and left not in s.workers(), 20,
             "worker 0 replaced after its SIGKILL")
    for args, code, text in ((("scale", "api", "2"), 1, "no program 'api'"),
                             (("scale", "web", "0"), 1, "between 1 and 4096, got 0"),
                             (("signal", "web:5", "TERM"), 1, "no worker 5"),
                             (("signal", "web", "NOPE"), 2, "SIG")):
        r = cli(*args)
        assert r.returncode == code and text in r.stderr, (args, r.returncode, r.stderr)
    assert s.stop() == 0


def test_systemd_messages_in_order(tmp_path: Path, serve: list[Serve]) -> None:
    """A fake NOTIFY_SOCKET of our own: what corral serve tells systemd, in order."""
    fake = FakeSystemd(tmp_path, abstract=False)
    messages = fake.messages

    s = Serve(tmp_path, "asgi_app:app", "--graceful-timeout", "12",
              env={"NOTIFY_SOCKET": fake.address, "WATCHDOG_USEC": "400000",
                   "TEST_APP_STARTUP": "0.2"})
    serve.append(s)
    try:
        s.wait_serving()
        wait_for(lambda: any("READY=1" in m for m in messages), 10, "READY=1")
        assert s.reload().returncode == 0
        assert s.stop() == 0
        wait_for(lambda: any("EXTEND_TIMEOUT_USEC=" in m for m in messages), 5,
                 "the stop's messages read")
    finally:
        fake.close()
    kinds = [m.split("\n")[0].split("=")[0] for m in messages if "WATCHDOG=1" not in m]
    assert sum("WATCHDOG=1" in m for m in messages) >= 2, "pings every WATCHDOG_USEC/2"
    ready_at = kinds.index("READY")
    reload_at = kinds.index("RELOADING")
    assert ready_at < reload_at
    assert "READY" in kinds[reload_at + 1:], "READY=1 again after the reload"
    stop_at = kinds.index("STOPPING")
    assert stop_at > reload_at
    reloading = next(m for m in messages if m.startswith("RELOADING=1"))
    assert "MONOTONIC_USEC=" in reloading
    usec = int(reloading.split("MONOTONIC_USEC=")[1].split("\n")[0])
    assert abs(usec / 1e6 - time.monotonic()) < 60
    first_ready = next(m for m in messages if m.startswith("READY=1"))
    assert "STATUS=2/2 workers ready" in first_ready
    # A long drain asks for more time (graceful_timeout > 5 s).
    assert any("EXTEND_TIMEOUT_USEC=" in m for m in messages[stop_at:])
    # Workers never inherit the notify socket.
    assert "NOTIFY_SOCKET" not in s.text()


def test_max_requests_recycles_through_the_surge(tmp_path: Path, serve: list[Serve]) -> None:
    """A worker past max_requests is replaced by one started (and ready) first: no request
    fails, and there are never more than N + 1 workers."""
    s = Serve(tmp_path, "asgi_app:app", "--max-requests", "15", workers=1)
    serve.append(s)
    first = s.wait_serving()
    load = Load(s.port)
    most = 0
    try:
        def recycled() -> bool:
            nonlocal most
            most = max(most, len(s.workers()))
            return len(load.pids) >= 3

        wait_for(recycled, 30, "two recycles")
    finally:
        load.stop()
    assert not load.failed, load.failed[:5]
    assert most <= 2
    assert not first & s.workers()
    assert "max_requests" in s.text()
    assert s.stop() == 0


@pytest.mark.parametrize(("option", "value", "why"), [("--max-age", "2s", "max_age"),
                                                      ("--max-memory", "1KiB", "max_memory")])
def test_age_and_memory_recycle_through_the_surge(tmp_path: Path, serve: list[Serve],
                                                  option: str, value: str, why: str) -> None:
    """--max-age / --max-memory: the same surge path as max_requests (the replacement is
    ready first), no request fails, never more than N + 1 workers."""
    s = Serve(tmp_path, "asgi_app:app", option, value, workers=1)
    serve.append(s)
    first = s.wait_serving()
    load = Load(s.port)
    most = 0
    try:
        def recycled() -> bool:
            nonlocal most
            most = max(most, len(s.workers()))
            return len(load.pids) >= 3

        # 3 pids: the first worker, the surge worker, the first one's replacement.
        wait_for(recycled, 40, f"a recycle for {why}")
    finally:
        load.stop()
    assert not load.failed, load.failed[:5]
    assert most <= 2
    assert not first & s.workers()
    assert why in s.text()
    assert s.stop() == 0


def test_standby_replaces_a_killed_worker(tmp_path: Path, serve: list[Serve]) -> None:
    """A hot standby forked from the zygote, its app start-up already run, takes a killed
    worker's place: serving again well before the app's 2 s start-up would allow."""
    s = Serve(tmp_path, "asgi_app:app", "--standby", "1", env={"TEST_APP_STARTUP": "2"})
    serve.append(s)
    first = s.wait_serving()

    def standby_ready() -> bool:
        # Booted ahead, its start-up done: a negative index, RUNNING, in `corral status`.
        res = subprocess.run([*CORRAL, "--socket", s.sock, "status", "--json"],
                             capture_output=True, text=True, timeout=30)
        try:
            programs = json.loads(res.stdout)["programs"]
        except (ValueError, KeyError):
            return False
        return any(w["index"] < 0 and w["state"] == "running"
                   for p in programs for w in p["workers"])

    wait_for(standby_ready, 20, "a warm standby", interval=0.1)
    victim = min(first)
    t = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(s.workers()) == 2 and victim not in s.workers(), 10,
             "the replacement")
    took = time.monotonic() - t
    assert took < 1.5, f"replaced after {took:.2f}s: the 2 s start-up was not skipped"
    # The log line follows the hand-over (it is written after the decision): wait for it.
    wait_for(lambda: "takes the place" in s.text(), 10, "the hand-over's log line")
    assert s.stop() == 0


def test_a_dead_zygote_is_replaced_by_a_new_generation(tmp_path: Path,
                                                       serve: list[Serve]) -> None:
    s = Serve(tmp_path, "asgi_app:app")
    serve.append(s)
    first = s.wait_serving()
    zygotes = [p.pid for p in s.tree() if "zygote" in " ".join(p.cmdline())]
    assert len(zygotes) == 1
    os.kill(zygotes[0], signal.SIGKILL)
    wait_for(lambda: len(s.workers()) == 2 and not first & s.workers() and _ok(s.port), 30,
             "a new generation serving")
    assert "died" in s.text()
    assert s.stop() == 0


def test_shutdown_delay_keeps_serving_then_drains_and_closes_the_listener_last(
        tmp_path: Path, serve: list[Serve]) -> None:
    """SIGTERM with shutdown_delay: STOPPING, still accepting for the delay (a load balancer
    deregisters meanwhile), then the drain, then the listener is closed: refused after exit."""
    s = Serve(tmp_path, "asgi_app:app", "--shutdown-delay", "8", workers=1)
    serve.append(s)
    s.wait_serving()
    load = Load(s.port)
    try:
        wait_for(lambda: load.ok >= 3, 10, "requests served")
        s.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "shutdown_delay" in s.text(), 10, "the delay's log line")
        served = load.ok
        wait_for(lambda: load.ok >= served + 5, 6, "requests served during the delay")
        assert s.proc.poll() is None, "corral serve left before shutdown_delay was over"
    finally:
        load.stop()
    assert not load.failed, load.failed[:5]
    assert s.proc.wait(30) == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", s.port), timeout=5).close()


def test_serve_table_of_the_config(tmp_path: Path, serve: list[Serve]) -> None:
    """`corral -c corral.toml serve api`: bind, workers and the options from [serve.api]."""
    port = _free_port()
    config = tmp_path / "corral.toml"
    config.write_text(f"""
[serve.api]
app = "asgi_app:app"
bind = ["127.0.0.1:{port}"]
workers = 2
standby = 1
max_requests = 1000
""")
    s = Serve(tmp_path, "api", config=config, port=port)
    serve.append(s)
    s.wait_serving()
    assert _get(s.port)[0] == 200
    res = subprocess.run([*CORRAL, "--socket", s.sock, "status", "--json"],
                         capture_output=True, text=True, timeout=30)
    names = [p["name"] for p in json.loads(res.stdout)["programs"]]
    assert names and all(n.startswith("api@") for n in names), names
    # The standby of the table: booted ahead, a negative index.
    wait_for(lambda: any(
        w["index"] < 0 for p in json.loads(subprocess.run(
            [*CORRAL, "--socket", s.sock, "status", "--json"], capture_output=True,
            text=True, timeout=30).stdout)["programs"] for w in p["workers"]), 20,
        "the standby from the table")
    assert s.reload().returncode == 0
    assert s.stop() == 0


def _tcp_listeners(port: int) -> int:
    """LISTEN sockets on 127.0.0.1:port (state 0A in /proc/net/tcp)."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as fh:
        return sum(1 for line in fh if line.split()[1] == want and line.split()[3] == "0A")


def test_reuse_port_gives_each_worker_its_own_socket(tmp_path: Path,
                                                      serve: list[Serve]) -> None:
    """--reuse-port: corral's listener plus one per worker in the SO_REUSEPORT group (the
    kernel spreads connections over them), and the tcp_migrate_req check at start-up."""
    s = Serve(tmp_path, "asgi_app:app", "--reuse-port")
    serve.append(s)
    first = s.wait_serving()
    wait_for(lambda: _tcp_listeners(s.port) == 3, 10,
             f"3 listening sockets (have {_tcp_listeners(s.port)})")
    load = Load(s.port)
    try:
        wait_for(lambda: load.pids == {str(p) for p in first}, 20, "both workers serving")
    finally:
        load.stop()
    assert not load.failed, load.failed[:5]
    migrate = _listeners_migrate_req()
    if migrate != 1:
        assert "tcp_migrate_req" in s.text()
    assert s.stop() == 0
    wait_for(lambda: _tcp_listeners(s.port) == 0, 10, "every listener closed")


def _listeners_migrate_req() -> int | None:
    from corral.serve._listeners import check_migrate_req

    return check_migrate_req()


def test_corral_serve_adopts_socket_activation(tmp_path: Path) -> None:
    """corral serve started as systemd starts a socket-activated service (the listener on
    fd 3, LISTEN_FDS/LISTEN_FDNAMES, LISTEN_PID = its own pid): it adopts the socket instead
    of binding, serves on it, and leaves it open when it stops (systemd's copy keeps queueing
    connections for the next start)."""
    from corral.serve._listeners import bind, close_all, spawn_with_listeners

    lst = bind("127.0.0.1:0", name="web")
    port = lst.port
    assert port is not None
    log_path = tmp_path / "serve.log"
    seen: set[int] = set()
    with open(log_path, "wb") as fh:
        pid = spawn_with_listeners(
            [*CORRAL, "--socket", str(tmp_path / "ctl.sock"), "serve", "asgi_app:app",
             "--workers", "1", "--app-dir", str(APPS)], [lst],
            env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"), stdout=fh.fileno(),
            stderr=fh.fileno())
    seen.add(pid)

    def text() -> str:
        return log_path.read_text(errors="replace")

    try:
        def serving() -> bool:
            with contextlib.suppress(psutil.Error):
                seen.update(p.pid for p in psutil.Process(pid).children(recursive=True))
            return _ok(port)

        wait_for(serving, 30, f"serving on the adopted socket ({text()[-500:]})")
        assert "adopted 1 socket(s) from systemd: web=127.0.0.1:" in text()
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, text()[-2000:]
        wait_for(lambda: not _alive(seen - {pid}), 10, "every process gone")
        # Still listening: our copy stands for systemd's; a connection waits in the queue.
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        kill_pids(seen)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        close_all([lst])
