"""The keeper: a tiny process that kills the workers' process groups when the supervisor dies.

A worker dies with its supervisor through its parent-death signal, but that signal reaches the
worker alone: whatever the worker started (a subprocess, a shell pipeline) stays in its process
group and would be orphaned. Nothing the supervisor runs can help once it is SIGKILLed or calls
``os._exit()``, so one small helper per supervising process does it instead:

- it is started once, with ``posix_spawn`` (never a fork of a multi-threaded supervisor), in a
  session of its own so a terminal's Ctrl-C does not reach it;
- the supervisor tells it, over a pipe, each worker's process group as the worker starts
  (``+<pgid>``) and once it has been reaped (``-<pgid>``): one ``write`` of a few bytes, off the
  restart path;
- it holds a pidfd of the supervisor; when that becomes readable (the supervisor is gone, however
  it ended) or the pipe reaches EOF, it SIGKILLs every group still registered and exits.

If the supervisor ends
cleanly every group has been unregistered already and the keeper just exits.

The keeper never runs user code and imports nothing but ``os``, ``select``, ``signal`` and ``sys``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading

__all__ = ["KEEPER_TITLE", "keeper"]

log = logging.getLogger(__name__)

KEEPER_TITLE = "corral-keeper"

# Runs in ``python -I -S``: argv[1] is the supervisor's pid; stdin carries "+pgid"/"-pgid" lines.
_KEEPER_CODE = r"""# corral-keeper
import os, select, signal, sys
for s in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGPIPE):
    signal.signal(s, signal.SIG_IGN)
sup = int(sys.argv[1])
try:
    pidfd = os.pidfd_open(sup)
except OSError:
    pidfd = -1
groups = set()
buf = b""
def take(chunk):
    global buf
    buf += chunk
    *lines, buf = buf.split(b"\n")
    for line in lines:
        if line[:1] == b"+":
            groups.add(int(line[1:]))
        elif line[:1] == b"-":
            groups.discard(int(line[1:]))
def kill_all():
    # Take what is still in the pipe first: a group registered just before the end (or
    # before this keeper had even started, if the supervisor died that early).
    try:
        while select.select([0], [], [], 0)[0]:
            chunk = os.read(0, 65536)
            if not chunk:
                break
            take(chunk)
    except OSError:
        pass
    for g in groups:
        try:
            os.killpg(g, signal.SIGKILL)
        except OSError:
            pass
    os._exit(0)
if pidfd < 0 or os.getppid() != sup:
    kill_all()
poller = select.poll()
poller.register(0, select.POLLIN)
poller.register(pidfd, select.POLLIN)
while True:
    ready = dict(poller.poll())
    if 0 in ready:
        chunk = os.read(0, 65536)
        if chunk:
            take(chunk)
            if pidfd not in ready:
                continue
    # EOF (every write end closed: the supervisor is gone) or the supervisor's pidfd fired.
    kill_all()
"""


class _Keeper:
    """This process's handle on its keeper (one per supervising process, started on first use)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._fd = -1
        self._pid = 0  # the supervising process the keeper protects
        self._failed = False

    @property
    def pid(self) -> int | None:
        """The keeper's pid, or None if it is not running."""
        proc = self._proc
        return proc.pid if proc is not None and self._pid == os.getpid() else None

    def start(self) -> None:
        """Start the keeper if it is not running yet (cheap when it is).

        A keeper that cannot be started is logged once; supervision goes on without it.
        """
        if self._pid == os.getpid() and (self._proc is not None or self._failed):
            return
        with self._lock:
            if self._pid != os.getpid():
                self._reset()
            if self._proc is not None or self._failed:
                return
            try:
                self._proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-c", _KEEPER_CODE, str(os.getpid())],
                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True)
            except OSError as exc:
                self._failed = True
                log.warning("could not start corral's keeper process (%s): the children of "
                            "workers may outlive a supervisor that is killed", exc)
                return
            assert self._proc.stdin is not None
            self._fd = self._proc.stdin.fileno()
            os.set_inheritable(self._fd, False)

    def _send(self, line: bytes) -> None:
        if self._fd < 0 or self._pid != os.getpid():
            return
        with contextlib.suppress(OSError):
            os.write(self._fd, line)

    def register(self, pgid: int) -> None:
        """Kill group ``pgid`` if this process dies before :meth:`unregister`."""
        if self._fd < 0 or self._pid != os.getpid():
            self.start()  # pools start it up front; this covers any other caller
        self._send(b"+%d\n" % pgid)

    def unregister(self, pgid: int) -> None:
        """Group ``pgid`` is gone (its leader was reaped): forget it."""
        self._send(b"-%d\n" % pgid)

    def _reset(self) -> None:
        # A forked child of a supervisor: the keeper protects the parent, not us. Drop the
        # inherited pipe without touching the parent's keeper.
        proc = self._proc
        if proc is not None:
            proc.returncode = 0  # not ours to wait for: keep Popen.__del__ from trying
            if proc.stdin is not None:
                with contextlib.suppress(OSError, ValueError):
                    proc.stdin.close()
        self._proc, self._fd, self._failed = None, -1, False
        self._pid = os.getpid()


keeper = _Keeper()
keeper._pid = os.getpid()


def _after_fork_in_child() -> None:
    keeper._reset()


os.register_at_fork(after_in_child=_after_fork_in_child)
