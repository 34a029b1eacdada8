"""``corral run``'s socket activation rules (corral.cli._activation) on real sockets: SERVE and
PROGRAM.ENTRY names, the warning for the others, and the combinations refused as config errors;
and the Notifier's timers on a loop (corral._notify)."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from corral._notify import Notifier
from corral.cli._activation import Activation
from corral.cli.config import load_text
from corral.serve import _listeners
from corral.serve._listeners import Listener

pytestmark = pytest.mark.timeout(30)

CONFIG = """
[program.echo]
command = ["true"]
listen = { http = "127.0.0.1:0", admin = "127.0.0.1:0" }

[program.plain]
command = ["true"]
listen = ["127.0.0.1:0"]

[serve.api]
app = "m:app"
bind = ["127.0.0.1:0"]
"""


def _systemd(name: str, reuse_port: bool = False) -> Listener:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(reuse_port))
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return Listener(name, sock, f"127.0.0.1:{sock.getsockname()[1]}", "systemd")


@pytest.fixture
def adopted() -> Iterator[list[Listener]]:
    made: list[Listener] = []
    yield made
    _listeners.close_all(made)


def test_sockets_go_by_name(adopted: list[Listener], caplog: Any) -> None:
    adopted += [_systemd("api"), _systemd("api"), _systemd("echo.http"), _systemd("plain.0"),
                _systemd("stray")]
    act = Activation(adopted)
    config = load_text(CONFIG, check_privileges=False)
    assert act.check(config) == []
    served = act.for_serve("api")
    try:
        # Duplicates, in order: the Server closes its own, systemd's stay for the next one.
        assert [x.address for x in served] == [adopted[0].address, adopted[1].address]
        assert {x.fd for x in served}.isdisjoint(x.fd for x in adopted)
    finally:
        _listeners.close_all(served)
    assert adopted[0].sock.fileno() >= 0
    http = act.for_listen("echo", "http")
    assert http is not None and http.name == "http" and http.sock is adopted[2].sock
    assert act.for_listen("echo", "admin") is None  # bound from its address
    assert act.for_listen("plain", "0") is not None
    assert act.for_serve("other") == []
    assert [x.name for x in act.unmatched(config)] == ["stray"]
    with caplog.at_level(logging.WARNING, logger="corral.run"):
        act.warn_unmatched(config)
    assert "stray=127.0.0.1:" in caplog.text and "echo.admin" in caplog.text
    act.close()
    assert adopted[0].sock.fileno() == -1


def test_bad_combinations_are_config_errors(adopted: list[Listener]) -> None:
    adopted += [_systemd("api"), _systemd("echo.http"), _systemd("echo.http")]
    text = CONFIG.replace('bind = ["127.0.0.1:0"]', 'bind = ["127.0.0.1:0"]\nreuse_port = true')
    text = text.replace('listen = ["127.0.0.1:0"]', f'listen = ["fd://{adopted[0].fd}"]')
    issues = Activation(adopted).check(load_text(text, check_privileges=False))
    text_of = {i.key: f"expected {i.expected}, got {i.given}" for i in issues}
    assert set(text_of) == {"serve.api.reuse_port", "program.echo.listen.http",
                            "program.plain.listen"}, text_of
    assert "SO_REUSEPORT" in text_of["serve.api.reuse_port"]
    assert "2 fds named echo.http" in text_of["program.echo.listen.http"]
    assert "systemd's socket 'api'" in text_of["program.plain.listen"]
    # With SO_REUSEPORT on systemd's socket (ReusePort=yes), reuse_port is fine.
    ok = Activation([_systemd("api", reuse_port=True)])
    adopted += ok.adopted
    assert ok.check(load_text(CONFIG.replace('bind = ["127.0.0.1:0"]',
                                             'bind = ["127.0.0.1:0"]\nreuse_port = true'),
                              check_privileges=False)) == []


class _Loop:
    """Timers run by hand: the loop's side of the Notifier's pings."""

    def __init__(self) -> None:
        self.timers: list[tuple[float, Any]] = []

    def call_later(self, delay: float, callback: Any) -> Any:
        self.timers.append((delay, callback))
        return None

    def run_next(self) -> None:
        _, callback = self.timers.pop(0)
        callback()


def test_notifier_pings_and_extends_on_the_loop() -> None:
    sent: list[str] = []
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind("\0corral-test-notifier-" + str(id(sent)))
    rx.settimeout(5)
    try:
        env = {"NOTIFY_SOCKET": "@corral-test-notifier-" + str(id(sent)),
               "WATCHDOG_USEC": "4000000"}
        n = Notifier(env=env)
        loop = _Loop()
        n.start_watchdog(loop)  # type: ignore[arg-type]
        n.start_watchdog(loop)  # type: ignore[arg-type]  # once only
        assert [d for d, _ in loop.timers] == [2.0]
        loop.run_next()
        left = [12.0, None]
        n.keep_extending(loop, lambda: left.pop(0))  # type: ignore[arg-type]
        loop.run_next()  # the watchdog again
        loop.run_next()  # the extension: then the stop is over, no more
        for _ in range(4):
            sent.append(rx.recv(4096).decode())
        assert sent == ["WATCHDOG=1", "WATCHDOG=1", "EXTEND_TIMEOUT_USEC=22000000",
                        "WATCHDOG=1"]
        assert [d for d, _ in loop.timers] == [2.0]
    finally:
        rx.close()
