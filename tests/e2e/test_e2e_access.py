"""The control socket refuses other users, checked with a real second user (``nobody``)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import struct
import tempfile
from pathlib import Path

import pytest

from conftest import Corral, toml_argv, worker

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second user"),
]


def _ask_as(user: str, path: str) -> dict[str, object]:
    """Connect to ``path`` as ``user`` (a forked child that drops to that uid; it runs no
    program, so it needs no access to this Python) and send one `status` request."""
    pw = pwd.getpwnam(user)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns to pytest
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            try:
                s.connect(path)
            except PermissionError:
                out: dict[str, object] = {"connect": "EACCES"}
            else:
                body = json.dumps({"v": 1, "id": 1, "command": "status", "args": {}}).encode()
                try:
                    s.sendall(struct.pack(">I", len(body)) + body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # refused and hung up before our request: its reason is waiting
                data = b""
                while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                out = json.loads(data[4:]) if len(data) > 4 else {"closed": True}
            os.write(w, json.dumps(out).encode())
        except BaseException as exc:  # reported to the parent
            os.write(w, json.dumps({"child_error": repr(exc)}).encode())
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    try:
        raw = b""
        while chunk := os.read(r, 65536):
            raw += chunk
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    return json.loads(raw)  # type: ignore[no-any-return]


def test_other_users_are_refused(tmp_path: Path) -> None:
    for user in ("nobody", "daemon"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            pytest.skip(f"no user {user!r} here")
    # The socket directory must be reachable by others (with allow_uids corral makes it 0711
    # and the socket 0666, and SO_PEERCRED decides): not under pytest's private tmp.
    sock_dir = tempfile.mkdtemp(prefix="corral-access-", dir="/tmp")
    c = Corral(tmp_path)
    c.dir = Path(sock_dir)
    c.socket = os.path.join(sock_dir, "corral.sock")
    conf = tmp_path / "c.toml"
    conf.write_text(f'allow_uids = ["daemon"]\n[program.w]\ncommand = {toml_argv(worker())}\n')
    try:
        c.start(["-c", str(conf)])
        c.wait_running(1)
        assert oct(os.stat(sock_dir).st_mode & 0o777) == "0o711"
        refused = _ask_as("nobody", c.socket)
        assert refused.get("status") == "error", refused
        assert refused["error"]["code"] == "forbidden"  # type: ignore[index]
        assert "uid 65534" in refused["error"]["message"]  # type: ignore[index]
        c.wait_err("refused a connection from pid")
        assert "uid 65534" in c.err()
        allowed = _ask_as("daemon", c.socket)
        assert allowed["status"] == "ok"
        assert allowed["data"]["schema"] == "corral.status/1"  # type: ignore[index]
        c.stop()
        # Without allow lists: a 0700 directory, the kernel refuses at connect already.
        private = Corral(tmp_path, "p")
        private.dir = Path(sock_dir)
        private.socket = os.path.join(sock_dir, "corral.sock")
        os.chmod(sock_dir, 0o700)
        try:
            private.start(["-n", "1", "--", *worker()])
            assert _ask_as("nobody", private.socket) == {"connect": "EACCES"}
        finally:
            private.cleanup()
    finally:
        c.cleanup()
        shutil.rmtree(sock_dir, ignore_errors=True)
