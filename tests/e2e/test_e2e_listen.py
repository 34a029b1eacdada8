"""A command program gets its listening sockets as systemd hands them over (issue 12): bound
once by ``corral run``, on fds 3.. of every start, with LISTEN_FDS, LISTEN_FDNAMES and
LISTEN_PID = the program's own pid, ``{listen.NAME.fd}`` in its argv; the same socket across
restarts, closed only when corral ends."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from support import wait_for

pytestmark = pytest.mark.timeout(90)

# A tiny server on the handed-over socket: every connection gets a line about the hand-over.
SERVER = """
import os, socket, sys
fd = int(sys.argv[1])
env_ok = (os.environ.get("LISTEN_PID") == str(os.getpid())
          and os.environ.get("LISTEN_FDS") == "1" and os.environ.get("LISTEN_FDNAMES") == "web")
sock = socket.socket(fileno=fd)
umask = os.umask(0)
while True:
    conn, _ = sock.accept()
    conn.sendall(f"{os.getpid()} fd={fd} env_ok={env_ok} umask={umask:03o}\\n".encode())
    conn.close()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ask(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        return c.makefile().readline().strip()


def _answer(port: int) -> str | None:
    """The server's line, or None if there is none yet (refused, reset, or closed with no line:
    a connection the killed process accepted in the moment before the signal took it)."""
    try:
        return _ask(port) or None
    except OSError:
        return None


def test_command_program_gets_its_sockets_as_from_systemd(corral: Any, tmp_path: Path
                                                          ) -> None:
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    port = _free_port()
    argv = [sys.executable, str(script), "{listen.web.fd}"]
    c = corral(config=f"""
[program.web]
command = {json.dumps(argv)}
listen = {{ web = "127.0.0.1:{port}" }}
umask = "027"
""")
    c.wait_running(1, "web")
    line = _ask(port)
    pid, fd, env_ok, umask = line.split()
    assert (fd, env_ok, umask) == ("fd=3", "env_ok=True", "umask=027"), line
    # A restart gets the same socket (bound once): connections made meanwhile wait in its
    # queue and are served by the next process.
    os.kill(int(pid), signal.SIGKILL)
    wait_for(lambda: (a := _answer(port)) is not None and a.split()[0] != pid, 20,
             "the restarted program serving on the same socket")
    assert c.stop() == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_a_listen_address_in_use_stops_corral_run_at_once(corral: Any, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        c = corral(config=f"""
[program.web]
command = ["sleep", "60"]
listen = ["127.0.0.1:{port}"]
""", wait=False)
        assert c.wait_exit(30) == 1
        assert f"127.0.0.1:{port}" in c.err()


def test_a_config_reload_keeps_the_socket_of_a_changed_program(corral: Any,
                                                               tmp_path: Path) -> None:
    """`corral reload` replacing a program whose `listen` did not change: the new process gets
    the very same socket (one queue across the replacement); a new address already in use
    refuses the reload and changes nothing."""
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    port = _free_port()
    argv = [sys.executable, str(script), "{listen.web.fd}"]

    def config(extra: str) -> str:
        return (f"[program.web]\ncommand = {json.dumps(argv)}\n"
                f"listen = {{ web = \"127.0.0.1:{port}\" }}\n{extra}\n")

    c = corral(config=config(""))
    c.wait_running(1, "web")
    first = _ask(port).split()[0]
    path = tmp_path / "c.toml"
    path.write_text(config('env = { VERSION = "2" }'))
    c.ok("reload")
    wait_for(lambda: (a := _answer(port)) is not None and a.split()[0] != first, 20,
             "the replaced program serving on the same socket")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        path.write_text(config(f'[program.more]\ncommand = ["sleep", "60"]\n'
                               f'listen = ["127.0.0.1:{taken.getsockname()[1]}"]'))
        res = c.cli("reload")
        assert res.returncode != 0 and "127.0.0.1:" in res.stderr, res.stderr
    assert [p["name"] for p in c.status()["programs"]] == ["web"]
    assert c.stop() == 0


def _listener_inode(port: int) -> int:
    with open("/proc/net/tcp") as fh:
        for line in fh.readlines()[1:]:
            parts = line.split()
            if parts[1].endswith(f":{port:04X}") and parts[3] == "0A":  # LISTEN
                return int(parts[9])
    raise AssertionError(f"nothing listens on port {port}")


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_sockets_handed_to_a_program_run_as_another_user(corral: Any) -> None:
    """listen with user/group/umask: the ids are switched (by a Python shim started as root:
    a shell cannot), and the socket still lands on fd 3 with LISTEN_PID = the program's pid."""
    import grp
    import pwd

    try:
        nobody = pwd.getpwnam("nobody")
        daemon_gid = grp.getgrnam("daemon").gr_gid
    except KeyError:
        pytest.skip("no user 'nobody' or group 'daemon' here")
    port = _free_port()
    # A shell command: `nobody` may not be able to run this venv's Python (under /root).
    show = ('echo "ids $(id -u) $(id -g) umask $(umask) pid $$ listen_pid $LISTEN_PID '
            'fds $LISTEN_FDS names $LISTEN_FDNAMES fd3 $(readlink /proc/$$/fd/3)"; '
            'exec sleep 600')
    c = corral(config=f"""
[program.web]
command = ["/bin/sh", "-c", {json.dumps(show)}]
listen = {{ web = "127.0.0.1:{port}" }}
user = "nobody"
group = "daemon"
umask = "027"
cwd = "/"
""")
    w = c.wait_running(1, "web")[0]
    text = c.wait_out("web.0 |  ids ")
    line = next(x for x in text.splitlines() if "web.0 |  ids " in x).split("|  ", 1)[1]
    inode = _listener_inode(port)
    assert line == (f"ids {nobody.pw_uid} {daemon_gid} umask 0027 pid {w['pid']} listen_pid "
                    f"{w['pid']} fds 1 names web fd3 socket:[{inode}]"), line
    with open(f"/proc/{w['pid']}/status") as fh:
        status = {k: v.split() for k, _, v in (x.partition(":") for x in fh)}
    assert set(status["Uid"]) == {str(nobody.pw_uid)}
    assert status["Groups"] == [str(x) for x in os.getgrouplist("nobody", daemon_gid)]
    assert c.stop() == 0
