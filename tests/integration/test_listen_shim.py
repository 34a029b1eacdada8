"""A listen program run as another user starts with the same signal
dispositions as one run without user/group (the Python shim must not leak its own), and any
command program gets fds 0-2 and its sockets only."""
from __future__ import annotations

import os
import pwd
import select
import signal
from pathlib import Path

import pytest

from corral._command import CommandProcess, Launch
from corral.serve._listeners import bind, spawn_with_listeners

SCRIPT = ("grep -E '^(SigIgn|Uid|Groups)' /proc/self/status; "
          "ls /proc/self/fd; echo \"PID=$$ LPID=$LISTEN_PID\"")


def _wait_exit(pid: int, timeout: float = 10.0) -> int:
    """The exit status of our child ``pid``, waited for on its pidfd (killed past ``timeout``)."""
    pidfd = os.pidfd_open(pid)
    try:
        if not select.select([pidfd], [], [], timeout)[0]:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the program (pid {pid}) did not exit within {timeout}s")
    finally:
        os.close(pidfd)
    return os.waitpid(pid, 0)[1]


def _run(tmp_path: Path, tag: str, ids: tuple[int | None, int | None, list[int] | None] | None
         ) -> str:
    out = tmp_path / f"{tag}.txt"
    lst = bind("127.0.0.1:0", name="web")
    try:
        with open(out, "wb") as f:
            pid = spawn_with_listeners(["/bin/sh", "-c", SCRIPT], [lst], ids=ids,
                                       stdout=f.fileno())
        _wait_exit(pid)
    finally:
        lst.sock.close()
    return out.read_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch user")
def test_shim_as_other_user_does_not_leak_ignored_signals(tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    plain = _run(tmp_path, "plain", None)
    switched = _run(tmp_path, "switched", (nobody.pw_uid, nobody.pw_gid, []))
    sig = {t: next(ln for ln in s.splitlines() if ln.startswith("SigIgn"))
           for t, s in (("plain", plain), ("switched", switched))}
    assert f"\t{nobody.pw_uid}\t" in switched
    # SIGPIPE / SIGXFSZ ignored by the interpreter must not survive the exec.
    assert sig["switched"] == sig["plain"], (plain, switched)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch user")
def test_shim_as_other_user_fds_groups_and_listen_pid(tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    out = _run(tmp_path, "ids", (nobody.pw_uid, nobody.pw_gid, []))
    lines = out.splitlines()
    assert lines[0].split()[1:] == [str(nobody.pw_uid)] * 4
    assert lines[1].split()[1:] == []  # no supplementary group (root's dropped)
    pid, lpid = lines[-1].split()
    assert pid.split("=")[1] == lpid.split("=")[1]


@pytest.mark.parametrize("switch", [False, True])
def test_listen_program_gets_no_inheritable_fd_of_corral(tmp_path: Path, switch: bool) -> None:
    """An fd corral itself inherited without close-on-exec (from its launching shell, say)
    must not reach the program: the Popen path (close_fds=True) closes it, so should this."""
    if switch and os.geteuid() != 0:
        pytest.skip("needs root to switch user")
    r, w = os.pipe()
    os.set_inheritable(w, True)
    try:
        ids = (pwd.getpwnam("nobody").pw_uid, pwd.getpwnam("nobody").pw_gid, []) if switch \
            else None
        out = _run(tmp_path, "leak", ids)
    finally:
        os.close(r)
        os.close(w)
    fds = sorted(int(ln) for ln in out.splitlines() if ln.isdigit())
    # Exactly 0-2 and its one socket, as systemd hands them over; 4 is ls's own listing.
    assert w not in fds, out
    assert fds == [0, 1, 2, 3, 4], out


@pytest.mark.parametrize("switch", [False, True])
def test_command_program_without_listen_gets_no_inheritable_fd_of_corral(
        tmp_path: Path, switch: bool) -> None:
    """The same for a command program with no socket (the Popen path): 0-2 only."""
    if switch and os.geteuid() != 0:
        pytest.skip("needs root to switch user")
    out = tmp_path / "plain.txt"
    r, w = os.pipe()
    os.set_inheritable(w, True)
    try:
        with open(out, "wb") as f:
            proc = CommandProcess.start(["/bin/sh", "-c", "ls /proc/self/fd"],
                                        user="nobody" if switch else None,
                                        launch=Launch(stdout=f.fileno()))
        try:
            _wait_exit(proc.pid)
        finally:
            proc.reap()  # already waited for: this unregisters it from the keeper
            proc.close()
    finally:
        os.close(r)
        os.close(w)
    fds = sorted(int(ln) for ln in out.read_text().splitlines() if ln.isdigit())
    assert fds == [0, 1, 2, 3], out.read_text()  # 3: ls's own listing


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch user")
def test_shim_as_other_user_unknown_program_exits_127_with_a_clear_message(
        tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    err = tmp_path / "err.txt"
    lst = bind("127.0.0.1:0", name="web")
    try:
        with open(err, "wb") as f:
            pid = spawn_with_listeners(["corral-no-such-program"], [lst],
                                       ids=(nobody.pw_uid, nobody.pw_gid, []),
                                       stderr=f.fileno())
        status = _wait_exit(pid)
    finally:
        lst.sock.close()
    text = err.read_text()
    assert os.waitstatus_to_exitcode(status) == 127, text
    assert "corral-listen: corral-no-such-program:" in text and "Traceback" not in text
