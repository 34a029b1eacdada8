"""Test apps for corral serve: an ASGI app (pid in a header), a WSGI twin, a slow handler."""

import asyncio
import os

STARTUP = float(os.environ.get("TEST_APP_STARTUP", "0"))
NEVER_READY = os.environ.get("TEST_APP_NEVER_READY") == "1"


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await asyncio.sleep(3600 if NEVER_READY else STARTUP)
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    delay = 0.2 if scope["path"] == "/slow" else 0.0
    if delay:
        await asyncio.sleep(delay)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"x-pid", str(os.getpid()).encode()),
                            (b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"asgi ok"})


def wsgi(environ, start_response):
    start_response("200 OK", [("x-pid", str(os.getpid())), ("content-type", "text/plain")])
    return [b"wsgi ok"]
