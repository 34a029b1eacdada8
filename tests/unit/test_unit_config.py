"""corral.toml: loading, validation with file/line/key/expected/given, env files, diff."""

from __future__ import annotations

import math
import os
import signal
import textwrap
from pathlib import Path

import pytest

from corral._readiness import ReadyHttp, ReadyLog, ReadyNotify, ReadyStarted, ReadyTcp
from corral.cli.config import (
    ConfigError,
    LogConfig,
    diff,
    find_config,
    from_command,
    load,
    load_text,
    parse_duration,
    parse_env_file,
    parse_signal,
    parse_size,
)
from corral.policy import Backoff, RestartBudget, RestartPolicy
from corral.spec import PoolSpec

pytestmark = pytest.mark.timeout(30)

FULL = """\
socket_dir = "run"
socket_name = "web-stack"
allow_uids = ["nobody", 0]
allow_gids = [0]
http = "127.0.0.1:9100"

[log]
timestamps = true
file = "{program}.log"
max_bytes = "1MiB"

[program.db]
command = "exec sleep 100"
shell = true
stop_signal = "INT"

[program.web]
command = ["python", "-m", "http.server", "8000"]
numprocs = 2
cwd = "."
env = { PORT = 8000, MODE = "prod" }
env_file = "web.env"
umask = "027"
stop_timeout = "1m30s"
restart = "on-failure"
backoff = { initial = "500ms", multiplier = 3, cap = 60, jitter = 0.2, reset_after = "never" }
budget = { max_restarts = "unlimited", window = "10m" }
max_memory = "512MiB"
max_age = "6h"
heartbeat_timeout = 30
startup_timeout = "2m"
depends_on = ["db"]
ready = "http://127.0.0.1:8000/healthz"
log = { console = false, file = "/dev/stdout", json = true }

[program.jobs]
target = "myapp.tasks:run"
args = ["queue-a", 3]
ready = "notify"

[serve.api]
app = "myapp.asgi:app"
bind = ["127.0.0.1:8001", "[::1]:8001", "unix:/run/api.sock", "fd://3"]
workers = 4
interface = "asgi"
max_surge = 2
max_unavailable = 1
graceful_timeout = "20s"
ready_timeout = 30
shutdown_delay = "5s"
reuse_port = true
max_requests = 1000
max_requests_jitter = 50
"""


@pytest.fixture
def cfgdir(tmp_path: Path) -> Path:
    (tmp_path / "run").mkdir()
    (tmp_path / "web.env").write_text('# comment\nexport SECRET="s3 cr\\"et"\nMODE=dev\n')
    return tmp_path


def write(d: Path, text: str, name: str = "corral.toml") -> str:
    p = d / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def test_full_file_loads_into_frozen_dataclasses(cfgdir: Path) -> None:
    cfg = load(write(cfgdir, FULL))
    assert cfg.socket_dir == str(cfgdir / "run")
    assert cfg.socket_path == str(cfgdir / "run" / "web-stack.sock")
    assert cfg.allow_uids == (65534, 0) and cfg.allow_gids == (0,)
    assert cfg.http == "127.0.0.1:9100"
    assert list(cfg.programs) == ["db", "web", "jobs"]
    db, web, jobs = cfg.programs["db"], cfg.programs["web"], cfg.programs["jobs"]
    assert db.command == ("/bin/sh", "-c", "exec sleep 100") and db.shell
    assert db.stop_signal is signal.SIGINT
    assert db.log.file == str(cfgdir / "{program}.log") and db.log.timestamps
    assert db.log.file_for("db") == str(cfgdir / "db.log")
    assert db.log.max_bytes == 1024 * 1024
    assert web.kind == "command" and web.numprocs == 2 and web.cwd == str(cfgdir)
    assert dict(web.env) == {"SECRET": 's3 cr"et', "MODE": "prod", "PORT": "8000"}
    assert web.env_file == (str(cfgdir / "web.env"),)
    assert web.umask == 0o027
    assert web.stop_timeout == 90.0
    assert web.restart is RestartPolicy.ON_FAILURE
    assert web.backoff == Backoff(initial=0.5, multiplier=3.0, cap=60.0, jitter=0.2,
                                  reset_after=math.inf)
    assert web.budget == RestartBudget(max_restarts=None, window=600.0)
    assert web.max_memory == 512 * 1024 ** 2
    assert web.max_age == 6 * 3600 and web.heartbeat_timeout == 30 and web.startup_timeout == 120
    assert web.depends_on == ("db",)
    assert web.ready == ReadyHttp("http://127.0.0.1:8000/healthz")
    assert web.log.console is False and web.log.json is True
    assert web.log.file == "/dev/stdout" and web.log.timestamps  # merged with [log]
    assert web.needs_notify_socket  # heartbeat_timeout: WATCHDOG=1 beats
    assert jobs.kind == "target" and jobs.target == "myapp.tasks:run"
    assert jobs.args == ("queue-a", 3) and jobs.ready == ReadyNotify()
    api = cfg.serve["api"]
    assert api.bind == ("127.0.0.1:8001", "[::1]:8001", "unix:/run/api.sock", "fd://3")
    assert (api.workers, api.interface, api.max_surge, api.max_unavailable) == (4, "asgi", 2, 1)
    assert (api.graceful_timeout, api.ready_timeout, api.shutdown_delay) == (20, 30, 5)
    assert api.reuse_port and (api.max_requests, api.max_requests_jitter) == (1000, 50)
    assert cfg.start_order() == ["db", "web", "jobs", "api"]
    assert cfg.stop_order() == ["api", "jobs", "web", "db"]
    with pytest.raises(AttributeError):
        web.numprocs = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        web.env["X"] = "1"  # type: ignore[index]


def test_program_maps_to_poolspec(cfgdir: Path) -> None:
    cfg = load(write(cfgdir, FULL))
    kw = cfg.programs["web"].pool_spec_kwargs()
    spec = PoolSpec(target=os.getpid, start_method="fork", **kw)  # any callable target
    assert spec.workers == 2 and spec.name == "web" and spec.stop_timeout == 90
    assert spec.restart_policy is RestartPolicy.ON_FAILURE
    assert spec.stop_signal == signal.SIGTERM and spec.ready_when == "ready"
    assert spec.worker_name(1) == "web.1"
    jobs = cfg.programs["jobs"]
    spec = PoolSpec(target=os.getpid, start_method="fork", args=jobs.target_args(),
                    **jobs.pool_spec_kwargs())
    assert spec.worker_args(0) == ("queue-a", 3) and spec.ready_when == "ready"
    assert cfg.programs["db"].pool_spec_kwargs()["ready_when"] == "started"


def test_pyproject_tool_corral(cfgdir: Path) -> None:
    path = write(cfgdir, """\
        [project]
        name = "x"

        [tool.corral]
        socket_name = "app"

        [tool.corral.program.web]
        command = ["true"]
        numprocs = "2"
        """, "pyproject.toml")
    assert find_config(str(cfgdir)) == path
    with pytest.raises(ConfigError) as e:
        load(path)
    (issue,) = e.value.issues
    assert issue.key == "tool.corral.program.web.numprocs" and issue.line == 9
    assert str(issue) == (f"{path}:9: tool.corral.program.web.numprocs: expected an integer "
                          ">= 0, got '2' (string)")
    path2 = write(cfgdir, "[project]\nname = 'x'\n", "pyproject.toml")
    assert find_config(str(cfgdir)) is None
    with pytest.raises(ConfigError, match=r"a \[tool.corral\] table"):
        load(path2)


def test_corral_toml_wins_over_pyproject(cfgdir: Path) -> None:
    write(cfgdir, "[tool.corral.program.a]\ncommand=['a']\n", "pyproject.toml")
    path = write(cfgdir, "[program.b]\ncommand=['b']\n")
    assert find_config(str(cfgdir)) == path


BAD = """\
socket_dri = "/x"
http = "localhost"

[program.web]
comand = ["x"]
numprocs = "four"
ready = "tcp:0"
backoff = { initial = 5, cap = 1 }
budget = { max_restarts = -1, windw = 3 }
depends_on = ["wbe", "web"]
stop_signal = "KILL"
max_memory = "12 parsecs"
user = "no-such-user-here"
env = { "BAD KEY" = "1", OK = true }
log = { backups = -1, file = "/nonexistent/dir/x.log" }

[program.a]
command = ["a"]
depends_on = ["b"]

[program.b]
command = "b"
depends_on = ["a"]

[program."x.y"]
target = "not a target"
shell = true

[program.both]
command = ["a"]
target = "m:f"

[serve.api]
app = "x"
max_surge = 0

[serve.b]
app = "m:app"
"""


def test_every_error_of_a_file_with_line_key_expected_given(cfgdir: Path) -> None:
    path = write(cfgdir, BAD)
    with pytest.raises(ConfigError) as e:
        load(path)
    got: dict[tuple[int | None, str], list[tuple[str, str]]] = {}
    for i in e.value.issues:
        got.setdefault((i.line, i.key), []).append((i.expected, i.given))
    text = str(e.value)
    assert text.startswith(f"{len(e.value.issues)} errors in {path}:")

    def has(line: int, key: str, expected: str, given: str) -> None:
        found = got.get((line, key), [])
        assert any(expected in exp and given in giv for exp, giv in found), (line, key, found)

    has(1, "socket_dri", "a known key", "unknown key 'socket_dri' (did you mean 'socket_dir'?)")
    has(2, "http", "HOST:PORT", "'localhost' (string)")
    has(5, "program.web.comand", "a known key", "did you mean 'command'?")
    has(4, "program.web", "a command = [argv...] or a target", "neither")
    has(6, "program.web.numprocs", "an integer >= 0", "'four' (string)")
    has(7, "program.web.ready", "tcp:PORT or tcp:HOST:PORT", "'tcp:0'")
    has(8, "program.web.backoff.cap", ">= Backoff.initial", "1.0")
    has(9, "program.web.budget.max_restarts", "an integer >= 0 or \"unlimited\"", "-1")
    has(9, "program.web.budget.windw", "a known key", "did you mean 'window'?")
    has(10, "program.web.depends_on", "names of programs in this file",
        "'wbe' (no such program; did you mean 'web'?)")
    has(10, "program.web.depends_on", "", "cannot depend on itself")
    has(11, "program.web.stop_signal", "a signal a process can catch", "SIGKILL")
    has(12, "program.web.max_memory", "a size", "'12 parsecs'")
    has(13, "program.web.user", "an existing user name or uid", "(no such user)")
    has(14, 'program.web.env."BAD KEY"', "a variable name", "'BAD KEY'")
    has(14, "program.web.env.OK", "a string (or an integer)", "True (boolean)")
    has(15, "program.web.log.backups", "an integer between 0 and 1000", "-1")
    has(15, "program.web.log.file", "a file in an existing directory", "does not exist")
    has(19, "program.a.depends_on", "without a cycle", "the cycle a -> b -> a")
    has(22, "program.b.command", "an array of argv strings (or set shell = true",
        "'b' (string)")
    has(25, 'program."x.y"', "no dots or colons", "'x.y'")
    has(26, 'program."x.y".target', '"package.module:function"', "'not a target'")
    has(27, 'program."x.y".shell', "shell only with a command", "shell = true with a target")
    has(31, "program.both.target", "either command or target, not both", "both")
    has(34, "serve.api.app", '"package.module:attribute"', "'x'")
    has(35, "serve.api.max_surge", "max_surge or max_unavailable > 0", "both 0")
    # Sorted by line, all of them at once.
    lines = [i.line or 0 for i in e.value.issues]
    assert lines == sorted(lines)
    assert len(e.value.issues) >= 26


def test_syntax_error_names_line_and_column(cfgdir: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load(write(cfgdir, "[program.a]\ncommand = [\"a\"\nx = 1\n"))
    (issue,) = e.value.issues
    assert issue.key == "(syntax)" and issue.line is not None and issue.line >= 2
    assert "column" in issue.given and issue.expected == "valid TOML"


def test_missing_file_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        load(str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match=r"at least one \[program.NAME\]"):
        load(write(tmp_path, "# nothing\n"))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        (tmp_path / "corral.toml").unlink()
        with pytest.raises(ConfigError, match="in the current directory"):
            load()
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize(("snippet", "key", "expected"), [
    ('command = ["a"]\nnumprocs = 5000', "numprocs", "between 0 and 4096"),
    ('command = ["a"]\ncwd = "missing-dir"', "cwd", "an existing directory"),
    ('command = ["a"]\nenv_file = "missing.env"', "env_file", "a regular file of UTF-8 "
     "KEY=VALUE lines, at most 1 MiB"),
    ('command = []', "command", "at least one argv string"),
    ('command = ["a", 1]', "command", "an array of non-empty argv strings"),
    ('command = ["a"]\nshell = true', "", ""),  # a one-element list with shell is fine
    ('command = ["a", "b"]\nshell = true', "command", "a shell command line"),
    ('command = ["a"]\nargs = [1]', "args", "args only with a target"),
    ('command = ["a"]\numask = "999"', "umask", "an octal umask"),
    ('command = ["a"]\nrestart = "sometimes"', "restart", '"always", "on-failure" or "never"'),
    ('command = ["a"]\nstop_timeout = "soon"', "stop_timeout", "a duration"),
    ('command = ["a"]\nheartbeat_timeout = 0', "heartbeat_timeout", "a duration > 0"),
    ('command = ["a"]\nready = "log:(x"', "ready", "a valid ready check"),
    ('command = ["a"]\nready = 5', "ready", "a string"),
    ('command = ["a"]\nbackoff = 5', "backoff", "a table"),
    ('command = ["a"]\nbackoff = { jitter = 1.5 }', "backoff.jitter", "a fraction in [0, 1)"),
    ('command = ["a"]\ngroup = "no-such-group-here"', "group", "an existing group"),
    ('command = ["a"]\nstop_signal = "SIGNOPE"', "stop_signal", "a signal name or number"),
    ('command = ["a"]\nlisten = []', "listen", "at least one address"),
    ('command = ["a"]\nlisten = ["nohost"]', "listen", "HOST:PORT"),
    ('command = ["a"]\nlisten = 8000', "listen", "a list of addresses"),
    ('command = ["a"]\nlisten = { "a.b" = "127.0.0.1:1" }', "listen", "socket names"),
    ('target = "m:f"\nlisten = ["127.0.0.1:1"]', "listen", "listen only with a command"),
])
def test_program_value_errors(cfgdir: Path, snippet: str, key: str, expected: str) -> None:
    path = write(cfgdir, f"[program.p]\n{snippet}\n")
    if not key:
        assert load(path).programs["p"].command == ("/bin/sh", "-c", "a")
        return
    with pytest.raises(ConfigError) as e:
        load(path)
    issues = [i for i in e.value.issues if i.key == f"program.p.{key}"]
    assert issues, str(e.value)
    assert expected in issues[0].expected, str(e.value)
    assert issues[0].line is not None


@pytest.mark.parametrize(("snippet", "key", "expected"), [
    ('app = "m:a"\nbind = []', "bind", "at least one address"),
    ('app = "m:a"\nbind = ["nohost"]', "bind", "HOST:PORT"),
    ('app = "m:a"\nbind = "unix:relative"', "bind", "unix:/absolute/path"),
    ('app = "m:a"\nworkers = 0', "workers", "between 1 and"),
    ('app = "m:a"\ninterface = "cgi"', "interface", '"asgi", "wsgi" or "auto"'),
    ('app = "m:a"\nmax_requests_jitter = 5', "max_requests_jitter", "max_requests > 0"),
    ('app = "m:a"\nreuse_port = "yes"', "reuse_port", "true or false"),
    ('app = "m:a"\nready_timeout = 0', "ready_timeout", "a duration > 0"),
    ('app = "m:a"\nworkerz = 2', "workerz", "a known key"),
    ('app = "m:a"\nstart_method = "fork"', "start_method", '"zygote", "forkserver"'),
    ('app = "m:a"\nstart_method = "spawn"\nstandby = 1', "standby", 'start_method = "zygote"'),
    ('app = "m:a"\nworkers = 2\nmin_ready = 3', "min_ready", "<= workers (2)"),
    ('app = "m:a"\nmin_ready = 0', "min_ready", ">= 1"),
    ('app = "m:a"\nmax_memory = "lots"', "max_memory", "a size"),
    ('app = "m:a"\nmax_age = 0', "max_age", "a duration > 0"),
    ('app = "m:a"\nidle_grace = "soon"', "idle_grace", "a duration"),
    ('app = "m:a"\nhttp = 9100', "http", "an address like '127.0.0.1:9100'"),
    ('app = "m:a"\nhttp = "localhost"', "http", "HOST:PORT, [IPv6]:PORT, or PORT"),
    ('bind = "127.0.0.1:1"', "", "app ="),
])
def test_serve_value_errors(cfgdir: Path, snippet: str, key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(write(cfgdir, f"[serve.s]\n{snippet}\n"))
    want = "serve.s" + (f".{key}" if key else "")
    issues = [i for i in e.value.issues if i.key == want]
    assert issues and expected in issues[0].expected, str(e.value)


def test_serve_table_takes_the_server_options(cfgdir: Path) -> None:
    from corral.serve._server import from_config

    cfg = load(write(cfgdir, """
        [serve.api]
        app = "m:a"
        workers = 3
        start_method = "zygote"
        standby = 1
        min_ready = 2
        max_memory = "256MiB"
        max_age = "1h"
        idle_grace = "250ms"
        """))
    api = cfg.serve["api"]
    assert (api.start_method, api.standby, api.min_ready) == ("zygote", 1, 2)
    assert (api.max_memory, api.max_age, api.idle_grace) == (256 << 20, 3600, 0.25)
    opts = from_config(api, app_dir=str(cfgdir))
    assert (opts.standby, opts.min_ready, opts.max_memory, opts.max_age) == (1, 2, 256 << 20,
                                                                              3600)
    assert opts.wanted_ready == 2 and opts.idle_grace == 0.25
    assert api.http is None and opts.http is None
    with_http = load(write(cfgdir, '[serve.api]\napp = "m:a"\nhttp = "[::1]:0"\n'))
    assert from_config(with_http.serve["api"], app_dir=str(cfgdir)).http == "[::1]:0"


def test_serve_and_program_names_must_differ(cfgdir: Path) -> None:
    with pytest.raises(ConfigError, match="a name not used by a"):
        load(write(cfgdir, '[program.x]\ncommand=["a"]\n[serve.x]\napp="m:a"\n'))


def test_depends_on_a_serve_entry_is_allowed(cfgdir: Path) -> None:
    cfg = load(write(cfgdir, '[program.x]\ncommand=["a"]\ndepends_on="api"\n'
                             '[serve.api]\napp="m:a"\n'))
    assert cfg.start_order() == ["api", "x"]


@pytest.mark.skipif(os.geteuid() == 0, reason="as root every user switch is allowed")
def test_user_switch_needs_root(cfgdir: Path) -> None:
    path = write(cfgdir, '[program.x]\ncommand=["a"]\nuser="root"\n')
    with pytest.raises(ConfigError, match="corral to run as root"):
        load(path)
    assert load(path, check_privileges=False).programs["x"].uid == 0


def test_user_resolves_uid_and_gid(cfgdir: Path) -> None:
    cfg = load(write(cfgdir, '[program.x]\ncommand=["a"]\nuser="nobody"\n'),
               check_privileges=False)
    assert (cfg.programs["x"].uid, cfg.programs["x"].gid) == (65534, 65534)
    assert cfg.programs["x"].requires_root == (os.geteuid() != 65534)


# --- values --------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "seconds"), [
    (5, 5.0), (0.25, 0.25), ("500ms", 0.5), ("30s", 30.0), ("5m", 300.0), ("1h30m", 5400.0),
    ("2d", 172800.0), (" 1.5s ", 1.5), ("1m 30s", 90.0),
])
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["", "5", "5x", "s", "-1s", True, [1], -1, float("nan")])
def test_parse_duration_bad(value: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        parse_duration(value)


@pytest.mark.parametrize(("value", "size"), [
    (1024, 1024), ("512MiB", 512 * 2 ** 20), ("1GB", 10 ** 9), ("64k", 65536), ("1.5K", 1536),
    ("10 mb", 10 ** 7), ("7", 7), ("3B", 3), ("2TiB", 2 * 2 ** 40),
])
def test_parse_size(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["12 parsecs", "MiB", True, 1.5, -1, "1e3"])
def test_parse_size_bad(value: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        parse_size(value)


def test_parse_signal() -> None:
    assert parse_signal("TERM") is signal.SIGTERM
    assert parse_signal("sighup") is signal.SIGHUP
    assert parse_signal(" usr1 ") is signal.SIGUSR1
    assert parse_signal(9) is signal.SIGKILL and parse_signal("15") is signal.SIGTERM
    for bad in ("NOPE", 999, True, 1.0):
        with pytest.raises((TypeError, ValueError)):
            parse_signal(bad)


def test_env_file_format() -> None:
    env, issues = parse_env_file(textwrap.dedent("""\
        # a comment
        A=1
        export B = two words  # trailing comment
        C="quoted # not a comment \\n \\"x\\" \\$HOME"
        D='single $HOME \\n'
        E=
        F=a#b

        bad line
        1X=2
        G="unterminated
        """), "/etc/app.env")
    assert env == {"A": "1", "B": "two words", "C": 'quoted # not a comment \n "x" $HOME',
                   "D": "single $HOME \\n", "E": "", "F": "a#b"}
    assert [(i.line, i.expected.split(" ")[0]) for i in issues] == [
        (9, "KEY=VALUE"), (10, "KEY=VALUE"), (11, "a")]
    assert all(i.file == "/etc/app.env" for i in issues)
    assert "closing \"" in issues[2].expected


def test_env_file_errors_surface_in_config(cfgdir: Path) -> None:
    (cfgdir / "bad.env").write_text("OK=1\nnot an assignment\n")
    with pytest.raises(ConfigError) as e:
        load(write(cfgdir, '[program.x]\ncommand=["a"]\nenv_file="bad.env"\n'))
    (issue,) = e.value.issues
    assert issue.file == str(cfgdir / "bad.env") and issue.line == 2


# --- from_command and diff ----------------------------------------------------------------


def test_from_command() -> None:
    cfg = from_command(["python3", "worker.py", "--flag"], numprocs=4, stop_timeout=3,
                       restart="on-failure", json_logs=True)
    (prog,) = cfg.programs.values()
    assert prog.name == "python3" and prog.command == ("python3", "worker.py", "--flag")
    assert prog.numprocs == 4 and prog.stop_timeout == 3
    assert prog.restart is RestartPolicy.ON_FAILURE and prog.log.json
    assert from_command(["./run.sh"]).programs.keys() == {"run-sh"}
    with pytest.raises(ConfigError, match=r"<command line>: program\.x\.restart"):
        from_command(["x"], restart="sometimes")
    with pytest.raises(ConfigError, match="at least one argv string"):
        from_command([], name="x")


def test_diff_added_removed_changed(cfgdir: Path) -> None:
    old = load_text(textwrap.dedent("""\
        [program.a]
        command = ["a"]
        [program.b]
        command = ["b"]
        numprocs = 2
        [program.c]
        command = ["c"]
        env = { X = "1" }
        [serve.s]
        app = "m:a"
        """), str(cfgdir / "corral.toml"))
    new = load_text(textwrap.dedent("""\
        socket_name = "other"
        # a comment moves every line: lines are not settings
        [program.a]
        command = ["a"]
        [program.b]
        command = ["b"]
        numprocs = 4
        [program.c]
        command = ["c", "--verbose"]
        env = { X = "2" }
        [program.d]
        command = ["d"]
        [serve.s]
        app = "m:a"
        workers = 2
        """), str(cfgdir / "corral.toml"))
    d = diff(old, new)
    assert d.added == ("d",) and d.removed == () and d.unchanged == ("a",)
    changes = {c.name: c for c in d.changed}
    assert changes["b"].keys == ("numprocs",) and changes["b"].scale_only
    assert changes["c"].keys == ("command", "env") and not changes["c"].scale_only
    assert [(c.name, c.keys) for c in d.serve_changed] == [("s", ("workers",))]
    assert d.globals_changed == ("socket_name",)
    assert not d.empty
    assert d.to_json()["changed"] == {"b": ["numprocs"], "c": ["command", "env"]}
    back = diff(new, old)
    assert back.removed == ("d",) and back.added == ()
    assert diff(old, old).empty


def test_log_config_defaults() -> None:
    assert LogConfig().console and LogConfig().max_bytes == 10 * 2 ** 20
    cfg = load_text('[program.a]\ncommand=["a"]\nready="log:^ready$"\n'
                    '[program.b]\ncommand=["b"]\nready="tcp:9000"\n', "/tmp/corral.toml")
    assert isinstance(cfg.programs["a"].ready, ReadyLog)
    assert cfg.programs["b"].ready == ReadyTcp("127.0.0.1", 9000)
    assert from_command(["x"]).programs["x"].ready == ReadyStarted()


def test_program_listen_forms(cfgdir: Path) -> None:
    cfg = load(write(cfgdir, """
        [program.a]
        command = ["x", "--fd", "{listen.web.fd}"]
        listen = { web = "127.0.0.1:8000", admin = "unix:/run/admin.sock" }
        [program.b]
        command = ["x"]
        listen = ["127.0.0.1:8001", "[::1]:8001"]
        [program.c]
        command = ["x"]
        listen = "127.0.0.1:8002"
        """))
    assert cfg.programs["a"].listen == (("web", "127.0.0.1:8000"),
                                        ("admin", "unix:/run/admin.sock"))
    assert cfg.programs["b"].listen == (("0", "127.0.0.1:8001"), ("1", "[::1]:8001"))
    assert cfg.programs["c"].listen == (("0", "127.0.0.1:8002"),)
