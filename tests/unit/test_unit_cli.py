"""The `corral` command: every verb as a subprocess against a control socket served by a fake
corral (a ControlServer whose dispatch returns canned corral.status/1 etc. payloads built with
corral._json, the JSON shapes, from real WorkerStatus records). The supervisor wiring is tested
elsewhere once it exists; here the CLI side is real end to end: argument parsing, the socket,
exit codes, output. Also: `import corral` stays light."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from corral._control import CommandError, ControlServer, Peer, Stream, StreamChannel
from corral._json import (
    event_to_json,
    program_to_json,
    status_payload,
    worker_to_json,
)
from corral.cli import render
from corral.events import Event, EventKind, ExitRecord
from corral.exitstatus import ExitStatus
from corral.states import StopReason, WorkerState
from corral.status import WorkerStatus
from selector_loop import SelectorLoop

pytestmark = pytest.mark.timeout(60)

SRC = str(Path(__file__).resolve().parents[2] / "src")


def ws(index: int, state: WorkerState, *, pid: int | None = 100, restarts: int = 0,
       last: ExitRecord | None = None, name: str = "web") -> WorkerStatus:
    return WorkerStatus(index=index, name=f"{name}.{index}", pid=pid, state=state,
                        ready=state is WorkerState.RUNNING, restarts=restarts,
                        started_at=time.time() - 65, uptime=65.0, heartbeat_age=0.4,
                        status_text="serving", last_exit=last,
                        next_restart_in=1.5 if state is WorkerState.BACKOFF else None)


KILLED = ExitRecord(index=1, name="web.1", pid=99, exit=ExitStatus(signal=9),
                    reason=StopReason.KILLED, at=time.time() - 10, uptime=3.0)


def payload(web_states: list[WorkerState]) -> dict[str, Any]:
    web = [worker_to_json(ws(i, s, last=KILLED if i == 1 else None, restarts=i),
                          rss=50 * 2 ** 20, cpu_percent=1.5) for i, s in enumerate(web_states)]
    db = [worker_to_json(ws(0, WorkerState.RUNNING, name="db"))]
    return status_payload([program_to_json("web", "command", web),
                           program_to_json("db", "command", db)],
                          pid=os.getpid(), version="0.1.0", uptime=100.0, config=None,
                          socket=None)


class FakeCorral:
    """A control server on a loop thread answering like a supervisor would."""

    def __init__(self, sock: str) -> None:
        self.calls: list[tuple[str, dict[str, Any], Peer]] = []
        self.web_states = [WorkerState.RUNNING, WorkerState.RUNNING]
        self.channels: list[StreamChannel] = []
        self.loop = SelectorLoop()
        self.server = ControlServer(self.loop, sock, self.dispatch)
        self.server.start()
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop:
            self.loop.run_once(0.05)

    def close(self) -> None:
        done = threading.Event()

        def shut() -> None:
            self.server.close()
            done.set()

        self.loop.call_soon_threadsafe(shut)
        done.wait(10)
        self._stop = True
        self.thread.join(10)
        self.loop.close()

    def dispatch(self, command: str, args: dict[str, Any], peer: Peer) -> Any:
        self.calls.append((command, args, peer))
        names = {"web", "db"}
        prog = args.get("program")
        if prog is not None and prog not in names:
            raise CommandError(f"no program named {prog!r} (did you mean 'web'?)",
                               "unknown_program")
        if command == "status":
            for p in args.get("programs", []):
                if p not in names:
                    raise CommandError(f"no program named {p!r}", "unknown_program")
            return payload(self.web_states)
        if command in ("start", "stop", "restart"):
            which = prog if args["index"] is None else f"{prog}:{args['index']}"
            return {"message": f"{command}: {which}: ok"}
        if command == "scale":
            return {"message": f"scale: {prog}: {args['numprocs']} workers"}
        if command == "signal":
            return {"message": f"signal: sent {args['signal']} to {prog}"}
        if command == "reload":
            return {"diff": {"added": ["jobs"], "removed": [], "changed": {"web": ["env"]}}}
        if command == "logs":
            lines = [{"ts": 1_700_000_000.5, "program": "web", "index": 0, "pid": 100,
                      "stream": "stdout", "line": f"hello {i}"} for i in range(args["lines"])]
            if not args["follow"]:
                return {"lines": lines}

            def start(ch: StreamChannel) -> None:
                ch.send({"lines": lines})
                ch.dropped = 7  # as if 7 lines were lost to a slow reader
                ch.send({"lines": [dict(lines[0], line="after the gap", stream="stderr")]})
                ch.end({"lines": []})

            return Stream(start)
        if command == "events":
            ev = Event(kind=EventKind.EXITED, pool="web", index=1, name="web.1", pid=99,
                       at=1_700_000_000.0, exit=KILLED)
            objs = [event_to_json(ev, caller={"uid": 0, "pid": 1})]
            if not args["follow"]:
                return {"events": objs}
            return Stream(lambda ch: (ch.send({"events": objs}), ch.end()))
        raise CommandError(f"unknown command {command!r}", "unknown_command")


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeCorral]:
    f = FakeCorral(str(tmp_path / "ctl" / "corral.sock"))
    yield f
    f.close()


def corral(*args: str, sock: str | None = None, cwd: str | None = None,
           timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": SRC, "COLUMNS": "160", "NO_COLOR": "1"}
    env.pop("CORRAL_SOCKET", None)
    if sock:
        env["CORRAL_SOCKET"] = sock
    return subprocess.run([sys.executable, "-m", "corral.cli.main", *args], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=cwd)


def test_status_table_json_and_lsb_codes(fake: FakeCorral) -> None:
    sock = fake.server.path
    out = corral("status", sock=sock)
    assert out.returncode == 0, out.stderr
    for text in ("web.0", "web.1", "db.0", "running", "SIGKILL", "50.0MiB", "1.5%", "1m05s"):
        assert text in out.stdout, (text, out.stdout)
    out = corral("status", "--json", sock=sock)
    doc = json.loads(out.stdout)
    assert doc["schema"] == "corral.status/1" and out.returncode == 0
    assert [w["state"] for w in doc["programs"][0]["workers"]] == ["running", "running"]
    fake.web_states = [WorkerState.RUNNING, WorkerState.BACKOFF]
    assert corral("status", sock=sock).returncode == 1  # dead while corral runs
    assert corral("status", "db", sock=sock).returncode == 0  # db alone is fine
    fake.web_states = [WorkerState.STOPPED, WorkerState.STOPPED]
    assert corral("status", "web", sock=sock).returncode == 3  # stopped on purpose
    fake.web_states = [WorkerState.STOPPED, WorkerState.EXITED]
    assert corral("status", "web", sock=sock).returncode == 1  # one died: dead
    out = corral("status", "nope", sock=sock)
    assert out.returncode == 4 and "no program named 'nope'" in out.stderr


def test_status_when_nothing_runs(tmp_path: Path) -> None:
    out = corral("status", sock=str(tmp_path / "none.sock"))
    assert out.returncode == 3 and "corral is not running" in out.stderr
    out = corral("status", "--json", sock=str(tmp_path / "none.sock"))
    assert out.returncode == 3 and json.loads(out.stdout)["corral"] is None
    out = corral("stop", "web", sock=str(tmp_path / "none.sock"))
    assert out.returncode == 7 and "not running" in out.stderr


def test_actions(fake: FakeCorral) -> None:
    sock = fake.server.path
    out = corral("stop", "web:1", "db", sock=sock)
    assert out.returncode == 0 and out.stdout.splitlines() == ["stop: web:1: ok",
                                                                "stop: db: ok"]
    assert corral("start", "web", sock=sock).stdout.strip() == "start: web: ok"
    assert corral("restart", "web:0", sock=sock).stdout.strip() == "restart: web:0: ok"
    assert corral("scale", "web", "8", sock=sock).stdout.strip() == "scale: web: 8 workers"
    out = corral("signal", "web", "hup", sock=sock)
    assert out.stdout.strip() == "signal: sent SIGHUP to web"
    assert [c[0] for c in fake.calls] == ["stop", "stop", "start", "restart", "scale",
                                          "signal"]
    assert fake.calls[0][1] == {"program": "web", "index": 1}
    assert fake.calls[0][2].uid == os.getuid()  # the caller's credentials reach dispatch
    out = corral("stop", "wbe", sock=sock)
    assert out.returncode == 1 and "did you mean 'web'" in out.stderr
    out = corral("stop", "web:x", sock=sock)
    assert out.returncode == 2 and "PROGRAM:INDEX" in out.stderr
    out = corral("signal", "web", "NOPE", sock=sock)
    assert out.returncode == 2 and "no signal named" in out.stderr
    out = corral("scale", "web", "-1", sock=sock)
    assert out.returncode == 2


def test_logs_and_events(fake: FakeCorral) -> None:
    sock = fake.server.path
    out = corral("logs", "web", "-n", "3", sock=sock)
    assert out.returncode == 0
    assert [ln.split(" ", 1)[1] for ln in out.stdout.splitlines()] == [
        "web.0 |  hello 0", "web.0 |  hello 1", "web.0 |  hello 2"]
    out = corral("logs", "-n", "2", "--json", sock=sock)
    assert [json.loads(x)["line"] for x in out.stdout.splitlines()] == ["hello 0", "hello 1"]
    out = corral("logs", "-f", "-n", "1", sock=sock)
    assert out.returncode == 0
    assert out.stdout.splitlines()[-1].endswith("web.0 |! after the gap")
    assert "7 log lines were dropped" in out.stderr
    out = corral("events", sock=sock)
    assert "exited" in out.stdout and "web.1 pid 99" in out.stdout
    assert "SIGKILL(-9)" in out.stdout and "[by uid 0 pid 1]" in out.stdout
    out = corral("events", "-f", "--json", sock=sock)
    ev = json.loads(out.stdout.splitlines()[0])
    assert ev["schema"] == "corral.event/1" and ev["exit"]["signal"] == "SIGKILL"


def test_reload_checks_the_file_first(fake: FakeCorral, tmp_path: Path) -> None:
    sock = fake.server.path
    good = tmp_path / "corral.toml"
    good.write_text('[program.web]\ncommand = ["true"]\n')
    out = corral("-c", str(good), "reload", sock=sock)
    assert out.returncode == 0 and out.stdout.strip() == "added: jobs; changed: web (env)"
    good.write_text('[program.web]\ncomand = ["true"]\n')
    n = len(fake.calls)
    out = corral("-c", str(good), "reload", sock=sock)
    assert out.returncode == 6 and "did you mean 'command'" in out.stderr
    assert len(fake.calls) == n, "a bad file is never sent to corral"


def test_check(tmp_path: Path) -> None:
    (tmp_path / "corral.toml").write_text(textwrap.dedent("""\
        [program.web]
        command = ["python3", "-m", "http.server"]
        numprocs = "2"
        ready = "tcp:99999"
        [program.db]
        comand = ["x"]
        """))
    out = corral("check", cwd=str(tmp_path))
    assert out.returncode == 1
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("  ")]
    assert len(errors) == 4, out.stderr
    assert f"{tmp_path}/corral.toml:3: program.web.numprocs" in out.stderr
    (tmp_path / "corral.toml").write_text('[program.web]\ncommand = ["true"]\nnumprocs = 2\n')
    out = corral("check", cwd=str(tmp_path))
    assert out.returncode == 0 and "ok" in out.stdout and "web (2x command)" in out.stdout


def test_run_refuses_bad_arguments_before_starting_anything(tmp_path: Path) -> None:
    out = corral("run", "-n", "4", "--restart", "sometimes", "--", "x")
    assert out.returncode == 2
    out = corral("run", "-c", str(tmp_path / "missing.toml"))
    assert out.returncode == 6 and "missing.toml" in out.stderr
    out = corral("run", "-n", "2")
    assert out.returncode == 2 and "go with a command" in out.stderr
    out = corral("run", cwd=str(tmp_path))
    assert out.returncode == 6 and "in the current directory" in out.stderr


def test_run_calls_the_installed_runner(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from corral.cli import main as cli_main

    seen: list[Any] = []

    def runner(opts: cli_main.RunOptions) -> int:
        seen.append(opts)
        return 0

    cli_main.set_runner(runner)
    try:
        result = CliRunner().invoke(cli_main.cli, ["--socket", str(tmp_path / "s.sock"), "run",
                                                   "-n", "3", "--json-logs", "--",
                                                   "python3", "w.py", "--flag"])
    finally:
        cli_main.set_runner(None)
    assert result.exit_code == 0, result.output
    (opts,) = seen
    prog = opts.config.programs["python3"]
    assert prog.command == ("python3", "w.py", "--flag") and prog.numprocs == 3
    assert opts.json_logs and opts.socket == str(tmp_path / "s.sock")


def test_top_once(fake: FakeCorral) -> None:
    out = corral("top", "--once", sock=fake.server.path)
    assert out.returncode == 0 and "HEARTBEAT" in out.stdout and "web.1" in out.stdout
    assert fake.calls[-1][1] == {"resources": True}


# --- render ------------------------------------------------------------------------------------


def test_status_exit_codes_pure() -> None:
    R, B, S = WorkerState.RUNNING, WorkerState.BACKOFF, WorkerState.STOPPED
    assert render.status_exit_code(payload([R, R])) == 0
    assert render.status_exit_code(payload([R, B])) == 1
    assert render.status_exit_code(payload([S, S]), ["web"]) == 3
    assert render.status_exit_code(payload([S, S])) == 1  # db still runs
    assert render.status_exit_code(payload([S, WorkerState.EXITED]), ["web"]) == 1
    assert render.status_exit_code(payload([R]), ["nope"]) == 4
    empty = status_payload([program_to_json("x", "command", [])], pid=1, version="",
                           uptime=0, config=None, socket=None)
    assert render.status_exit_code(empty) == 3
    gave_up = status_payload([program_to_json("x", "command", [worker_to_json(
        ws(0, WorkerState.RUNNING))], gave_up=True)], pid=1, version="", uptime=0,
        config=None, socket=None)
    assert render.status_exit_code(gave_up) == 1
    assert gave_up["programs"][0]["state"] == "gave up"


def test_status_table_render() -> None:
    console = Console(record=True, width=160, color_system=None)
    console.print(render.status_table(payload([WorkerState.RUNNING, WorkerState.BACKOFF])))
    text = console.export_text()
    assert "backoff (1.5s)" in text and "SIGKILL" in text and "serving" in text
    assert render.format_exit({"code": None, "signal": "SIGKILL", "reason": "hung"}) == \
        "hung: SIGKILL"
    assert render.format_exit({"code": 1, "reason": "exited"}) == "exit 1"
    assert render.format_duration(3 * 86400) == "3d00h"
    assert render.format_bytes(1536) == "1.5KiB"


def test_import_corral_stays_light() -> None:
    code = ("import sys, corral; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('click', 'rich') "
            "or m.startswith(('corral.cli', 'corral._control', 'corral._logs', "
            "'corral._notify', 'corral._readiness'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": SRC}, timeout=30, check=True)
    assert out.stdout.strip() == "[]"


def test_example_config_passes_check() -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "corral.toml"
    out = corral("check", "-c", str(example))
    assert out.returncode == 0, out.stderr
    assert "start order: clock -> web" in out.stdout


def test_command_event_shape() -> None:
    from corral._json import command_event

    ev = command_event("restart", {"program": "web", "index": 2}, uid=1000, gid=100, pid=77,
                       at=5.0)
    assert ev["schema"] == "corral.event/1" and ev["kind"] == "command"
    assert (ev["pool"], ev["index"], ev["at"]) == ("web", 2, 5.0)
    assert ev["message"] == "restart web:2"
    assert ev["caller"] == {"uid": 1000, "gid": 100, "pid": 77}
    ev = command_event("scale", {"program": "web", "numprocs": 4}, uid=0, gid=0, pid=1)
    assert ev["message"] == "scale web numprocs=4" and ev["index"] is None
    assert render.format_event(ev).endswith("-- scale web numprocs=4 [by uid 0 pid 1]")
