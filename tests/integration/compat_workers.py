"""Worker functions for the WorkerProcessManager compatibility tests.

Module level, so spawn and forkserver children can import them. The test binds ``flagdir`` (a
per-test directory) with ``functools.partial``, so the manager calls ``fn(flagdir, idx, *args)``.

Each worker first writes ``rec-<idx>-<pid>.json`` (atomically) with what it received: its
arguments, name, daemon flag and process title. The test waits for that file rather than for
time to pass. A worker stops beating once the test creates ``hang-<pid>`` in ``flagdir``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

BEAT_EVERY = 0.01  # Duck's SERVER_POLL


def _describe(arg: Any) -> Any:
    name = type(arg).__name__
    if name == "HeartbeatHealthCheck":
        return {"hc": arg.heartbeat_timeout}
    return repr(arg)


def record(flagdir: str, idx: int, args: tuple[Any, ...]) -> None:
    import setproctitle

    me = multiprocessing.current_process()
    data = {
        "idx": idx, "pid": os.getpid(), "args": [_describe(a) for a in args], "name": me.name,
        "daemon": me.daemon, "title": setproctitle.getproctitle(),
    }
    path = Path(flagdir) / f"rec-{idx}-{os.getpid()}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    tmp.rename(path)


def _forever() -> None:
    while True:
        time.sleep(3600)


def record_args(flagdir: str, idx: int, *args: Any) -> None:
    """Record the arguments, then run until stopped."""
    record(flagdir, idx, args)
    _forever()


def ignore_term(flagdir: str, idx: int, *args: Any) -> None:
    """Ignore SIGTERM (recorded only once that is in place)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    record(flagdir, idx, args)
    _forever()


def exit_with(flagdir: str, idx: int, code: int) -> None:
    """Record, then exit with ``code``."""
    record(flagdir, idx, (code,))
    sys.exit(code)


def duck_server(flagdir: str, idx: int, hc: Any, *args: Any) -> None:
    """Duck's worker: a server loop calling ``hc.update_heartbeat(idx)`` every poll.

    It hangs (stops beating, keeps running) once ``hang-<pid>`` appears in ``flagdir``.
    """
    hang = Path(flagdir) / f"hang-{os.getpid()}"
    hc.update_heartbeat(idx)
    record(flagdir, idx, (hc, *args))
    while not hang.exists():
        hc.update_heartbeat(idx)
        time.sleep(BEAT_EVERY)
    _forever()


def slow_boot(flagdir: str, idx: int, hc: Any, boot: float) -> None:
    """Boot for ``boot`` seconds before the first beat, then beat as Duck's loop does."""
    time.sleep(boot)
    duck_server(flagdir, idx, hc)


def never_beats(flagdir: str, idx: int, hc: Any) -> None:
    """Forgets to call update_heartbeat."""
    record(flagdir, idx, (hc,))
    _forever()
