"""A non-blocking, bounded output buffer for one fd, driven by a :class:`~corral._loop.Loop`.

Writes never block the loop: what the fd does not take now is kept and written when it can take
more. Past ``high_water`` pending bytes the buffer calls ``on_pause`` (log readers then stop
reading their pipes, so the children block on write: the pipe is the backpressure); once it has
drained to ``low_water`` it calls ``on_resume``. ``limit`` is a hard cap: a write that would pass
it is refused (``write`` returns False) so memory stays bounded whatever the caller does.

Regular files are written in blocking mode (O_NONBLOCK means nothing to them).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable

from corral._loop import Loop, TimerHandle, WriterLoop

__all__ = ["OutBuffer", "open_output"]

log = logging.getLogger(__name__)

_RETRY_FIRST = 0.001
_RETRY_MAX = 0.05


def open_output(fd: int) -> tuple[int, bool]:
    """A private fd for writing to what ``fd`` refers to; return ``(new_fd, is_regular)``.

    For a pipe or a terminal this reopens ``/proc/self/fd/N``, which gives a new open file
    description: O_NONBLOCK can then be set without changing the shell's or the parent's
    (setting it on a shared tty description breaks the shell after we exit). Sockets cannot be
    reopened that way and are dup'ed and set non-blocking. Regular files are dup'ed and stay
    blocking (appends keep their shared offset).
    """
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode):
        return os.dup(fd), True
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
        try:
            new = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            pass
        else:
            return new, False
    new = os.dup(fd)
    os.set_blocking(new, False)
    return new, False


class OutBuffer:
    """Bounded, non-blocking writes to ``fd`` (see the module docstring).

    Args:
        fd: the fd to write to; closed by :meth:`close` when ``owns_fd``.
        loop: the event loop that retries blocked writes.
        high_water: pending bytes above which ``on_pause`` is called.
        low_water: pending bytes at or below which ``on_resume`` is called again.
        limit: pending bytes a write may never exceed (refused past it).
        on_pause, on_resume: congestion callbacks (run on the loop thread).
        on_error: called once with the OSError that made the fd unusable (EPIPE, EIO...);
            later writes are dropped.
        name: for log messages.
    """

    def __init__(self, fd: int, loop: Loop, *, high_water: int = 256 * 1024,
                 low_water: int = 64 * 1024, limit: int = 4 * 1024 * 1024,
                 on_pause: Callable[[], None] | None = None,
                 on_resume: Callable[[], None] | None = None,
                 on_error: Callable[[OSError], None] | None = None,
                 owns_fd: bool = True, name: str = "output") -> None:
        if not 0 <= low_water <= high_water <= limit:
            raise ValueError(
                "OutBuffer needs 0 <= low_water <= high_water <= limit, got "
                f"low_water={low_water}, high_water={high_water}, limit={limit}")
        self.fd = fd
        self.name = name
        self._loop = loop
        self._high = high_water
        self._low = low_water
        self._limit = limit
        self._on_pause = on_pause
        self._on_resume = on_resume
        self._on_error = on_error
        self._owns_fd = owns_fd
        self._buf = bytearray()
        self._congested = False
        self._waiting = False
        self._timer: TimerHandle | None = None
        self._retry = _RETRY_FIRST
        self._failed: OSError | None = None
        self._closed = False
        self.dropped_bytes = 0

    @property
    def pending(self) -> int:
        return len(self._buf)

    @property
    def congested(self) -> bool:
        return self._congested

    @property
    def failed(self) -> OSError | None:
        return self._failed

    @property
    def closed(self) -> bool:
        return self._closed

    def write(self, data: bytes) -> bool:
        """Queue ``data``; False if it was refused (over ``limit``, failed or closed fd)."""
        if self._failed is not None or self._closed:
            self.dropped_bytes += len(data)
            return False
        if not data:
            return True
        if self._buf:
            if len(self._buf) + len(data) > self._limit:
                self.dropped_bytes += len(data)
                return False
            self._buf += data
        else:
            written = self._write_some(data)
            if written < 0:
                return False
            if written == len(data):
                return True
            rest = memoryview(data)[written:]
            if len(rest) > self._limit:
                self.dropped_bytes += len(rest)
                return False
            self._buf += rest
            self._wait_writable()
        if not self._congested and len(self._buf) > self._high:
            self._congested = True
            if self._on_pause is not None:
                self._on_pause()
        return True

    def close(self) -> None:
        """Try once more to write what is pending (without blocking), then close the fd."""
        if self._closed:
            return
        if self._buf and self._failed is None:
            written = self._write_some(bytes(self._buf))
            if written > 0:
                del self._buf[:written]
        if self._buf:
            log.warning("%s: closed with %d bytes unwritten (its reader did not keep up); "
                        "they are dropped", self.name, len(self._buf))
        self._closed = True
        self._stop_waiting()
        self._buf.clear()
        if self._owns_fd:
            try:
                os.close(self.fd)
            except OSError:
                pass

    def _write_some(self, data: bytes | bytearray | memoryview) -> int:
        """Write as much as the fd takes now; -1 after a fatal error."""
        total = 0
        error: OSError | None = None
        with memoryview(data) as view:  # released before _fail resizes the buffer
            while total < len(view):
                try:
                    n = os.write(self.fd, view[total:])
                except InterruptedError:
                    continue
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EAGAIN:
                        error = exc
                    break
                if n == 0:
                    break
                total += n
        if error is not None:
            self._fail(error)
            return -1
        return total

    def _fail(self, exc: OSError) -> None:
        self._failed = exc
        self.dropped_bytes += len(self._buf)
        self._buf.clear()
        self._stop_waiting()
        log.warning("%s: write failed (%s); further output is dropped", self.name, exc)
        if self._congested:
            # Nothing will ever drain: do not keep producers paused forever.
            self._congested = False
            if self._on_resume is not None:
                self._on_resume()
        if self._on_error is not None:
            self._on_error(exc)

    def _wait_writable(self) -> None:
        if self._waiting or self._closed:
            return
        self._waiting = True
        if isinstance(self._loop, WriterLoop):
            self._loop.add_writer(self.fd, self._on_writable)
        else:
            # The loop cannot watch for writability: retry soon, backing off while blocked.
            self._timer = self._loop.call_later(self._retry, self._on_writable)
            self._retry = min(_RETRY_MAX, self._retry * 2)

    def _stop_waiting(self) -> None:
        if not self._waiting:
            return
        self._waiting = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        elif isinstance(self._loop, WriterLoop):
            self._loop.remove_writer(self.fd)

    def _on_writable(self) -> None:
        self._timer = None
        if self._closed or self._failed is not None:
            return
        written = self._write_some(self._buf)
        if written < 0:
            return
        if written:
            del self._buf[:written]
            self._retry = _RETRY_FIRST
        if self._buf:
            if not isinstance(self._loop, WriterLoop):
                self._waiting = False
                self._wait_writable()
        else:
            self._stop_waiting()
        if self._congested and len(self._buf) <= self._low:
            self._congested = False
            if self._on_resume is not None:
                self._on_resume()
