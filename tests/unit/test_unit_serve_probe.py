"""``corral serve --http``'s pure parts: the server's /readyz verdict, asking its loop, the
option's validation on the command line, in ServeOptions and in a ``[serve.NAME]`` table (the
command line overrides it), and the unit file written with it."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from corral._reactor import Reactor
from corral.serve._probe import ServerProbe, ServerState, ask, verdict
from corral.serve._server import ServeOptions

pytestmark = pytest.mark.timeout(60)


def state(**kw: object) -> ServerState:
    base: dict[str, object] = dict(name="web", phase="serving", ready=2, needed=2, workers=2,
                                   generation=1)
    base.update(kw)
    return ServerState(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(("st", "now", "ready", "text"), [
    (state(phase="starting", ready=0, generation=None), 0.0, False,
     "server 'web': starting: importing the app; 0/2 workers ready, needs 2"),
    (state(phase="starting", ready=1), 0.0, False,
     "server 'web': starting: 1/2 workers ready, needs 2"),
    (state(), 0.0, True, "server 'web': serving: 2/2 workers ready, needs 2 (generation 1)"),
    # A reload with max_unavailable=0: both generations' accepting workers count.
    (state(ready=3, reloading_to=2), 0.0, True,
     "server 'web': serving: 3/2 workers ready, needs 2 (generation 1, reloading to "
     "generation 2)"),
    (state(ready=1), 0.0, False,
     "server 'web': too few workers ready: 1/2 workers ready, needs 2 (generation 1)"),
    (state(ready=1, needed=1), 0.0, True,
     "server 'web': serving: 1/2 workers ready, needs 1 (generation 1)"),
    # From SIGTERM on: not ready, though every worker still accepts during the delay.
    (state(phase="stopping", why="SIGTERM", shutdown_delay=5, drain_at=103.0), 100.0, False,
     "server 'web': shutting down (SIGTERM): shutdown_delay 5s, 3.0s left before the drain; "
     "2 workers still accepting"),
    (state(phase="stopping", why="SIGTERM", shutdown_delay=5, drain_at=103.0), 103.5, False,
     "server 'web': shutting down (SIGTERM): draining, 0 worker process(es) left"),
    (state(phase="stopping", why="SIGTERM", alive=2), 0.0, False,
     "server 'web': shutting down (SIGTERM): draining, 2 worker process(es) left"),
])
def test_verdict(st: ServerState, now: float, ready: bool, text: str) -> None:
    assert verdict(st, now) == (ready, text)


def test_ask_runs_on_the_loop_and_is_bounded() -> None:
    reactor: Reactor[object] = Reactor("test")
    stop = threading.Event()
    thread = threading.Thread(target=lambda: [reactor.run_once(extra=0.05)
                                              for _ in iter(stop.is_set, True)], daemon=True)
    thread.start()
    try:
        assert ask(reactor, threading.get_ident, 5.0) == thread.ident

        def boom() -> None:
            raise KeyError("x")

        with pytest.raises(KeyError):
            ask(reactor, boom, 5.0)
    finally:
        stop.set()
        thread.join(10)
    # Nobody drives the loop now: a bounded wait, then TimeoutError (a wedged loop).
    with pytest.raises(TimeoutError, match=r"did not answer within 0\.1s"):
        ask(reactor, lambda: None, 0.1)
    reactor.close()
    with pytest.raises(TimeoutError, match="closed"):
        ask(reactor, lambda: None, 0.1)


def test_probe_liveness_and_membership() -> None:
    """The probe's /livez asks the loop; pools come and go by name (loop thread)."""
    reactor: Reactor[object] = Reactor("test")
    probe = ServerProbe("127.0.0.1:0", reactor, state(), dict)
    ok, why = probe.liveness(0.1)
    assert not ok and "did not answer within 0.1s (wedged or stopped)" in why
    assert probe.readiness() == (True, "server 'web': serving: 2/2 workers ready, needs 2 "
                                       "(generation 1)")
    probe.publish(state(phase="stopping", why="SIGTERM"))
    assert probe.readiness()[0] is False
    probe.remove("web@1")  # never added: nothing to do
    reactor.close()


def test_options_http_is_validated() -> None:
    assert ServeOptions(app="a:b", http="127.0.0.1:0").http == "127.0.0.1:0"
    assert ServeOptions(app="a:b").http is None
    with pytest.raises(ValueError, match=r"http must end with a port number 0\.\.65535, got "
                                         r"'localhost'"):
        ServeOptions(app="a:b", http="localhost")
    with pytest.raises(TypeError, match="http must be a str"):
        ServeOptions(app="a:b", http=9100)  # type: ignore[arg-type]


def _corral(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "corral.cli.main", "--socket",
                           str(tmp_path / "s.sock"), *args], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)


@pytest.mark.parametrize(("value", "expected"), [
    ("localhost", "--http must end with a port number 0..65535, got 'localhost'"),
    (":9100", "--http needs a host, got ':9100'"),
    ("::1:9100", "--http: write an IPv6 address in brackets"),
])
def test_bad_http_option_is_a_usage_error(tmp_path: Path, value: str, expected: str) -> None:
    res = _corral(tmp_path, "serve", "m:a", "--http", value)
    assert res.returncode == 2, res.stderr
    assert expected in " ".join(res.stderr.split()), res.stderr


def test_the_command_line_overrides_the_table(tmp_path: Path) -> None:
    from corral.cli.serve_cmd import build_options

    config = tmp_path / "corral.toml"
    config.write_text('[serve.api]\napp = "m:a"\nhttp = "127.0.0.1:9101"\n')
    assert build_options("api", str(config), {}).http == "127.0.0.1:9101"
    assert build_options("api", str(config), {"http": "0.0.0.0:9102"}).http == "0.0.0.0:9102"
    with pytest.raises(ValueError, match="--http must end with a port"):
        build_options("api", str(config), {"http": "x"})


def test_export_systemd_passes_http_through(tmp_path: Path) -> None:
    res = _corral(tmp_path, "export", "systemd", "app:app", "--http", "0.0.0.0:9100", "-o",
                  str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert "--http 0.0.0.0:9100" in (tmp_path / "web.service").read_text()
    res = _corral(tmp_path, "export", "systemd", "app:app", "-o", str(tmp_path / "plain"))
    assert res.returncode == 0, res.stderr
    assert "--http" not in (tmp_path / "plain" / "web.service").read_text()
