"""A Python target's env, cwd, umask, user and group (PoolSpec), under every start method.

As root the workers switch to ``nobody``: that user's ids and groups (never root's), the
parent-death signal armed again after the switch (a change of credentials clears it), and
everything of corral's still working (readiness, heartbeats, stop, restart).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import workers as w
from _helpers import pool

from support import START_METHODS, wait_for

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory another user can write to (pytest's tmp is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="corral-settings-", dir="/tmp"))
    os.chmod(path, 0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def identity(outdir: Path, index: int) -> dict[str, object] | None:
    path = outdir / f"identity-{index}.txt"
    return json.loads(path.read_text()) if path.exists() else None


@pytest.mark.parametrize("method", START_METHODS)
def test_env_cwd_and_umask(method: str, no_leaks: set[int], shared_dir: Path) -> None:
    with pool(no_leaks, w.report_identity, workers=1, args=lambda i: (str(shared_dir),),
              start_method=method, ready_when="ready", heartbeat_timeout=10,
              env={"CORRAL_TEST_VAR": "from the spec", "PATH": os.environ["PATH"]},
              cwd=str(shared_dir), umask=0o027) as (sup, _log):
        assert sup.wait_ready(timeout=30) == 1
        got = identity(shared_dir, 0)
        assert got is not None
        assert got["env"] == "from the spec" and got["home"] is None  # the whole environment
        assert got["cwd"] == str(shared_dir) and got["umask"] == 0o027
        assert got["uid"] == os.getuid()


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
@pytest.mark.parametrize("method", START_METHODS)
def test_user_switch_keeps_corrals_guarantees(method: str, no_leaks: set[int],
                                              shared_dir: Path) -> None:
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' here")
    with pool(no_leaks, w.report_identity, workers=1, args=lambda i: (str(shared_dir),),
              start_method=method, ready_when="ready", heartbeat_timeout=2,
              user="nobody", cwd=str(shared_dir)) as (sup, _log):
        assert sup.wait_ready(timeout=30) == 1
        got = identity(shared_dir, 0)
        assert got is not None
        assert (got["uid"], got["gid"]) == (nobody.pw_uid, nobody.pw_gid)
        assert got["groups"] == sorted(set(os.getgrouplist("nobody", nobody.pw_gid)))
        assert 0 not in got["groups"]  # none of root's
        assert got["pdeathsig"] == signal.SIGKILL  # armed again after the switch
        assert got["pgid"] == got["pid"]
        # Heartbeats still reach the supervisor (a worker that stopped beating would be
        # replaced after 2 s): it stays the same process well past the timeout.
        first = got["pid"]
        wait_for(lambda: (s := sup.status()[0]).heartbeat_age is not None
                 and s.heartbeat_age < 1.0, 10, "a fresh heartbeat")
        # A restart (the supervisor signals another user's process) and a new identity file.
        (shared_dir / "identity-0.txt").unlink()
        sup.restart(0)
        wait_for(lambda: (g := identity(shared_dir, 0)) is not None and g["pid"] != first, 30,
                 "the restarted worker")
        assert sup.status()[0].pid != first
