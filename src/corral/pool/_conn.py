"""The manager's IO on a worker's socket: read frames and send tasks, never blocking.

A reply is read with plain non-blocking reads and cut into frames by the sans-IO
:class:`~corral.pool._wire.FrameDecoder`. A task goes out in one ``writev`` to an (empty)
socket; what does not fit (a large task) is written by a short-lived sender thread on its own
copy of the fd, so the manager thread never waits for a worker to read.
"""

from __future__ import annotations

import enum
import os
import select
import threading

from corral.pool._wire import READ_SIZE, Frame, FrameDecoder
from corral.process import disown_fd, own_fd

__all__ = ["Sent", "read_frames", "send_frame"]


class Sent(enum.Enum):
    """How a task's frame went out."""

    WHOLE = "whole"  # in the socket
    SENDING = "sending"  # partly; a sender thread writes the rest
    GONE = "gone"  # the worker's end is closed: it never got the task


_WHOLE, _GONE = Sent.WHOLE, Sent.GONE


def read_frames(fd: int, decoder: FrameDecoder) -> tuple[list[Frame], bool]:
    """Every frame readable from ``fd`` now, and whether the worker closed its end (EOF)."""
    frames: list[Frame] = []
    while True:
        tail = decoder.big_tail()
        if tail is not None:
            try:
                n = os.readv(fd, [tail])
            except BlockingIOError:
                return frames, False
            except OSError:
                n = 0
            if n == 0:
                return frames, True
            frame = decoder.big_filled(n)
            if frame is not None:
                frames.append(frame)
            continue
        try:
            chunk = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return frames, False
        except OSError:
            chunk = b""
        if not chunk:
            return frames, True
        got = decoder.feed(chunk)
        if frames:
            frames += got
        else:
            frames = got
        if len(chunk) < READ_SIZE and decoder.big_tail() is None:
            return frames, False  # drained: spare the syscall that would say so


def send_frame(fd: int, header: bytes, payload: bytes) -> Sent | BaseException:
    """Write one frame to ``fd`` (non-blocking); a sender thread writes what does not fit.

    Returns:
        How it went: :attr:`Sent.WHOLE`, :attr:`Sent.SENDING` or :attr:`Sent.GONE`; or, if it
        went out in part and no sender thread could be started, why (the frame is half sent).
    """
    try:
        n = os.writev(fd, [header, payload])
    except BlockingIOError:
        n = 0
    except OSError:
        return _GONE
    if n == len(header) + len(payload):
        return _WHOLE
    # The sender writes to its own copy of the fd, which it closes itself; the worker's death
    # ends the write with EPIPE.
    rest = ([memoryview(header)[n:], memoryview(payload)] if n < len(header)
            else [memoryview(payload)[n - len(header):]])
    own = own_fd(os.dup(fd))  # a fork-started sibling must not hold it
    try:
        threading.Thread(target=_send_rest, args=(own, rest), name="corral-pool-sender",
                         daemon=True).start()
    except BaseException as exc:  # no thread (limits, interpreter exit)
        disown_fd(own)
        os.close(own)
        return exc
    return Sent.SENDING


def _send_rest(fd: int, bufs: list[memoryview]) -> None:
    try:
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        while bufs:
            poller.poll()
            try:
                n = os.writev(fd, bufs)
            except BlockingIOError:
                continue
            except OSError:
                return  # the worker died: the manager sees its exit
            while n and bufs:
                if n >= len(bufs[0]):
                    n -= len(bufs[0])
                    bufs.pop(0)
                else:
                    bufs[0] = bufs[0][n:]
                    n = 0
    finally:
        disown_fd(fd)
        os.close(fd)
