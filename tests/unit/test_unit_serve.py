"""Server mode's pure parts (the rolling plan, addresses, interface detection, options, unit
files) and a socket-activation hand-over without systemd (a real process, real sockets)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from corral._notify import Notifier
from corral.serve import _listeners
from corral.serve._server import ServeOptions, plan
from corral.serve._systemd import service_unit, socket_unit
from corral.serve._worker import detect_interface, own_listeners


def _roll(n: int, surge: int, unavailable: int) -> tuple[int, int]:
    """Simulate a whole reload with instant starts and drains; returns (steps, max alive)."""
    old_alive = old_target = n
    new_target = new_ready = 0
    most = n
    for step in range(100):
        new_target, old_target = plan(n, surge, unavailable, old_alive=old_alive,
                                      old_target=old_target, new_target=new_target,
                                      new_ready=new_ready)
        most = max(most, new_target + old_alive)
        assert new_ready + old_target >= n - unavailable  # capacity kept
        if new_ready == n and old_alive == 0:
            return step, most
        new_ready = new_target  # every started worker becomes ready
        old_alive = old_target  # every drained worker leaves
    raise AssertionError("the reload never finished")


@pytest.mark.parametrize("n,surge,unavailable", [(1, 1, 0), (2, 1, 0), (4, 1, 0), (4, 2, 0),
                                                 (4, 0, 1), (4, 1, 1), (3, 5, 0)])
def test_plan_finishes_within_the_bounds(n: int, surge: int, unavailable: int) -> None:
    _, most = _roll(n, surge, unavailable)
    assert most <= n + surge


def test_plan_waits_for_readiness_and_for_draining_workers() -> None:
    # Nothing ready: the old pool keeps every worker; one new worker (the surge) starts.
    assert plan(4, 1, 0, old_alive=4, old_target=4, new_target=0, new_ready=0) == (1, 4)
    assert plan(4, 1, 0, old_alive=4, old_target=4, new_target=1, new_ready=0) == (1, 4)
    # One ready: one old worker is told to leave, but no new one starts while it drains.
    assert plan(4, 1, 0, old_alive=4, old_target=4, new_target=1, new_ready=1) == (1, 3)
    # It has left: the next new worker starts.
    assert plan(4, 1, 0, old_alive=3, old_target=3, new_target=1, new_ready=1) == (2, 3)


def test_parse_bind_forms() -> None:
    assert _listeners.parse_bind("127.0.0.1:80").port == 80
    assert _listeners.parse_bind("[::1]:8000").host == "::1"
    assert _listeners.parse_bind(":9000").host == "0.0.0.0"
    assert _listeners.parse_bind("unix:/run/x.sock").path == "/run/x.sock"
    assert _listeners.parse_bind("fd://3").fd == 3
    for bad in ("", "localhost", "unix:rel.sock", "fd://x", "1.2.3.4:70000"):
        with pytest.raises(ValueError, match="bind"):
            _listeners.parse_bind(bad)


def test_detect_interface() -> None:
    async def asgi(scope, receive, send):  # type: ignore[no-untyped-def]
        pass

    def wsgi(environ, start_response):  # type: ignore[no-untyped-def]
        return []

    class App:
        async def __call__(self, scope, receive, send):  # type: ignore[no-untyped-def]
            pass

    assert detect_interface(asgi) == "asgi"
    assert detect_interface(wsgi) == "wsgi"
    assert detect_interface(App()) == "asgi"
    with pytest.raises(TypeError, match="--interface"):
        detect_interface(lambda: None)
    with pytest.raises(TypeError, match="callable"):
        detect_interface(42)


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="max_surge and max_unavailable"):
        ServeOptions(app="a:b", max_surge=0, max_unavailable=0)
    with pytest.raises(ValueError, match="app"):
        ServeOptions(app="nocolon")
    with pytest.raises(ValueError, match="min_ready"):
        ServeOptions(app="a:b", workers=2, min_ready=3)
    with pytest.raises(ValueError, match="start_method"):
        ServeOptions(app="a:b", start_method="fork")
    assert ServeOptions(app="a:b", bind="0.0.0.0:1").bind == ("0.0.0.0:1",)


def test_substitute_argv() -> None:
    a = socket.socket()
    b = socket.socket()
    try:
        lst = [_listeners.Listener("web", a, "x"), _listeners.Listener("admin", b, "y")]
        assert _listeners.substitute_argv(
            ["uvicorn", "--fd", "{listen.web.fd}", "fd://{listen.1.fd}"], lst) == [
            "uvicorn", "--fd", "3", "fd://4"]
        with pytest.raises(ValueError, match="names no listener"):
            _listeners.substitute_argv(["{listen.nope.fd}"], lst)
    finally:
        a.close()
        b.close()


def test_reuse_port_warning_says_why() -> None:
    assert _listeners.warn_reuse_port(1) is None
    assert "is 0" in (_listeners.warn_reuse_port(0) or "")
    assert "Linux < 5.14" in (_listeners.warn_reuse_port(None) or "")


@pytest.mark.timeout(30)
def test_reuse_port_gives_a_worker_a_queue_of_its_own() -> None:
    """own_listeners: a second socket in the shared listener's SO_REUSEPORT group, which the
    kernel hands a share of the new connections; plain and unix listeners get none."""
    shared = _listeners.bind("127.0.0.1:0", name="web", reuse_port=True, backlog=64)
    plain = _listeners.bind("127.0.0.1:0", name="plain", backlog=64)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    clients: list[socket.socket] = []
    own: list[socket.socket] = []
    try:
        own = own_listeners([shared.sock, plain.sock, unix], backlog=64)
        assert len(own) == 1
        assert own[0].getsockname() == shared.sock.getsockname()
        assert own[0].getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        for _ in range(40):  # the group spreads them by hash of the 4-tuple
            clients.append(socket.create_connection(shared.sock.getsockname(), timeout=5))
        got = {}
        for name, sock in (("shared", shared.sock), ("own", own[0])):
            sock.setblocking(False)
            n = 0
            while True:
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    break
                conn.close()
                n += 1
            got[name] = n
        assert got["shared"] + got["own"] == 40 and got["own"] > 0 and got["shared"] > 0, got
    finally:
        for c in [*clients, *own, unix]:
            c.close()
        _listeners.close_all([shared, plain])


_RECEIVER = textwrap.dedent("""
    import os, socket, sys
    from corral.serve._listeners import adopt_systemd
    pid_ok = os.environ.get("LISTEN_PID") == str(os.getpid())
    got = adopt_systemd()
    assert "LISTEN_FDS" not in os.environ  # unset for our children
    print(pid_ok, [(x.name, x.fd, x.origin) for x in got], sys.argv[1:], flush=True)
    conn, _ = got[0].sock.accept()
    conn.sendall(b"hello from fd 3")
    conn.close()
""")


@pytest.mark.timeout(30)
def test_socket_activation_handover_without_systemd(tmp_path: Path) -> None:
    """What systemd does, done by corral for a command program: the listeners on fds 3..,
    LISTEN_FDS/LISTEN_FDNAMES, LISTEN_PID = the exec'd program's own pid, and
    {listen.NAME.fd} in its argv; the program adopts them (sd_listen_fds) and accepts."""
    web = _listeners.bind("127.0.0.1:0", name="web")
    admin = _listeners.bind(f"unix:{tmp_path}/admin.sock", name="admin")
    script = tmp_path / "receiver.py"
    script.write_text(_RECEIVER)
    out_r, out_w = os.pipe()
    pid = 0
    try:
        pid = _listeners.spawn_with_listeners(
            [sys.executable, str(script), "--fd", "{listen.web.fd}", "{listen.admin.fd}"],
            [web, admin], stdout=out_w, cwd=str(tmp_path))
        os.close(out_w)
        out_w = -1
        with socket.create_connection(("127.0.0.1", web.port), timeout=10) as c:
            c.settimeout(10)
            assert c.recv(100) == b"hello from fd 3"
        with os.fdopen(out_r) as fh:
            out_r = -1
            line = fh.readline().strip()
        assert line == ("True [('web', 3, 'systemd'), ('admin', 4, 'systemd')] "
                        "['--fd', '3', '4']")
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        if pid:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        for fd in (out_r, out_w):
            if fd >= 0:
                os.close(fd)
        _listeners.close_all([web, admin])
    assert not os.path.exists(tmp_path / "admin.sock")


def test_adopt_ignores_fds_meant_for_another_process() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}
    assert _listeners.adopt_systemd(env) == []


def test_notifier_is_quiet_without_a_socket_and_strips_nothing_it_did_not_take() -> None:
    n = Notifier(env={})
    assert not n.enabled and n.watchdog_interval is None
    n.ready("x")
    assert n.sent == []
    n2 = Notifier(env={"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "2000000",
                       "WATCHDOG_PID": str(os.getpid())})
    assert n2.watchdog_interval == 1.0


def test_unit_files() -> None:
    svc = service_unit("api", ["app:app", "--workers", "4"], workdir="/srv/api",
                       socket=True, notify_reload=True, stop_timeout=45, corral="/usr/bin/corral")
    assert "Type=notify-reload" in svc and "Requires=api.socket" in svc
    assert "ExecStart=/usr/bin/corral serve app:app --workers 4" in svc
    assert "KillMode=mixed" in svc and "TimeoutStopSec=45" in svc
    plain = service_unit("api", ["app:app"], workdir="/srv", corral="/c")
    assert "Type=notify\n" in plain and "ExecReload=/bin/kill -HUP $MAINPID" in plain
    sock = socket_unit("api", ["127.0.0.1:8000", "unix:/run/api.sock"])
    assert "ListenStream=127.0.0.1:8000" in sock and "ListenStream=/run/api.sock" in sock
    assert "FileDescriptorName=api" in sock


def test_export_systemd_command(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "corral.cli.main", "export", "systemd",
                          "app:app", "-w", "3", "--socket-unit", "-o", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "web.service").read_text().count("--workers 3") == 1
    assert (tmp_path / "web.socket").exists()


@pytest.mark.parametrize(("args", "expected"), [
    (["serve", "myapp"], "APP must be MODULE:ATTRIBUTE (e.g. myapp:app), got 'myapp'"),
    (["serve", "m:a", "--bind", "nohost"], "bind must be HOST:PORT"),
    (["serve", "m:a", "--max-surge", "0", "--max-unavailable", "0"], "cannot both be 0"),
    (["serve", "m:a", "-w", "2", "--min-ready", "3"], "min_ready must be <= workers (2), got 3"),
    (["serve", "m:a", "--standby", "1", "--start-method", "spawn"], "standby needs"),
])
def test_serve_bad_input_is_a_usage_error(tmp_path: Path, args: list[str],
                                          expected: str) -> None:
    """Refused before anything is bound or started, with what was expected and given."""
    res = subprocess.run([sys.executable, "-m", "corral.cli.main", "--socket",
                          str(tmp_path / "s.sock"), *args], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert expected in " ".join(res.stderr.split()), res.stderr


def test_import_corral_does_not_import_the_server() -> None:
    code = ("import sys, corral; bad = [m for m in ('uvicorn', 'a2wsgi', 'corral.serve') "
            "if m in sys.modules]; print(bad)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert res.stdout.strip() == "[]"


def _child_ending(how: str) -> int:
    """A forked child that exits with ``how``'s code at once ("exit N"), or waits for a
    signal (the caller sends it)."""
    pid = os.fork()
    if pid == 0:
        if how.startswith("exit"):
            os._exit(int(how.split()[1]))
        signal.pause()
        os._exit(99)
    return pid


@pytest.mark.parametrize("how", ["exit 0", "exit 3", "SIGKILL", "SIGTERM"])
def test_a_zygote_reports_the_status_waitpid_would_give(how: str) -> None:
    """The zygote reads a worker's status with waitid (WNOWAIT, to report it before the
    reap): the same status word as waitpid's."""
    from corral.serve._zygote import _wait_status

    pid = _child_ending(how)
    if how.startswith("SIG"):
        os.kill(pid, getattr(signal, how))
    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    assert info is not None
    _, status = os.waitpid(pid, 0)
    assert _wait_status(info.si_code, info.si_status) == status



@pytest.mark.parametrize("how", ["exit 0", "exit 3", "SIGKILL"])
def test_a_dead_workers_status_is_read_from_its_zombie_until_it_is_reaped(how: str) -> None:
    """The supervisor reads the status of a zygote's worker from /proc while it is a zombie
    (its pidfd says it has exited); once reaped, nothing is read (the zygote's report tells)."""
    import select

    from corral.serve._zygote import _zombie_status

    pid = _child_ending(how)
    pidfd = os.pidfd_open(pid)
    try:
        if how == "SIGKILL":
            assert _zombie_status(pid, pidfd) is None  # alive: nothing to read
            os.kill(pid, signal.SIGKILL)
        select.select([pidfd], [], [], 10)
        read = _zombie_status(pid, pidfd)
        _, status = os.waitpid(pid, 0)
        assert read == (status or None)  # a clean exit (0) is left to the zygote's report
        assert _zombie_status(pid, pidfd) is None
    finally:
        os.close(pidfd)
