"""Every verb of ``corral`` against a running ``corral run`` (real processes, real sockets)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import CLI, PY, Corral, alive, toml_argv, worker
from support import wait_for

pytestmark = pytest.mark.timeout(90)


def _schema_ok(doc: dict[str, Any]) -> None:
    """The documented shape of corral.status/1 (docs/json-schema.md)."""
    assert doc["schema"] == "corral.status/1"
    assert set(doc["corral"]) >= {"pid", "version", "uptime", "config", "socket"}
    for prog in doc["programs"]:
        assert set(prog) >= {"name", "kind", "numprocs", "state", "gave_up", "workers"}
        assert prog["kind"] in ("command", "target")
        assert prog["state"] in ("running", "starting", "degraded", "stopped", "gave up")
        for w in prog["workers"]:
            assert set(w) >= {"index", "name", "pid", "state", "ready", "restarts",
                              "started_at", "uptime", "heartbeat_age", "status_text",
                              "last_exit", "next_restart_in", "rss", "cpu_percent"}
            assert w["state"] in ("pending", "starting", "running", "stopping", "backoff",
                                  "exited", "stopped")
            assert w["name"] == f"{prog['name']}.{w['index']}"
            if w["last_exit"] is not None:
                assert set(w["last_exit"]) >= {"code", "signal", "signum", "core_dumped",
                                               "reason", "by_corral", "at", "uptime", "pid",
                                               "description", "detail"}


def test_run_n_status_text_json_and_exit_codes(corral: Any) -> None:
    # The exact shape the benchmarks drive: corral run -n N -- CMD ARGS (with its own flags).
    c: Corral = corral("-n", "2", "--name", "w", "--", *worker("--every", "0.2"))
    ws = c.wait_running(2)
    text = c.cli("status")
    assert text.returncode == 0, text.stderr
    assert "w.0" in text.stdout and "w.1" in text.stdout and "running" in text.stdout
    doc = json.loads(c.ok("status", "--json"))
    _schema_ok(doc)
    assert doc["corral"]["pid"] == c.pid
    assert doc["corral"]["socket"] == c.socket
    assert [w["index"] for w in doc["programs"][0]["workers"]] == [0, 1]
    assert {w["pid"] for w in ws} <= c.descendants()
    # Each worker's output reaches corral's console with its prefix.
    out = c.wait_out("w.1 |")
    assert "w.0 |  start index 0" in out
    # One worker stopped: some dead while corral runs -> 1; a program name it does not
    # know -> 4; every worker stopped -> 3; corral gone -> 3.
    c.ok("stop", "w:1")
    c.wait_workers(lambda ws: ws[1]["state"] == "stopped", "w.1 stopped")
    assert c.cli("status").returncode == 1
    assert c.cli("status", "nosuch").returncode == 4
    c.ok("stop", "w")
    c.wait_workers(lambda ws: all(w["state"] == "stopped" for w in ws), "every worker stopped")
    r = c.cli("status", "--json")
    assert r.returncode == 3
    _schema_ok(json.loads(r.stdout))
    assert c.stop() == 0
    r = c.cli("status", "--json")
    assert r.returncode == 3
    gone = json.loads(r.stdout)
    assert gone["corral"] is None and "error" in gone


def test_start_stop_restart_program_and_index(corral: Any) -> None:
    c: Corral = corral("-n", "3", "--name", "w", "--", *worker())
    ws = c.wait_running(3)
    pids = [w["pid"] for w in ws]
    assert "w:1: stopping" in c.ok("stop", "w:1")
    ws = c.wait_workers(lambda ws: ws[1]["state"] == "stopped", "w.1 stopped")
    assert not alive(pids[1])
    assert ws[0]["pid"] == pids[0] and ws[2]["pid"] == pids[2]
    assert ws[1]["last_exit"]["reason"] == "stopped on request"
    assert ws[1]["last_exit"]["by_corral"] is True
    c.ok("start", "w:1")
    ws = c.wait_running(3)
    assert ws[1]["pid"] not in pids
    new1 = ws[1]["pid"]
    # restart one: a new pid for that one only
    c.ok("restart", "w:0")
    ws = c.wait_workers(lambda ws: ws[0]["pid"] not in (None, pids[0])
                        and ws[0]["state"] == "running", "w.0 restarted")
    assert ws[1]["pid"] == new1 and ws[2]["pid"] == pids[2]
    assert ws[0]["last_exit"]["reason"] == "restarted on request"
    # restart the whole program: rolling, every pid new
    before = {w["pid"] for w in ws}
    assert "restarted every worker" in c.ok("restart", "w", timeout=60)
    ws = c.wait_running(3)
    assert not before & {w["pid"] for w in ws}
    # stop / start the whole program
    c.ok("stop", "w")
    c.wait_workers(lambda ws: all(w["state"] == "stopped" for w in ws), "all stopped")
    assert not any(alive(p) for p in {w["pid"] for w in ws})
    c.ok("start", "w")
    c.wait_running(3)
    # bad targets
    r = c.cli("restart", "w:7")
    assert r.returncode == 1 and "no worker 7" in r.stderr
    r = c.cli("stop", "w:x")
    assert r.returncode == 2 and "PROGRAM:INDEX" in r.stderr


def test_scale_up_and_down(corral: Any) -> None:
    c: Corral = corral("-n", "1", "--name", "w", "--", *worker())
    first = c.wait_running(1)[0]["pid"]
    assert "scaled to 3" in c.ok("scale", "w", "3")
    ws = c.wait_running(3)
    assert ws[0]["pid"] == first
    extra = [w["pid"] for w in ws[1:]]
    c.ok("scale", "w", "1")
    ws = c.wait_workers(lambda ws: len(ws) == 1, "scaled down to 1")
    assert ws[0]["pid"] == first
    wait_for(lambda: not any(alive(p) for p in extra), 10, "scaled-down workers gone")
    c.ok("scale", "w", "0")
    c.wait_workers(lambda ws: not ws, "no worker")
    assert c.cli("status").returncode == 3
    c.ok("scale", "w", "2")
    c.wait_running(2)
    r = c.cli("scale", "w", "-1")
    assert r.returncode == 2


def test_signal(corral: Any) -> None:
    c: Corral = corral("-n", "2", "--name", "w", "--", *worker("--report", "USR1,HUP"))
    ws = c.wait_running(2)
    assert "sent SIGUSR1" in c.ok("signal", "w", "USR1")
    out = c.wait_out("got SIGUSR1")
    assert out.count("got SIGUSR1") >= 1
    wait_for(lambda: c.out().count("got SIGUSR1") == 2, 10, "both workers got SIGUSR1")
    c.ok("signal", "w:1", "SIGHUP")
    c.wait_out("w.1 |  got SIGHUP")
    assert "w.0 |  got SIGHUP" not in c.out()
    # the workers are still the same processes
    assert [w["pid"] for w in c.wait_running(2)] == [w["pid"] for w in ws]
    r = c.cli("signal", "w", "NOSUCH")
    assert r.returncode == 2 and "SIG" in r.stderr
    # A signal that kills: the exit is decoded.
    c.ok("signal", "w:0", "KILL")
    ws = c.wait_workers(lambda ws: ws[0]["last_exit"] is not None, "w.0's exit")
    assert ws[0]["last_exit"]["signal"] == "SIGKILL"
    assert ws[0]["last_exit"]["reason"] == "killed by signal"


def test_logs_tail_json_and_follow(corral: Any) -> None:
    c: Corral = corral("-n", "2", "--name", "w", "--", *worker(
        "--every", "0.1", "--stderr", "to stderr"))
    c.wait_running(2)
    wait_for(lambda: c.cli("logs", "w:1", "-n", "20").stdout.count("\n") >= 20, 10,
             "20 lines of w.1")
    tail = c.ok("logs", "w:1", "-n", "5").splitlines()
    assert len(tail) == 5 and all("w.1 |" in line for line in tail)
    lines = [json.loads(x) for x in c.ok("logs", "-n", "20", "--json").splitlines()]
    assert len(lines) == 20
    for obj in lines:
        assert set(obj) >= {"schema", "ts", "program", "index", "pid", "stream", "line"}
        assert obj["schema"] == "corral.log/1"
        assert obj["program"] == "w" and obj["stream"] in ("stdout", "stderr")
    assert [o["ts"] for o in lines] == sorted(o["ts"] for o in lines)
    err = [json.loads(x) for x in c.ok("logs", "w:0", "-n", "1000", "--json").splitlines()
           if '"stderr"' in x]
    assert err and err[0]["line"] == "to stderr"
    # -f: the tail, then new lines as they come
    follow = subprocess.Popen([*CLI, "--socket", c.socket, "logs", "w:0", "-f", "-n", "1",
                               "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              start_new_session=True)
    try:
        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + 20
        assert follow.stdout is not None
        buf = b""
        while len(got) < 6 and time.monotonic() < deadline:
            ready, _, _ = select.select([follow.stdout], [], [], 1)
            if ready:
                chunk = os.read(follow.stdout.fileno(), 65536)
                if not chunk:
                    break
                buf += chunk
                *done, buf = buf.split(b"\n")
                got += [json.loads(x) for x in done if x]
        assert len(got) >= 6, (got, follow.stderr.read() if follow.poll() is not None else "")
        assert all(o["index"] == 0 for o in got)
        ticks = [int(o["line"].split()[1]) for o in got if o["line"].startswith("tick")]
        assert ticks == sorted(ticks) and ticks[-1] > ticks[0]  # new lines, streamed
    finally:
        follow.kill()
        follow.wait(10)
    r = c.cli("logs", "nosuch")
    assert r.returncode == 1 and "no program 'nosuch'" in r.stderr
    # A worker that is not there (and has no lines kept) is an error too, not empty output.
    r = c.cli("logs", "w:99")
    assert r.returncode == 1 and "program 'w' has no worker 99" in r.stderr, r


def test_events_follow_json_with_commands(corral: Any) -> None:
    c: Corral = corral("-n", "1", "--name", "w", "--", *worker())
    c.wait_running(1)
    follow = subprocess.Popen([*CLI, "--socket", c.socket, "events", "-f", "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              start_new_session=True)
    try:
        assert follow.stdout is not None
        seen: list[dict[str, Any]] = []
        buf = b""

        def read_until(pred: Any, timeout: float = 20) -> None:
            nonlocal buf
            deadline = time.monotonic() + timeout
            while not any(pred(e) for e in seen):
                assert time.monotonic() < deadline, seen
                ready, _, _ = select.select([follow.stdout], [], [], 0.5)
                if ready:
                    chunk = os.read(follow.stdout.fileno(), 65536)
                    assert chunk, "events -f ended"
                    buf += chunk
                    *done, buf = buf.split(b"\n")
                    seen.extend(json.loads(x) for x in done if x)

        read_until(lambda e: e["kind"] == "ready")  # the recent events come first
        c.ok("restart", "w:0")
        read_until(lambda e: e["kind"] == "exited" and e["reason"] == "restarted on request")
        read_until(lambda e: e["kind"] == "command" and e["command"] == "restart")
        cmd = next(e for e in seen if e["kind"] == "command")
        assert cmd["schema"] == "corral.event/1"
        assert cmd["caller"]["uid"] == os.geteuid() and cmd["caller"]["pid"] > 0
        assert cmd["args"] == {"program": "w", "index": 0}
        for e in seen:
            assert set(e) >= {"schema", "kind", "pool", "index", "name", "pid", "at",
                              "reason", "exit", "delay", "message"}
    finally:
        follow.kill()
        follow.wait(10)
    text = c.ok("events", "-n", "100")
    assert "exited" in text and "restart" in text and f"by uid {os.geteuid()}" in text


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_top_renders_a_frame_without_a_tty(corral: Any) -> None:
    c: Corral = corral("-n", "2", "--name", "w", "--", *worker())
    c.wait_running(2)
    out = c.ok("top")
    assert "2/2 workers running" in out
    assert "w.0" in out and "w.1" in out and "RSS" in out and "CPU" in out
    # under a pseudo-terminal: the live view draws frames in place; Ctrl-C quits it
    import pty

    master, slave = pty.openpty()
    # SIGINT back to its default first: a shell's background job (make test &) starts with it
    # ignored, and an ignored SIGINT is inherited, so Ctrl-C would not reach `top`.
    top = subprocess.Popen([*CLI, "--socket", c.socket, "top", "-i", "0.2"], stdin=slave,
                           stdout=slave, stderr=slave, start_new_session=True,
                           env={**os.environ, "TERM": "xterm", "COLUMNS": "120"},
                           preexec_fn=_default_sigint)
    os.close(slave)
    try:
        seen = b""
        deadline = time.monotonic() + 20
        while seen.count(b"workers running") < 2 and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    seen += os.read(master, 65536)
                except OSError:
                    break
        assert seen.count(b"workers running") >= 2, seen[-2000:]
        assert b"\x1b[" in seen  # drawn with cursor moves / colours, in place
        os.killpg(top.pid, signal.SIGINT)
        assert top.wait(10) == 0
    finally:
        if top.poll() is None:
            top.kill()
            top.wait(10)
        os.close(master)


def test_reload(corral: Any, tmp_path: Path) -> None:
    cmd = toml_argv(worker())
    conf = tmp_path / "c.toml"

    def write(text: str) -> None:
        conf.write_text(text)

    c: Corral = corral(config=f"""
[program.keep]
command = {cmd}
[program.gone]
command = {cmd}
[program.change]
command = {cmd}
[program.grow]
command = {cmd}
numprocs = 1
""")
    ws = {p: c.wait_running(1, p) for p in ("keep", "gone", "change", "grow")}
    pids = {p: w[0]["pid"] for p, w in ws.items()}
    write(f"""
[program.keep]
command = {cmd}
[program.change]
command = {cmd}
env = {{ X = "1" }}
[program.grow]
command = {cmd}
numprocs = 3
[program.new]
command = {cmd}
""")
    out = c.ok("reload", "-c", str(conf), timeout=60)
    assert "added: new" in out and "removed: gone" in out
    assert "change (env)" in out and "grow (numprocs)" in out
    c.wait_running(1, "new")
    grow = c.wait_running(3, "grow")
    assert grow[0]["pid"] == pids["grow"]  # scale only: the first worker stays
    change = c.wait_workers(lambda ws: len(ws) == 1 and ws[0]["state"] == "running"
                            and ws[0]["pid"] != pids["change"], "change restarted", "change")
    assert change[0]["pid"] != pids["change"]
    assert c.workers("keep")[0]["pid"] == pids["keep"]
    wait_for(lambda: "gone" not in [p["name"] for p in c.status()["programs"]], 20,
             "the removed program gone from status")
    assert not alive(pids["gone"])
    # the new worker got its env
    assert "X" not in os.environ
    # a reload with a bad file changes nothing, and says why
    write("[program.keep]\ncommand = 3\n")
    r = c.cli("reload", "-c", str(conf))
    assert r.returncode == 6 and "c.toml:2: program.keep.command" in r.stderr
    assert c.workers("keep")[0]["pid"] == pids["keep"]
    # SIGHUP reloads too
    write(f"[program.keep]\ncommand = {cmd}\n")
    c.signal(signal.SIGHUP)
    wait_for(lambda: [p["name"] for p in c.status()["programs"]] == ["keep"], 30,
             "SIGHUP reload")
    assert c.workers("keep")[0]["pid"] == pids["keep"]


def test_run_keeps_the_command_line_exactly(corral: Any) -> None:
    """Everything after `--` is the argv, its own -n/--flag/-- included."""
    c: Corral = corral("-n", "2", "--name", "argv", "--restart", "never", "--json-logs", "--",
                       PY, "-c", "import sys; print(sys.argv[1:], flush=True)", "-n", "3",
                       "--flag", "--", "x y")
    c.wait_workers(lambda ws: len(ws) == 2 and all(w["state"] == "exited" for w in ws),
                   "both exited")
    lines = [json.loads(x)["line"] for x in c.out().splitlines()]
    assert lines == ["['-n', '3', '--flag', '--', 'x y']"] * 2
    # --restart never: they stay exited (clean exit 0 is not a failure either)
    assert all(w["restarts"] == 0 for w in c.workers())


def test_set_any_program_key_on_the_command_line(corral: Any) -> None:
    c: Corral = corral("-n", "1", "--name", "s", "--set", "env={GREETING='hi there'}",
                       "--set", "backoff={initial=0.2, jitter=0}", "--", *worker(
                           "--print-env", "GREETING"))
    c.wait_running(1)
    c.wait_out("s.0 |  env GREETING=hi there")


def test_the_example_config_runs(corral: Any, tmp_path: Path) -> None:
    import socket as socket_mod

    from conftest import HERE

    example = HERE.parent.parent / "examples" / "corral.toml"
    assert c_check(example).returncode == 0
    with socket_mod.socket() as s:
        try:
            s.bind(("127.0.0.1", 8000))
        except OSError:
            pytest.skip("port 8000 (the example's web program) is taken on this machine")
    c: Corral = corral("-c", str(example))
    c.wait_running(1, "clock")
    c.wait_running(1, "web", timeout=30)
    c.wait_running(2, "jobs", timeout=30)
    ws = c.wait_workers(lambda ws: all("jobs" in (w["status_text"] or "") for w in ws),
                        "the jobs' status texts", "jobs", timeout=30)
    assert all(w["heartbeat_age"] is not None for w in ws)
    assert c.stop() == 0


def c_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "check", "-c", str(path)], capture_output=True, text=True,
                          timeout=30)
