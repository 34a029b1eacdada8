"""Server mode (``corral serve``): a web app's workers on listeners corral owns, forked by a
zygote per code generation, reloaded without dropping a request, and systemd both ways.

Nothing here is imported by ``import corral``; uvicorn and a2wsgi load only in the zygote and
the workers (and when ``corral serve`` runs).

- :mod:`._listeners`: bind or adopt (LISTEN_FDS) the sockets; hand them to command programs.
- :mod:`._zygote`: the zygote process and its ``ProcessLike`` children.
- :mod:`._worker`: the app on uvicorn (ASGI, or WSGI through a2wsgi), readiness, the drain.
- :mod:`._server`: generations, the rolling reload, recycling, stop, the control socket.
- :mod:`._systemd`: unit files (sd_notify itself is :class:`corral._notify.Notifier`, shared
  with ``corral run``).
"""

from corral.serve._server import ServeOptions, Server, plan

__all__ = ["ServeOptions", "Server", "plan"]
