"""The pool's wire protocol, without IO: frames, and the kinds of message a worker sends.

A frame is ``multiprocessing.Connection``'s, so the worker side can use ``send_bytes`` and
``recv_bytes`` as they are: a 4-byte big-endian signed length, then that many bytes; a length of
-1 is followed by an 8-byte unsigned length (frames of 2 GiB and more). Every message is one
pickled tuple whose first item is a :class:`WireKind`::

    pool -> worker:  pickle((fn, args, kwargs))     a task
                     b"" (an empty frame)           quit
    worker -> pool:  ("h",)                         ready for tasks (the initializer ran)
                     ("i", text, exc)               the initializer raised exc (None if exc
                                                    cannot be pickled); text is its traceback;
                                                    the worker exits next
                     ("r", value)                   the task's result
                     ("e", exc, text)               the task raised exc; text is its traceback
                                                    (also a BaseException such as SystemExit
                                                    raised while pickling the result)
                     ("u", text, tb, exc)           the task ended, but its result or exception
                                                    could not be pickled: exc is that error (None
                                                    if it cannot be pickled itself); tb may be ""
                     ("t", text, tb)                the task could not be unpickled here

The kinds travel as one-character strings (a :class:`WireKind` is a ``str``), which cost less
to pickle than an enum member.

:class:`FrameDecoder` turns the bytes read from a worker's socket into frames. A large frame
(over :data:`READ_SIZE`) is assembled in a buffer of its full size, which the reader fills
straight from the socket (:meth:`FrameDecoder.big_tail`), instead of growing a buffer chunk by
chunk.
"""

from __future__ import annotations

import enum
import struct

__all__ = ["QUIT", "READ_SIZE", "FrameDecoder", "WireKind", "encode", "header"]

HEADER = struct.Struct("!i")
BIG_HEADER = struct.Struct("!Q")
QUIT = HEADER.pack(0)  # an empty frame: the worker returns
READ_SIZE = 1 << 16  # bytes asked for by one read of a worker's socket
_MAX_SMALL = 0x7FFFFFFF

Frame = bytes | bytearray


class WireKind(enum.StrEnum):
    """The first item of every message from a worker."""

    HELLO = "h"  # ready for tasks
    INIT_FAILED = "i"  # the initializer raised; the worker exits next
    RESULT = "r"  # the task's result
    RAISED = "e"  # the task raised
    UNPICKLABLE = "u"  # the task's result or exception could not be pickled
    UNDECODABLE = "t"  # the task could not be unpickled in the worker


def header(size: int) -> bytes:
    """The header of a frame of ``size`` bytes."""
    if size <= _MAX_SMALL:
        return HEADER.pack(size)
    return HEADER.pack(-1) + BIG_HEADER.pack(size)


def encode(payload: bytes) -> bytes:
    """One whole frame (the pool writes header and payload apart, with ``writev``)."""
    return header(len(payload)) + payload


class FrameDecoder:
    """Bytes in (:meth:`feed`), frames out, for one worker's socket.

    ::

        decoder = FrameDecoder()
        decoder.feed(encode(b"abc") + encode(b"de")[:3])  # -> [b"abc"]
        decoder.feed(encode(b"de")[3:])                   # -> [b"de"]

    A frame over :data:`READ_SIZE` whose header has arrived is assembled in place: while
    :meth:`big_tail` returns a buffer, read into it and report the bytes with :meth:`big_filled`.
    """

    __slots__ = ("_big", "_big_got", "_buf")

    def __init__(self) -> None:
        self._buf = bytearray()  # the start of a frame that has not fully arrived
        self._big: bytearray | None = None  # a large frame being assembled in place
        self._big_got = 0  # bytes of it received

    def big_tail(self) -> memoryview | None:
        """Where the next bytes of a large frame go (read straight into it), or None."""
        big = self._big
        return None if big is None else memoryview(big)[self._big_got:]

    def big_filled(self, n: int) -> bytearray | None:
        """``n`` bytes were read into :meth:`big_tail`; returns the frame once it is whole."""
        big = self._big
        assert big is not None, "big_filled() without a large frame in progress"
        self._big_got += n
        if self._big_got < len(big):
            return None
        self._big = None
        return big

    def feed(self, chunk: bytes) -> list[Frame]:
        """The frames completed by ``chunk`` (read from the socket), in order."""
        frames: list[Frame] = []
        buf = self._buf
        data: bytes | bytearray
        if buf:
            buf += chunk
            data = buf
        else:
            data = chunk  # the usual case: whole frames in one read, nothing copied twice
        pos, end = 0, len(data)
        while end - pos >= 4:
            (size,) = HEADER.unpack_from(data, pos)
            start = pos + 4
            if size < 0:
                if end - pos < 12:
                    break
                (size,) = BIG_HEADER.unpack_from(data, start)
                start += 8
            if end - start >= size:
                frames.append(data[start:start + size])
                pos = start + size
                continue
            if size > READ_SIZE:
                # A large frame: the rest goes straight into a buffer of its full size.
                got = end - start
                big = bytearray(size)
                big[:got] = data[start:end]
                self._big, self._big_got = big, got
                pos = end
            break
        if data is buf:
            del buf[:pos]
        elif pos < end:
            buf += data[pos:]
        return frames

    @property
    def buffered(self) -> int:
        """Bytes held that are not a whole frame yet."""
        return len(self._buf) + (self._big_got if self._big is not None else 0)
