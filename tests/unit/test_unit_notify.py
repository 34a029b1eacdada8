"""sd_notify: the receiving socket (real child processes, real credentials) and the sender
(against a fake NOTIFY_SOCKET of our own)."""

from __future__ import annotations

import array
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral import _notify
from corral._notify import NotifyMessage, NotifySocket, in_process_group, parse_notify

pytestmark = pytest.mark.timeout(60)

SRC = str(Path(__file__).resolve().parents[2] / "src")


def test_parse_notify_fields_and_malformed_lines() -> None:
    assert parse_notify(b"READY=1\nSTATUS=a=b c\n\nbogus\nlower=x\nMAINPID=12\nREADY=0") == {
        "READY": "0", "STATUS": "a=b c", "MAINPID": "12"}
    msg = NotifyMessage(1, 0, 0, parse_notify(
        b"READY=1\nWATCHDOG=trigger\nERRNO=5\nEXTEND_TIMEOUT_USEC=x"))
    assert msg.ready and msg.watchdog_trigger and not msg.watchdog
    assert msg.errno == 5 and msg.extend_timeout_usec is None and msg.mainpid is None


def child_sends(lines: list[str], *, new_group: bool = True,
                env: dict[str, str]) -> subprocess.Popen[bytes]:
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {SRC!r})
        from corral import _notify
        for text in {lines!r}:
            assert _notify.notify_raw(text)
        sys.stdin.read()  # stay alive until the test is done with us
    """)
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **env},
                            stdin=subprocess.PIPE, process_group=0 if new_group else None)


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)
        if p.stdin:
            p.stdin.close()


@pytest.mark.parametrize("where", ["abstract", "path"])
def test_receiver_takes_pid_from_credentials(loop, children, where: str) -> None:
    got: list[NotifyMessage] = []
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o700)
        path = None if where == "abstract" else os.path.join(d, "notify")
        sock = NotifySocket(loop, got.append, accept_pid=None, path=path, name="web.0")
        assert sock.address.startswith("@" if path is None else "/")
        if path:
            assert os.stat(path).st_mode & 0o777 == 0o600
        child = child_sends(["READY=1\nSTATUS=booted", "WATCHDOG=1", "STOPPING=1"],
                            env=sock.env())
        children.append(child)
        loop.run_until(lambda: len(got) == 3, what="three messages")
        assert [m.pid for m in got] == [child.pid] * 3
        assert got[0].uid == os.getuid() and got[0].gid == os.getgid()
        assert got[0].ready and got[0].status == "booted"
        assert got[1].watchdog and got[2].stopping
        sock.close()
        if path:
            assert not os.path.exists(path)


def test_receiver_accepts_only_the_workers_process_group(loop, children) -> None:
    got: list[NotifyMessage] = []
    # The worker: a process that leads its own group and stays alive.
    worker = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                              stdin=subprocess.PIPE, process_group=0)
    children.append(worker)
    sock = NotifySocket(loop, got.append, accept_pid=in_process_group(worker.pid))
    # The worker leads its own group: its message is heard...
    insider = child_sends(["STATUS=outsider"], new_group=True, env=sock.env())
    children.append(insider)
    # ...a process in another group (here: a sibling in its own group) is not.
    loop.run_until(lambda: sock.rejected == 1, what="outsider rejected")
    # Our own pid is not in the worker's group either.
    assert _notify.notify_raw("READY=1", env=sock.env())
    loop.run_until(lambda: sock.rejected == 2, what="test process rejected")
    assert got == []
    # A grandchild in the worker's group is accepted (the group is the unit).
    code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {SRC!r})
        os.setpgid(0, {worker.pid})
        from corral import _notify
        assert _notify.notify_raw("READY=1")
        sys.stdin.read()
    """)
    member = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **sock.env()},
                              stdin=subprocess.PIPE)
    children.append(member)
    loop.run_until(lambda: got, what="member heard")
    assert got[0].pid == member.pid and got[0].ready
    sock.close()


def test_receiver_drops_oversized_and_never_blocks(loop) -> None:
    got: list[NotifyMessage] = []
    sock = NotifySocket(loop, got.append, accept_pid=None, max_size=64)
    assert _notify.notify_raw("STATUS=" + "x" * 200, env=sock.env())
    assert _notify.notify_raw("READY=1", env=sock.env())
    loop.run_until(lambda: got, what="the small one")
    assert sock.rejected == 1 and got[0].ready and len(got) == 1
    sock.close()


def test_receiver_closes_passed_fds(loop) -> None:
    got: list[NotifyMessage] = []
    sock = NotifySocket(loop, got.append, accept_pid=None)
    r, w = os.pipe()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendmsg([b"FDSTORE=1"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))],
                  0, "\0" + sock.address[1:])
    os.close(r)
    loop.run_until(lambda: got, what="FDSTORE message")
    # Our copy of the read end is gone and the receiver closed its own: writing hits EPIPE.
    with pytest.raises(BrokenPipeError):
        os.write(w, b"x")
    os.close(w)
    sock.close()


# --- sender --------------------------------------------------------------------------------


@pytest.fixture(params=["abstract", "path"])
def fake_systemd(request: pytest.FixtureRequest) -> Iterator[tuple[socket.socket, dict[str, str]]]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with tempfile.TemporaryDirectory() as d:
        if request.param == "abstract":
            name = f"corral-test-{os.getpid()}-{time.monotonic_ns()}"
            s.bind("\0" + name)
            env = {"NOTIFY_SOCKET": "@" + name}
        else:
            path = os.path.join(d, "notify")
            s.bind(path)
            env = {"NOTIFY_SOCKET": path}
        s.settimeout(5)
        yield s, env
        s.close()


def test_sender_order_and_content(fake_systemd: tuple[socket.socket, dict[str, str]]) -> None:
    s, env = fake_systemd
    assert _notify.ready("2/2 workers ready", env=env)
    assert _notify.status("draining", env=env)
    assert _notify.watchdog(env=env)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert _notify.reloading(env=env)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert _notify.extend_timeout(2.5, env=env)
    assert _notify.stopping(env=env)
    assert _notify.notify(READY=True, MAINPID=7, env=env)
    got = [s.recv(4096).decode() for _ in range(7)]
    assert got[:3] == ["READY=1\nSTATUS=2/2 workers ready", "STATUS=draining", "WATCHDOG=1"]
    reload_fields = parse_notify(got[3].encode())
    assert list(reload_fields) == ["RELOADING", "MONOTONIC_USEC"]
    assert before <= int(reload_fields["MONOTONIC_USEC"]) <= after
    assert got[4:] == ["EXTEND_TIMEOUT_USEC=2500000", "STOPPING=1", "READY=1\nMAINPID=7"]


def test_sender_is_a_noop_without_socket_and_rejects_bad_input() -> None:
    assert _notify.ready(env={}) is False
    assert _notify.notify_raw("READY=1", env={"NOTIFY_SOCKET": "relative"}) is False
    with pytest.raises(ValueError, match="one line"):
        _notify.notify(STATUS="a\nb", env={})
    with pytest.raises(ValueError, match="seconds"):
        _notify.extend_timeout(0, env={})


def test_sender_never_blocks_on_a_full_receiver(
        fake_systemd: tuple[socket.socket, dict[str, str]]) -> None:
    _s, env = fake_systemd
    start = time.monotonic()
    results = [_notify.watchdog(env=env) for _ in range(2000)]
    assert time.monotonic() - start < 10
    assert results[0] is True and results[-1] is False  # the queue filled: dropped, not blocked


def test_sender_to_dead_socket_returns_false(tmp_path: Path) -> None:
    assert _notify.ready(env={"NOTIFY_SOCKET": str(tmp_path / "nobody-home")}) is False


def test_watchdog_interval() -> None:
    assert _notify.watchdog_interval({}) is None
    assert _notify.watchdog_interval({"WATCHDOG_USEC": "10000000"}) == 5.0
    pid = str(os.getpid())
    assert _notify.watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": pid}) == 1.0
    assert _notify.watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None
    assert _notify.watchdog_interval({"WATCHDOG_USEC": "junk"}) is None
    assert _notify.strip_notify_env({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1",
                                     "WATCHDOG_PID": "2", "PATH": "/bin"}) == {"PATH": "/bin"}
