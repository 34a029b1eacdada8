"""The keys of a ``[program]`` table that shape a command's process, end to end: ``cwd``,
``env``, ``env_file``, ``umask``, ``user``/``group`` (as root), ``stop_signal``, and the ones
that end a worker (``max_age``, ``max_memory``, ``startup_timeout``), each checked from what
the real command sees or from the exit cause corral records."""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import Corral, toml_argv, worker

pytestmark = pytest.mark.timeout(90)

# A shell command, not the test worker: `nobody` cannot run this venv's Python (under /root).
SHOW = ("echo \"ids $(id -u) $(id -g) umask $(umask) cwd $(pwd) A=$A B=$B C=$C\"; "
        "exec sleep 600")


def test_cwd_env_env_file_and_umask(corral: Any, tmp_path: Path) -> None:
    wd = tmp_path / "wd"
    wd.mkdir()
    (tmp_path / "extra.env").write_text("# comment\nB=from-file\nC='quoted value'\nA=overridden\n")
    c: Corral = corral(config=f"""
[program.here]
command = {SHOW!r}
shell = true
cwd = "wd"
env_file = "extra.env"
env = {{ A = "from-env" }}
umask = "027"
""")
    c.wait_running(1)
    text = c.wait_out("ids ")
    line = re.search(r"here\.0\s+\|  (ids .*)", text)
    assert line, text
    uid, gid = os.getuid(), os.getgid()
    # env wins over env_file; the file's quotes are taken off; cwd is relative to the file
    assert line.group(1) == (f"ids {uid} {gid} umask 0027 cwd {wd} A=from-env B=from-file "
                             f"C=quoted value")


def _ids(pid: int) -> dict[str, list[str]]:
    with open(f"/proc/{pid}/status") as fh:
        return {k: v.split() for k, _, v in (x.partition(":") for x in fh)
                if k in ("Uid", "Gid", "Groups")}


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="user/group switch needs root (and setpriv, to give corral "
                           "supplementary groups)")
def test_user_and_group_as_root(corral: Any) -> None:
    try:
        nobody = pwd.getpwnam("nobody")
        daemon_gid = grp.getgrnam("daemon").gr_gid
    except KeyError:
        pytest.skip("no user 'nobody' or group 'daemon' here")
    # corral itself holds supplementary groups (adm, 4): the workers must not keep them
    c: Corral = corral(config=f"""
[program.nob]
command = ["/bin/sh", "-c", {SHOW!r}]
cwd = "/"
user = "nobody"

[program.grp]
command = ["/bin/sh", "-c", {SHOW!r}]
cwd = "/"
user = "nobody"
group = "daemon"
""", prefix=["setpriv", "--groups", "4", "--"])
    assert _ids(c.pid)["Groups"] == ["4"]
    w = c.wait_running(1, "nob")[0]
    g = c.wait_running(1, "grp")[0]
    text = c.wait_out("grp.0 |  ids ")
    assert f"nob.0 |  ids {nobody.pw_uid} {nobody.pw_gid} " in text, text
    assert f"grp.0 |  ids {nobody.pw_uid} {daemon_gid} " in text, text
    ids = _ids(w["pid"])
    assert set(ids["Uid"]) == {str(nobody.pw_uid)}  # real, effective, saved and fs uid
    assert set(ids["Gid"]) == {str(nobody.pw_gid)}
    assert ids["Groups"] == [str(x) for x in os.getgrouplist("nobody", nobody.pw_gid)]
    assert _ids(g["pid"])["Groups"] == [str(x) for x in os.getgrouplist("nobody", daemon_gid)]
    # the control socket's verbs still reach a worker of another user
    c.ok("restart", "nob")
    c.wait_workers(lambda ws: ws[0]["restarts"] == 1 and ws[0]["state"] == "running",
                   "nob restarted")


def test_stop_signal(corral: Any) -> None:
    c: Corral = corral(config=f"""
[program.intr]
command = {toml_argv(worker("--report", "INT,TERM"))}
stop_signal = "INT"
stop_timeout = "1s"
""")
    c.wait_running(1)
    c.ok("stop", "intr")
    # the worker only reports the signal: corral sends SIGINT alone, then SIGKILL at 1 s
    c.wait_workers(lambda ws: ws[0]["state"] == "stopped", "intr stopped")
    assert "got SIGINT" in c.out()
    assert "got SIGTERM" not in c.out()
    assert c.workers("intr")[0]["last_exit"]["signal"] == "SIGKILL"


def test_max_age_max_memory_and_startup_timeout(corral: Any) -> None:
    hog = [sys.executable, "-c",
           "import time; b = b'x' * (96 << 20); print('allocated', flush=True); "
           "time.sleep(600)"]
    c: Corral = corral(config=f"""
[program.aged]
command = {toml_argv(worker("--every", "0.5"))}
max_age = "1s"

[program.fat]
command = {toml_argv(hog)}
max_memory = "48MiB"

[program.slow]
command = {toml_argv(worker("--every", "0.5"))}
ready = "notify"
startup_timeout = "1s"
""")

    def ended(prog: str, reason: str) -> None:
        c.wait_workers(lambda ws: bool(ws) and ws[0]["last_exit"] is not None
                       and ws[0]["last_exit"]["reason"] == reason,
                       f"{prog} ended with {reason!r}", prog, timeout=30)

    ended("aged", "recycled: age")
    ended("fat", "recycled: memory")
    ended("slow", "startup timeout")
    # each was stopped by corral with its stop signal, and started again
    for prog in ("aged", "fat", "slow"):
        last = c.workers(prog)[0]["last_exit"]
        assert last["signal"] in ("SIGTERM", "SIGKILL"), last
    assert c.stop() == 0


def test_tool_corral_in_pyproject_is_found(corral: Any, tmp_path: Path) -> None:
    """No -c: `corral run` and `corral check` read [tool.corral] of ./pyproject.toml."""
    (tmp_path / "pyproject.toml").write_text(f"""
[project]
name = "app"

[tool.corral.program.py]
command = {toml_argv(worker("--print-env", "CORRAL_WORKER"))}
numprocs = 2
""")
    c: Corral = corral()
    ws = c.wait_running(2, "py")
    assert [w["name"] for w in ws] == ["py.0", "py.1"]
    c.wait_out("py.1 |  env CORRAL_WORKER=py.1")
    doc = c.status()
    assert doc["corral"]["config"] == str(tmp_path / "pyproject.toml")
    assert c.cli("check").returncode == 0
