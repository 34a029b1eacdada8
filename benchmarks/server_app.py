"""The server benchmark's app: a 1 s start-up and a 20 ms handler, as ASGI (``app``) and WSGI
(``wsgi_app``).

    uvicorn server_app:app --workers 2
    gunicorn -k uvicorn_worker.UvicornWorker -w 2 server_app:app
    gunicorn -w 2 server_app:wsgi_app       (the WSGI twin: start-up on first use, time.sleep)

Every 200 response names the worker's pid (``x-worker-pid``). Environment (read at import):
- ``BENCH_STARTUP_S`` (default 1.0) and ``BENCH_HANDLER_S`` (default 0.02): the two delays;
- ``BENCH_READY_DIR``: when set, a worker creates ``<dir>/<pid>`` once its start-up is over (the
  ASGI lifespan startup completed), so a harness can tell from outside which workers are done
  booting. The server accepts only after that, so this is when it is ready to serve.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

STARTUP_S = float(os.environ.get("BENCH_STARTUP_S", "1.0"))
HANDLER_S = float(os.environ.get("BENCH_HANDLER_S", "0.02"))
READY_DIR = os.environ.get("BENCH_READY_DIR")

BODY = b"hello from corral's bench app\n"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def _mark_ready() -> None:
    if READY_DIR:
        path = os.path.join(READY_DIR, str(os.getpid()))
        with open(path + ".tmp", "w") as f:
            f.write(f"{time.monotonic()}\n")
        os.replace(path + ".tmp", path)  # atomic: a reader never sees it half-written


def _headers() -> list[tuple[bytes, bytes]]:
    return [(b"content-type", b"text/plain"), (b"content-length", str(len(BODY)).encode()),
            (b"x-worker-pid", str(os.getpid()).encode())]


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """ASGI 3: lifespan start-up sleeps ``STARTUP_S``; each request sleeps ``HANDLER_S``."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await asyncio.sleep(STARTUP_S)
                # The server creates its listener only after startup.complete: the marker is
                # written first, so it may precede accepting by a few hundred microseconds.
                _mark_ready()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    # Drain the (empty) request body.
    while (await receive()).get("more_body"):
        pass
    await asyncio.sleep(HANDLER_S)
    await send({"type": "http.response.start", "status": 200, "headers": _headers()})
    await send({"type": "http.response.body", "body": BODY})


# ------------------------------------------------------------------------------ WSGI twin

_wsgi_booted = False


def wsgi_app(environ: dict[str, Any],
             start_response: Callable[..., Any]) -> Iterable[bytes]:
    """WSGI: the first call in a process pays ``STARTUP_S`` (WSGI has no start-up hook; servers
    that import the app in each worker pay it at import instead, see ``boot_wsgi``)."""
    boot_wsgi()
    time.sleep(HANDLER_S)
    start_response("200 OK", [(k.decode(), v.decode()) for k, v in _headers()])
    return [BODY]


def boot_wsgi() -> None:
    """The WSGI twin's start-up, once per process."""
    global _wsgi_booted
    if not _wsgi_booted:
        time.sleep(STARTUP_S)
        _wsgi_booted = True
        _mark_ready()


if os.environ.get("BENCH_WSGI_BOOT_AT_IMPORT") == "1":
    boot_wsgi()
