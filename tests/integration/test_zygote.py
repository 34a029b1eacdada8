"""A zygote's forked workers with real processes and real signals: a stop signal sent before
the worker's bootstrap has set its signal handlers is not lost."""

from __future__ import annotations

import os
import select
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral._bootstrap import BootConfig
from corral.serve._server import ServeOptions
from corral.serve._zygote import Zygote, ZygoteChild
from support import kill_pids

APPS = Path(__file__).parent / "serve_app_dir"

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def zygote() -> Iterator[Zygote]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    opts = ServeOptions(app="asgi_app:app", bind=(), app_dir=str(APPS))
    z = Zygote("test@1", opts.worker_init(), [listener.fileno()])
    try:
        z.start(30)
        yield z
    finally:
        pids = {z.pid} if z.pid is not None else set()
        with z._lock:
            pids |= set(z._children)
        z.kill()
        kill_pids(pids)
        listener.close()


def _boot(stdout: str) -> BootConfig:
    return BootConfig(pool="test@1", index=0, name="test.0", supervisor_pid=os.getpid(),
                      heartbeat_path=None, wake_path=None, ready_on_beat=False,
                      dump_signal=None, forkserver=False, stdio=(stdout, None))


def _exited(child: ZygoteChild, timeout: float) -> bool:
    ready, _, _ = select.select([child.waitable()], [], [], timeout)
    return bool(ready) and child.reap() is not None


def test_a_stop_signal_before_the_bootstrap_is_not_lost(tmp_path: Path,
                                                          zygote: Zygote) -> None:
    """The supervisor may stop a worker as soon as it has its pid (a scale-down that raced its
    start): that SIGTERM must end the worker even though the zygote it was forked from ignores
    SIGTERM. The worker's stdout is a FIFO nobody reads yet, so its bootstrap blocks in
    open() -- before it resets its signal handlers -- until the signal has been sent."""
    fifo = tmp_path / "stdout"
    os.mkfifo(fifo)
    child = zygote.fork(_boot(str(fifo)), (), timeout=30)
    try:
        child.send_stop(signal.SIGTERM)
        # Let the worker's bootstrap go on (opening the read end unblocks its open()); keep
        # draining what it prints so it never blocks on a full pipe.
        fd = os.open(fifo, os.O_RDONLY)
        reader = threading.Thread(target=lambda: _drain(fd), daemon=True)
        reader.start()
        assert _exited(child, 20), (
            f"worker pid {child.pid} still runs 20 s after SIGTERM: the signal was lost")
        status = child.reap()
        assert status is not None and status.signal == signal.SIGTERM, status
        reader.join(10)
    finally:
        child.kill_and_reap()


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 65536):
            pass
    finally:
        os.close(fd)
