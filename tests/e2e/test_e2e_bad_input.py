"""The bad-input table: clear errors, and nothing started on a bad file."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import CLI, Corral, toml_argv, worker
from support import wait_for

pytestmark = pytest.mark.timeout(60)


def _run(tmp_path: Path, *args: str, socket_path: str | None = None,
         timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``corral [--socket S] ARGS`` to completion (for runs that must refuse to start)."""
    sock = socket_path or str(tmp_path / "sock" / "corral.sock")
    os.makedirs(os.path.dirname(sock), mode=0o700, exist_ok=True)
    return subprocess.run([*CLI, "--socket", sock, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=str(tmp_path), start_new_session=True)


MARKER_PROGRAM = """
[program.marker]
command = ["/bin/sh", "-c", "touch {marker}; exec sleep 600"]
"""

BAD_FILES = {
    "bad TOML": ("[program.web\ncommand = ['x']\n", ["c.toml:1: (syntax): expected valid TOML"]),
    "unknown key": ('[program.web]\ncommand = ["true"]\nnumprocz = 2\n',
                    ["c.toml:3: program.web.numprocz: expected a known key, got unknown key "
                     "'numprocz' (did you mean 'numprocs'?)"]),
    "wrong type": ('[program.web]\ncommand = ["true"]\nnumprocs = "two"\n',
                   ["c.toml:3: program.web.numprocs: expected an integer >= 0, got 'two' "
                    "(string)"]),
    "missing command": ('[program.web]\nnumprocs = 2\n',
                        ["c.toml:1: program.web: expected a command = [argv...] or a target",
                         "got neither"]),
    "command is a string": ('[program.web]\ncommand = "sleep 1"\n',
                            ["c.toml:2: program.web.command: expected an array of argv "
                             "strings (or set shell = true"]),
    "nested too deep": ("x = " + "[" * 3000 + "]" * 3000 + "\n",
                        ["c.toml: (syntax): expected TOML whose arrays and tables nest a few "
                         "hundred deep at most, got nesting too deep to read (RecursionError)"]),
    "command that does not exist": ('[program.web]\ncommand = ["no-such-program-xyz", "-v"]\n',
                                    ["program.web.command: expected a program that exists "
                                     "and is executable, got 'no-such-program-xyz' (not found "
                                     "in PATH="]),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_refused_and_nothing_started(tmp_path: Path, case: str) -> None:
    text, messages = BAD_FILES[case]
    marker = tmp_path / "started"
    conf = tmp_path / "c.toml"
    # Beside the bad program, one that would leave a mark if it ever started.
    conf.write_text(text if case == "bad TOML" else text + MARKER_PROGRAM.format(marker=marker))
    check = _run(tmp_path, "check", "-c", str(conf))
    assert check.returncode == 1
    for m in messages:
        assert m in check.stderr, check.stderr
    run = _run(tmp_path, "run", "-c", str(conf))
    assert run.returncode == 6, run.stderr
    for m in messages:
        assert m in run.stderr
    assert not marker.exists()
    assert not (tmp_path / "sock" / "corral.sock").exists()  # not even the control socket


def test_check_lists_every_error_with_file_line_key_expected_given(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text("""\
socket_name = "a b"

[program.web]
command = ["python3", "-m", "http.server"]
numprocs = -1
stop_timeout = "ten seconds"
restart = "sometimes"
ready = "tcp:99999"

[program.jobs]
target = "not a target"
depends_on = ["wbe"]
""")
    r = _run(tmp_path, "check", "-c", str(conf))
    assert r.returncode == 1
    lines = [x.strip() for x in r.stderr.splitlines()]
    assert lines[0] == f"7 errors in {conf}:"
    expected = [
        f"{conf}:1: socket_name: expected a name of letters, digits, '_' and '-', got 'a b'",
        f"{conf}:5: program.web.numprocs: expected an integer between 0 and 4096, got -1",
        f"{conf}:6: program.web.stop_timeout: expected a duration",
        f"{conf}:7: program.web.restart: expected \"always\", \"on-failure\" or \"never\", "
        "got 'sometimes'",
        f"{conf}:8: program.web.ready: expected",
        f"{conf}:11: program.jobs.target: expected \"package.module:function\", got "
        "'not a target'",
        f"{conf}:12: program.jobs.depends_on: expected names of programs in this file "
        "(web, jobs), got 'wbe' (no such program; did you mean 'web'?)",
    ]
    for want, got in zip(expected, lines[1:], strict=True):
        assert got.startswith(want), (want, got)


def test_a_command_that_does_not_exist_on_the_command_line(tmp_path: Path) -> None:
    r = _run(tmp_path, "run", "-n", "2", "--", "./no-such-script.sh", "--flag")
    assert r.returncode == 2
    assert "program.no-such-script-sh.command" in r.stderr
    assert "'./no-such-script.sh' (no executable file relative to" in r.stderr
    # resolved with the program's own PATH: found there, it starts
    bindir = tmp_path / "bin"
    bindir.mkdir()
    tool = bindir / "mytool"
    tool.write_text("#!/bin/sh\nexec sleep 600\n")
    tool.chmod(0o755)
    conf = tmp_path / "c.toml"
    conf.write_text(f'[program.t]\ncommand = ["mytool"]\n'
                    f'env = {{ PATH = "{bindir}:/usr/bin:/bin" }}\n')
    assert _run(tmp_path, "check", "-c", str(conf)).returncode == 0
    conf.write_text('[program.t]\ncommand = ["mytool"]\n')
    r = _run(tmp_path, "check", "-c", str(conf))
    assert r.returncode == 1 and "'mytool' (not found in PATH=" in r.stderr


def test_unknown_program_in_a_verb(corral: Any) -> None:
    c: Corral = corral("-n", "1", "--name", "web", "--", *worker())
    c.wait_running(1)
    for verb in (["stop", "wbe"], ["start", "wbe:0"], ["restart", "wbe"], ["scale", "wbe", "2"],
                 ["signal", "wbe", "HUP"], ["logs", "wbe"]):
        r = c.cli(*verb)
        assert r.returncode == 1, (verb, r.stderr)
        assert "no program 'wbe'" in r.stderr, (verb, r.stderr)
        assert "web" in r.stderr or verb[0] == "logs"
    assert c.cli("status", "wbe").returncode == 4


def test_dead_control_socket(tmp_path: Path, corral: Any) -> None:
    sock_dir = tmp_path / "c-sock"
    sock_dir.mkdir(mode=0o700)
    path = str(sock_dir / "corral.sock")
    # A stale socket file: bound, never served (its process "crashed").
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()
    assert os.path.exists(path)
    r = _run(tmp_path, "status", socket_path=path)
    assert r.returncode == 3 and "stale socket, nobody listening" in r.stderr
    r = _run(tmp_path, "stop", "web", socket_path=path)
    assert r.returncode == 7 and "not running" in r.stderr
    r = _run(tmp_path, "status", "--json", socket_path=str(tmp_path / "c-sock" / "none.sock"))
    assert r.returncode == 3 and '"corral": null' in r.stdout
    # corral run replaces a stale socket and serves it
    c: Corral = corral("-n", "1", "--", *worker())
    assert c.socket == path
    c.wait_running(1)


def test_a_second_corral_on_the_same_socket(tmp_path: Path, corral: Any) -> None:
    c: Corral = corral("-n", "1", "--name", "first", "--", *worker())
    c.wait_running(1)
    marker = tmp_path / "second-started"
    r = _run(tmp_path, "run", "--", "/bin/sh", "-c", f"touch {marker}; exec sleep 600",
             socket_path=c.socket)
    assert r.returncode == 1
    assert f"another corral (pid {c.pid}) is already serving {c.socket}" in r.stderr
    assert not marker.exists()
    c.wait_running(1)  # the first one is untouched
    assert [p["name"] for p in c.status()["programs"]] == ["first"]


def test_socket_directory_must_be_private(tmp_path: Path) -> None:
    d = tmp_path / "open"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    r = _run(tmp_path, "run", "--", "sleep", "600", socket_path=str(d / "corral.sock"))
    assert r.returncode == 1
    assert "has mode 0755; expected 0700" in r.stderr


def test_run_refuses_both_a_command_and_a_file(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(f"[program.a]\ncommand = {toml_argv(worker())}\n")
    r = _run(tmp_path, "run", "-c", str(conf), "--", "sleep", "1")
    assert r.returncode == 2 and "not both" in r.stderr
    r = _run(tmp_path, "run", "-n", "2", "-c", str(conf))
    assert r.returncode == 2 and "go with a command" in r.stderr


EXITING_MODULE = """\
import sys
sys.exit("exitmod: FOO is not set")
"""


@pytest.mark.parametrize("how", ["SIGHUP", "corral reload"])
def test_a_reload_of_a_file_that_raises_anything_is_refused_and_changes_nothing(
        corral: Any, tmp_path: Path, how: str) -> None:
    """A reloaded file whose target module calls sys.exit() at import, then one nested too deep
    for the TOML parser (RecursionError): both refused as bad config, corral and its workers
    carry on untouched (they were SIGKILLed with corral before)."""
    (tmp_path / "exitmod.py").write_text(EXITING_MODULE)
    good = f"[program.a]\ncommand = {toml_argv(worker())}\nnumprocs = 2\n"
    c: Corral = corral(config=good)
    pids = {w["pid"] for w in c.wait_running(2, "a")}
    conf = tmp_path / "c.toml"
    bad_files = [
        (good + '[program.b]\ntarget = "exitmod:run"\n',
         "its import called sys.exit('exitmod: FOO is not set')"),
        (good + "x = " + "[" * 3000 + "]" * 3000 + "\n",
         "nesting too deep to read (RecursionError)"),
    ]
    for n, (text, message) in enumerate(bad_files, 1):
        conf.write_text(text)
        if how == "SIGHUP":
            c.signal(signal.SIGHUP)
            wait_for(lambda n=n: c.err().count("reload refused, nothing changed") == n, 20,
                     "the reload refused in corral's log")
        else:
            r = c.cli("reload")
            assert r.returncode == 6, (r.returncode, r.stderr)  # README: a file with errors
            assert message in r.stderr and "[bad_config]" in r.stderr, r.stderr
        assert message in c.err()
        assert c.proc is not None and c.proc.poll() is None, c.err()
        assert {w["pid"] for w in c.wait_running(2, "a")} == pids
        assert [p["name"] for p in c.status()["programs"]] == ["a"]
    assert "corral's loop failed" not in c.err()
    conf.write_text(good)
    assert c.stop() == 0


def _read_frame(s: socket.socket) -> dict[str, Any] | None:
    """One length-prefixed JSON frame from ``s``; None at EOF."""
    buf = b""
    while True:
        if len(buf) >= 4:
            (size,) = struct.unpack(">I", buf[:4])
            if len(buf) >= 4 + size:
                frame: dict[str, Any] = json.loads(buf[4:4 + size])
                return frame
        chunk = s.recv(65536)
        if not chunk:
            return None
        buf += chunk


def test_a_control_message_nested_too_deep_gets_an_error_and_corral_carries_on(
        corral: Any) -> None:
    """[[[...]]] 3000 deep (6 KB, well under the size limit) went past json's recursion limit
    on 3.11 and the RecursionError killed corral run and every worker: now an error frame, the
    connection closed, corral answers and its workers run on. 100,000 deep (200 KB) is past
    the limit of every supported Python (3.13's parser takes 3000)."""
    c: Corral = corral("-n", "2", "--name", "web", "--", *worker())
    pids = {w["pid"] for w in c.wait_running(2)}
    body = b"[" * 100_000 + b"]" * 100_000
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(20)
        s.connect(c.socket)
        s.sendall(struct.pack(">I", len(body)) + body)
        reply = _read_frame(s)
        assert reply is not None, c.err()
        assert reply["status"] == "error" and reply["error"]["code"] == "bad_request", reply
        assert "nested too deep" in reply["error"]["message"], reply
        assert _read_frame(s) is None  # and the connection closed
    assert c.proc is not None and c.proc.poll() is None, c.err()
    assert {w["pid"] for w in c.wait_running(2)} == pids
    assert "corral's loop failed" not in c.err()
    assert c.stop() == 0


def _raw_call(path: str, command: str, args: dict[str, Any]) -> dict[str, Any] | None:
    """One request on a raw connection (no CLI in between to check the arguments)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(20)
        s.connect(path)
        body = json.dumps({"v": 1, "id": 1, "command": command, "args": args}).encode()
        s.sendall(struct.pack(">I", len(body)) + body)
        return _read_frame(s)


def test_scale_over_the_socket_is_bounded_like_the_cli(corral: Any) -> None:
    """A raw client's scale to 3,000,000 had corral prepare that many slots (830 MB, then
    deaf to SIGTERM): refused with the CLI's bound, nothing changes."""
    c: Corral = corral("-n", "1", "--name", "web", "--", *worker())
    pids = {w["pid"] for w in c.wait_running(1)}
    for n in (3_000_000, 4097, -1):
        reply = _raw_call(c.socket, "scale", {"program": "web", "numprocs": n})
        assert reply is not None and reply["status"] == "error", reply
        assert reply["error"]["code"] == "bad_args", reply
        assert reply["error"]["message"] == (
            f"numprocs must be an int between 0 and 4096, got {n}"), reply
    assert {w["pid"] for w in c.wait_running(1)} == pids
    assert c.stop() == 0


def _bad_env_file(tmp_path: Path, kind: str) -> str:
    """An env_file that is no regular file of at most 1 MiB (a FIFO nobody writes to, a
    device that never ends, a file one byte too large)."""
    if kind == "fifo":
        path = tmp_path / "env.fifo"
        os.mkfifo(path)
        return str(path)
    if kind == "device":
        return "/dev/zero"
    path = tmp_path / "big.env"
    path.write_text("A=" + "x" * (1024 * 1024 - 3) + "\n" + "B=1\n")  # 1 MiB, and 4 bytes
    return str(path)


ENV_FILE_GIVEN = {"fifo": "(a FIFO)", "device": "(a character device)",
                  "too large": f"({1024 * 1024 + 4} bytes)"}


@pytest.mark.parametrize("kind", sorted(ENV_FILE_GIVEN))
def test_an_env_file_that_is_no_small_regular_file_is_refused(tmp_path: Path, corral: Any,
                                                              kind: str) -> None:
    """env_file was read whole without a look at what it is: a FIFO blocked corral (check,
    run, and a reload: the loop), /dev/zero grew it without end. Now a config error, at
    once, naming the file and the limit; a reload of it is refused and corral carries on."""
    env_file = _bad_env_file(tmp_path, kind)
    want = (f"program.a.env_file: expected a regular file of UTF-8 KEY=VALUE lines, at most "
            f"1 MiB, got {env_file!r} {ENV_FILE_GIVEN[kind]}")
    good = f"[program.a]\ncommand = {toml_argv(worker())}\n"
    bad = good + f"env_file = {json.dumps(env_file)}\n"
    conf = tmp_path / "bad.toml"
    conf.write_text(bad)
    check = _run(tmp_path, "check", "-c", str(conf), timeout=20)
    assert check.returncode == 1 and want in check.stderr, check.stderr
    run = _run(tmp_path, "run", "-c", str(conf), timeout=20)
    assert run.returncode == 6 and want in run.stderr, run.stderr
    # The running corral is asked to reload it (SIGHUP: the loop itself reads the file).
    c: Corral = corral(config=good)
    pids = {w["pid"] for w in c.wait_running(1, "a")}
    (tmp_path / "c.toml").write_text(bad)
    c.signal(signal.SIGHUP)
    c.wait_err("reload refused, nothing changed")
    assert want in c.err()
    assert {w["pid"] for w in c.wait_running(1, "a")} == pids
    assert c.stop() == 0


def test_a_socket_path_past_the_af_unix_limit_is_a_clear_error(tmp_path: Path) -> None:
    """--socket (or socket_dir + socket_name) longer than sun_path gave an OSError traceback
    from bind(): now an error naming the parameter, the limit and the length, nothing
    started."""
    marker = tmp_path / "started"
    deep = tmp_path / ("d" * 120)
    sock = str(deep / "corral.sock")
    size = len(os.fsencode(sock))
    r = _run(tmp_path, "run", "--", "/bin/sh", "-c", f"touch {marker}; exec sleep 600",
             socket_path=sock)
    assert r.returncode == 2, r.stderr
    assert (f"--socket (or $CORRAL_SOCKET): expected a path of at most 107 bytes (the AF_UNIX "
            f"limit), got {size} bytes: {sock}") in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    conf = tmp_path / "c.toml"
    conf.write_text(f'socket_dir = "{deep}"\n' + MARKER_PROGRAM.format(marker=marker))
    env = {k: v for k, v in os.environ.items() if k not in ("CORRAL_SOCKET", "CORRAL_CONFIG")}
    r = subprocess.run([*CLI, "run", "-c", str(conf)], capture_output=True, text=True,
                       timeout=30, cwd=str(tmp_path), start_new_session=True, env=env)
    assert r.returncode == 6, r.stderr
    assert (f"{conf}: socket_dir/socket_name: expected a socket path of at most 107 bytes "
            f"(the AF_UNIX limit), got {size} bytes: {sock}") in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not marker.exists()
