"""Adversarial: a listen program run as another user starts with the same signal
dispositions as one run without user/group (the Python shim must not leak its own)."""
from __future__ import annotations

import os
import pwd
import time
from pathlib import Path

import pytest

from corral.serve._listeners import bind, spawn_with_listeners

SCRIPT = ("grep -E '^(SigIgn|Uid|Groups)' /proc/self/status; "
          "ls /proc/self/fd; echo \"PID=$$ LPID=$LISTEN_PID\"")


def _run(tmp_path: Path, tag: str, ids: tuple[int | None, int | None, list[int] | None] | None
         ) -> str:
    out = tmp_path / f"{tag}.txt"
    lst = bind("127.0.0.1:0", name="web")
    try:
        with open(out, "wb") as f:
            pid = spawn_with_listeners(["/bin/sh", "-c", SCRIPT], [lst], ids=ids,
                                       stdout=f.fileno())
        deadline = time.monotonic() + 10
        while True:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                pytest.fail("shim did not exit")
            time.sleep(0.01)
    finally:
        lst.sock.close()
    return out.read_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch user")
def test_shim_as_other_user_does_not_leak_ignored_signals(tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    plain = _run(tmp_path, "plain", None)
    switched = _run(tmp_path, "switched", (nobody.pw_uid, nobody.pw_gid, []))
    sig = {t: [ln for ln in s.splitlines() if ln.startswith("SigIgn")][0]
           for t, s in (("plain", plain), ("switched", switched))}
    assert f"\t{nobody.pw_uid}\t" in switched
    # SIGPIPE / SIGXFSZ ignored by the interpreter must not survive the exec.
    assert sig["switched"] == sig["plain"], (plain, switched)
