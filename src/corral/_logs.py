"""Log capture without threads: worker pipes read on the event loop, fanned out to sinks.

Data flow (everything on the loop thread)::

    child stdout/stderr pipe --PipeReader--> LineSplitter --> LogHub --+--> ring per worker
                                                                      +--> sinks (console,
                                                                      |    JSON lines, files)
                                                                      +--> followers (logs -f)

Memory is bounded everywhere. A reader holds at most one partial line (64 KiB) and one read,
which it hands on in batches of about :data:`BATCH_BYTES` (each line counted with what its
prefix or JSON keys add): 64 KiB of empty lines formats to megabytes, so a reader paused in
the middle of a read keeps the rest and reads no more until it is resumed. A sink writes
through a bounded :class:`~corral._outbuf.OutBuffer`; when one is congested (its
consumer, e.g. a slow terminal or a full pipe behind ``/dev/stdout``, does not keep up) the hub
stops reading the pipes that feed that sink, so the children block in ``write()``: the kernel
pipe is the backpressure, and no line is lost. Rings are bounded by lines and bytes. Followers
(``corral logs -f``) never slow the workers down: each has a bounded queue and, past it, loses
lines and is told how many.

A line longer than :data:`MAX_LINE` is cut into pieces of at most that size, never inside a
UTF-8 character (a piece may be up to 3 bytes shorter); each piece but the last has
``more=True`` and each but the first has ``cont=True``. Nothing is dropped silently.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import sys
import termios
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring as _encode_str
from typing import NamedTuple, Protocol

from corral._json import LOG_SCHEMA
from corral._loop import Loop, TimerHandle
from corral._outbuf import OutBuffer, open_output

__all__ = [
    "LOG_SCHEMA",
    "MAX_LINE",
    "ConsoleSink",
    "FileSink",
    "JsonLinesSink",
    "LineSplitter",
    "LogHub",
    "LogRecord",
    "Piece",
    "PipeReader",
    "Ring",
    "Sink",
    "record_to_json",
]

log = logging.getLogger(__name__)

MAX_LINE = 64 * 1024
READ_SIZE = 64 * 1024
# One read is handed to the hub in batches of about this many bytes, a piece counting its
# text plus _PIECE_COST (its prefix or JSON keys once formatted): 64 KiB of empty lines would
# otherwise format to megabytes at once. Between batches the reader checks whether a sink
# became congested and, if so, keeps the rest until it has drained (backpressure, no loss).
BATCH_BYTES = 64 * 1024
_PIECE_COST = 128


class Piece(NamedTuple):
    """A line (without its newline), or a piece of an over-long one."""

    text: bytes
    more: bool = False  # the line goes on in the next piece
    cont: bool = False  # this piece continues the previous one


class LineSplitter:
    """Bytes in, complete lines out (see the module docstring for over-long lines)."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        if max_line < 1:
            raise ValueError(f"max_line must be >= 1, got {max_line!r}")
        self.max_line = max_line
        self._buf = b""
        self._cont = False

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Piece]:
        if self._buf:
            data = self._buf + data
        parts = data.split(b"\n")
        tail = parts.pop()
        out: list[Piece] = []
        limit = self.max_line
        for part in parts:
            if len(part) <= limit and not self._cont:
                out.append(Piece(part))
            else:
                self._cut(part, out, last=True)
        if len(tail) > limit:
            tail = self._cut(tail, out, last=False)
        self._buf = tail
        return out

    def flush(self) -> list[Piece]:
        """At EOF: the partial last line, if any."""
        out: list[Piece] = []
        if self._buf or self._cont:
            self._cut(self._buf, out, last=True)
        self._buf = b""
        return out

    def _cut(self, text: bytes, out: list[Piece], *, last: bool) -> bytes:
        """Emit ``text`` in pieces; when not ``last``, keep (return) a short remainder."""
        limit = self.max_line
        while len(text) > limit:
            cut = _char_boundary(text, limit)
            out.append(Piece(text[:cut], True, self._cont))
            self._cont = True
            text = text[cut:]
        if not last:
            return text
        out.append(Piece(text, False, self._cont))
        self._cont = False
        return b""


def _char_boundary(text: bytes, limit: int) -> int:
    """Where to cut ``text`` (longer than ``limit``) so as not to split a UTF-8 character.

    ``limit``, moved back to the start of the character that straddles it (3 bytes at most,
    never to 0); bytes that are not UTF-8 there are cut at ``limit``. Each piece is decoded on
    its own (JSON logs), so a split character would become two U+FFFD.
    """
    cut = limit
    while cut > 1 and limit - cut < 3 and text[cut] & 0xC0 == 0x80:
        cut -= 1
    if cut == limit:
        return limit
    lead = text[cut]
    size = 2 if 0xC0 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else 4 if 0xF0 <= lead < 0xF8 \
        else 0
    return cut if cut + size > limit else limit


class PipeReader:
    """Non-blocking reads of one pipe on readiness; lines go to ``on_lines`` in batches.

    Args:
        fd: the read end of the pipe (made non-blocking; closed at EOF or :meth:`close`).
        loop: the event loop.
        on_lines: called with every batch of pieces read.
        on_eof: called once when the pipe hits EOF (after the last partial line).
        read_size: bytes per read, one read per readiness (fair between pipes).
        max_line: longest piece.
    """

    def __init__(self, fd: int, loop: Loop, on_lines: Callable[[list[Piece]], None],
                 on_eof: Callable[[], None] | None = None, *, read_size: int = READ_SIZE,
                 max_line: int = MAX_LINE) -> None:
        self.fd = fd
        self._loop = loop
        self._on_lines = on_lines
        self._on_eof = on_eof
        self._read_size = read_size
        self._splitter = LineSplitter(max_line)
        self._paused = False
        self._closed = False
        self._watching = False
        self._held: list[Piece] = []  # pieces read but not delivered yet (paused mid-read)
        self._eof = False  # EOF seen; close once the held pieces are delivered
        self._release_timer: TimerHandle | None = None
        os.set_blocking(fd, False)
        self._watch()

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def closed(self) -> bool:
        return self._closed

    def pause(self) -> None:
        """Stop reading: the pipe fills and the writer blocks."""
        if not self._paused:
            self._paused = True
            self._unwatch()

    def resume(self) -> None:
        if self._paused:
            self._paused = False
            if self._held or self._eof:
                # The rest of a read comes first, on the next round (not inside the
                # callback that resumed us).
                if self._release_timer is None:
                    self._release_timer = self._loop.call_later(0.0, self._release)
            else:
                self._watch()

    def waiting(self) -> int:
        """Bytes in the pipe not read yet (0 once closed)."""
        if self._closed:
            return 0
        try:
            buf = fcntl.ioctl(self.fd, termios.FIONREAD, b"\0\0\0\0")
        except OSError:
            return 0
        return int.from_bytes(buf, sys.byteorder)

    @property
    def held(self) -> int:
        """Pieces read but not delivered yet (the reader was paused in the middle of a read)."""
        return len(self._held)

    def close(self) -> None:
        """Stop and close the fd (without a final flush: use it to abandon the pipe)."""
        if self._closed:
            return
        self._closed = True
        self._unwatch()
        if self._release_timer is not None:
            self._release_timer.cancel()
            self._release_timer = None
        self._held = []
        os.close(self.fd)

    def _deliver(self, pieces: list[Piece]) -> None:
        """Hand ``pieces`` to ``on_lines`` in batches; stop (and hold the rest) once paused."""
        start, count = 0, len(pieces)
        while start < count:
            end, cost = start, 0
            while end < count and cost < BATCH_BYTES:
                cost += len(pieces[end].text) + _PIECE_COST
                end += 1
            self._on_lines(pieces if start == 0 and end == count else pieces[start:end])
            start = end
            if self._closed:
                return
            if self._paused and start < count:
                self._held = pieces[start:]
                return

    def _release(self) -> None:
        """Resumed with held pieces: deliver them, then read on (or finish the EOF)."""
        self._release_timer = None
        if self._closed or self._paused:
            return
        held, self._held = self._held, []
        self._deliver(held)
        if self._closed or self._held:
            return
        if self._eof:
            self._finish()
        elif not self._paused:
            self._watch()

    def _finish(self) -> None:
        self.close()
        if self._on_eof is not None:
            self._on_eof()

    def _watch(self) -> None:
        if not self._watching and not self._closed and not self._paused:
            self._watching = True
            self._loop.add_reader(self.fd, self._on_readable)

    def _unwatch(self) -> None:
        if self._watching:
            self._watching = False
            self._loop.remove_reader(self.fd)

    def _on_readable(self) -> None:
        if self._closed or self._paused or self._held:
            return
        try:
            data = os.read(self.fd, self._read_size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno != errno.EIO:  # EIO: a pty whose other side closed, i.e. EOF
                log.warning("log pipe fd %d: read failed (%s); treating it as closed",
                            self.fd, exc)
            data = b""
        if data:
            pieces = self._splitter.feed(data)
            if pieces:
                self._deliver(pieces)
            return
        self._eof = True
        self._unwatch()
        pieces = self._splitter.flush()
        if pieces:
            self._deliver(pieces)
        if not self._held and not self._closed:
            self._finish()


@dataclass(slots=True)
class LogRecord:
    """One piece of output, with where it came from (treat it as immutable)."""

    ts: float  # time.time() when it was read
    program: str
    index: int
    pid: int | None
    stream: str  # "stdout" | "stderr"
    text: bytes
    more: bool = False
    cont: bool = False

    @property
    def label(self) -> str:
        return f"{self.program}.{self.index}"


def record_to_json(rec: LogRecord) -> dict[str, object]:
    """The JSON form of a record (docs/json-schema.md, ``corral.log/1``)."""
    out: dict[str, object] = {
        "schema": LOG_SCHEMA, "ts": round(rec.ts, 6), "program": rec.program,
        "index": rec.index, "pid": rec.pid,
        "stream": rec.stream, "line": rec.text.decode("utf-8", "replace"),
    }
    if rec.more or rec.cont:
        out["more"] = rec.more
        out["cont"] = rec.cont
    return out


_JSON_HEAD = '{"schema": "' + LOG_SCHEMA + '", "ts": '


def _json_lines(records: Sequence[LogRecord]) -> bytes:
    """``record_to_json`` of each record as JSON lines, built by hand: 3x faster than dumps."""
    parts: list[str] = []
    add = parts.append
    for rec in records:
        add(_JSON_HEAD)
        add(repr(round(rec.ts, 6)))
        add(', "program": ')
        add(_encode_str(rec.program))
        add(f', "index": {rec.index}, "pid": {"null" if rec.pid is None else rec.pid}, '
            f'"stream": "{rec.stream}", "line": ')
        add(_encode_str(rec.text.decode("utf-8", "replace")))
        if rec.more or rec.cont:
            add(f', "more": {"true" if rec.more else "false"}, '
                f'"cont": {"true" if rec.cont else "false"}')
        add("}\n")
    return "".join(parts).encode()


class Sink(Protocol):
    """Where records go. ``programs`` None means every program."""

    programs: frozenset[str] | None

    def emit(self, records: Sequence[LogRecord]) -> None: ...

    def bind(self, on_congestion: Callable[[Sink, bool], None]) -> None:
        """The hub's callback: ``on_congestion(self, True)`` when the sink falls behind."""

    def close(self) -> None: ...


DROP_WARN_INTERVAL = 10.0


class _Drops:
    """Output a sink's buffer refused (past its hard limit): counted, and said at most once per
    :data:`DROP_WARN_INTERVAL` seconds with the workers it came from (and once more at close).

    Readers hand the hub batches small enough that this should not happen (module docstring):
    it is the last resort that keeps memory bounded, never silent.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.bytes = 0  # in total
        self.lines = 0
        self._bytes = 0  # since the last warning
        self._lines = 0
        self._labels: dict[str, None] = {}
        self._next = 0.0

    def add(self, nbytes: int, records: Sequence[LogRecord]) -> None:
        self.bytes += nbytes
        self.lines += len(records)
        self._bytes += nbytes
        self._lines += len(records)
        for rec in records:
            if len(self._labels) >= 8:
                break
            self._labels[rec.label] = None
        now = time.monotonic()
        if now >= self._next:
            self._next = now + DROP_WARN_INTERVAL
            self.say()

    def say(self) -> None:
        if not self._lines:
            return
        log.warning("%s: %d line(s) (%d bytes) of %s dropped: more than its buffer holds "
                    "(%d bytes dropped in all)", self.name, self._lines, self._bytes,
                    ", ".join(self._labels), self.bytes)
        self._bytes = self._lines = 0
        self._labels.clear()


def _put(out: OutBuffer, data: bytes, records: Sequence[LogRecord], drops: _Drops) -> None:
    """``out.write(data)``; a refusal for want of room (not a dead fd: that is said once by
    the buffer) is counted and said."""
    if not out.write(data) and out.failed is None and not out.closed:
        drops.add(len(data), records)


class _OutSink:
    """A sink that writes formatted bytes through an OutBuffer."""

    programs: frozenset[str] | None = None

    def __init__(self, fd: int, loop: Loop, name: str, *, owns_fd: bool = True) -> None:
        self._listener: Callable[[Sink, bool], None] | None = None
        self.out = OutBuffer(fd, loop, on_pause=self._paused, on_resume=self._resumed,
                             owns_fd=owns_fd, name=name)
        self.drops = _Drops(name)

    def bind(self, on_congestion: Callable[[Sink, bool], None]) -> None:
        self._listener = on_congestion

    def emit(self, records: Sequence[LogRecord]) -> None:
        raise NotImplementedError

    def _paused(self) -> None:
        if self._listener is not None:
            self._listener(self, True)

    def _resumed(self) -> None:
        if self._listener is not None:
            self._listener(self, False)

    @property
    def pending(self) -> int:
        """Bytes accepted but not written yet."""
        return 0 if self.out.failed is not None else self.out.pending

    def close(self) -> None:
        self.drops.say()
        self.out.close()


_COLOURS = (36, 33, 32, 35, 34, 96, 93, 92, 95, 94)  # ANSI foreground codes
_RED = 31


class ConsoleSink(_OutSink):
    """``web.1 |  text`` for stdout and ``web.1 |! text`` for stderr, labels padded.

    Args:
        fd: where to write (default: this process's stdout; it gets its own file description).
        loop: the event loop.
        color: ANSI colours; None = only when ``fd`` is a TTY and ``NO_COLOR`` is unset.
        timestamps: prefix each line with the local time (HH:MM:SS.mmm).
        label_width: minimum width of the ``name.N`` column (it grows to the longest seen).
    """

    def __init__(self, loop: Loop, fd: int | None = None, *, color: bool | None = None,
                 timestamps: bool = False, label_width: int = 0) -> None:
        src = sys.stdout.fileno() if fd is None else fd
        if color is None:
            color = os.isatty(src) and not os.environ.get("NO_COLOR")
        own, _regular = open_output(src)
        super().__init__(own, loop, "console log sink")
        self.color = color
        self.timestamps = timestamps
        self._width = label_width
        self._heads: dict[tuple[str, int, str, bool], bytes] = {}
        self._clock_cache: list[object] = []

    def _head(self, rec: LogRecord) -> bytes:
        """``label |`` plus the stream mark, cached per source (the width only grows)."""
        key = (rec.program, rec.index, rec.stream, rec.cont)
        head = self._heads.get(key)
        if head is not None:
            return head
        label = rec.label
        if len(label) > self._width:
            self._width = len(label)
            self._heads.clear()
        mark = "!" if rec.stream == "stderr" else " "
        cont = "+" if rec.cont else ""
        text = f"{label:<{self._width}} |"
        if self.color:
            colour = _COLOURS[zlib.crc32(rec.program.encode()) % len(_COLOURS)]
            if rec.stream == "stderr":
                text = f"\x1b[{colour}m{text}\x1b[{_RED}m!{cont}\x1b[0m "
            else:
                text = f"\x1b[{colour}m{text}{mark}{cont}\x1b[0m "
        else:
            text = f"{text}{mark}{cont} "
        head = self._heads[key] = text.encode()
        return head

    def format(self, rec: LogRecord) -> bytes:
        stamp = self._stamp(rec.ts) if self.timestamps else b""
        return stamp + self._head(rec) + rec.text + (b"\\\n" if rec.more else b"\n")

    def emit(self, records: Sequence[LogRecord]) -> None:
        parts: list[bytes] = []
        add = parts.append
        head_of = self._head
        last_ts = -1.0
        stamp = b""
        for rec in records:
            if self.timestamps and rec.ts != last_ts:
                last_ts = rec.ts
                stamp = self._stamp(rec.ts)
            add(stamp)
            add(head_of(rec))
            add(rec.text)
            add(b"\\\n" if rec.more else b"\n")
        _put(self.out, b"".join(parts), records, self.drops)

    def _stamp(self, ts: float) -> bytes:
        return _local_clock(ts, self._clock_cache, date=False) + b" "


def _local_clock(ts: float, cache: list[object], *, date: bool) -> bytes:
    """``[YYYY-MM-DD ]HH:MM:SS.mmm`` in local time; ``cache`` keeps the last second's text."""
    sec = int(ts)
    if cache and cache[0] == sec:
        prefix = cache[1]
        assert isinstance(prefix, str)
    else:
        t = time.localtime(sec)
        prefix = (f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d} " if date else "") + (
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}")
        cache[:] = [sec, prefix]
    return f"{prefix}.{int((ts - sec) * 1000):03d}".encode()


class JsonLinesSink(_OutSink):
    """One JSON object per line (docs/json-schema.md, "log line")."""

    def __init__(self, loop: Loop, fd: int | None = None) -> None:
        src = sys.stdout.fileno() if fd is None else fd
        own, _regular = open_output(src)
        super().__init__(own, loop, "JSON log sink")

    def emit(self, records: Sequence[LogRecord]) -> None:
        _put(self.out, _json_lines(records), records, self.drops)


class FileSink:
    """A file per program, rotated by size; never seeks, never rotates a non-regular file.

    The file is opened with O_APPEND and its size taken from ``fstat``, so there is no seek
    (``/dev/stdout`` and pipes work: supervisord #1078). It is rotated only when both the path
    (``lstat``, so not a symlink such as ``/dev/stdout``) and the open fd are the same regular
    file: ``path`` -> ``path.1`` -> ... -> ``path.<backups>`` (``backups=0`` truncates). Anything
    else (a FIFO, a character device, a symlink to one) is written through a non-blocking
    OutBuffer and never rotated.

    Args:
        path: the file.
        loop: the event loop (for non-regular outputs).
        max_bytes: rotate when a write would take the file past this (0: never).
        backups: how many rotated files to keep.
        json: write JSON lines instead of plain lines.
        programs: which programs' records it takes (None: all).
    """

    def __init__(self, path: str, loop: Loop, *, max_bytes: int = 10 * 1024 * 1024,
                 backups: int = 5, json: bool = False,
                 programs: Iterable[str] | None = None) -> None:
        if max_bytes < 0 or backups < 0:
            raise ValueError(f"max_bytes and backups must be >= 0, got {max_bytes}, {backups}")
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.json = json
        self.programs = None if programs is None else frozenset(programs)
        self._loop = loop
        self._listener: Callable[[Sink, bool], None] | None = None
        self._fd = -1
        self._size = 0
        self._rotatable = False
        self._out: OutBuffer | None = None
        self._clock_cache: list[object] = []
        self._drops = _Drops(f"log file {path}")
        self._failing: str | None = None  # why writes fail, while they do
        self._dropped_lines = 0  # since they began to
        self._dropped_bytes = 0
        self._broken_line = False
        self._open()

    @property
    def rotatable(self) -> bool:
        return self._rotatable

    @property
    def pending(self) -> int:
        """Bytes accepted but not written yet (a FIFO or a terminal behind the path)."""
        out = self._out
        return 0 if out is None or out.failed is not None else out.pending

    def bind(self, on_congestion: Callable[[Sink, bool], None]) -> None:
        self._listener = on_congestion

    def _open(self, truncate: bool = False) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK
        if truncate:
            flags |= os.O_TRUNC
        fd = os.open(self.path, flags, 0o644)
        st = os.fstat(fd)
        try:
            lst = os.lstat(self.path)
        except OSError:
            lst = None
        self._rotatable = (stat.S_ISREG(st.st_mode) and lst is not None
                           and stat.S_ISREG(lst.st_mode)
                           and (lst.st_dev, lst.st_ino) == (st.st_dev, st.st_ino))
        if stat.S_ISREG(st.st_mode):
            os.set_blocking(fd, True)
            self._fd = fd
            self._size = st.st_size
            self._out = None
        else:
            self._fd = fd
            self._out = OutBuffer(fd, self._loop, on_pause=lambda: self._congested(True),
                                  on_resume=lambda: self._congested(False),
                                  name=f"log file {self.path}")

    def _congested(self, on: bool) -> None:
        if self._listener is not None:
            self._listener(self, on)

    def _format(self, rec: LogRecord) -> bytes:
        if self.json:
            return _json_lines((rec,))
        mark = "!" if rec.stream == "stderr" else " "
        head = f" {rec.label} |{mark}{'+' if rec.cont else ''} ".encode()
        return (_local_clock(rec.ts, self._clock_cache, date=True) + head + rec.text
                + (b"\\\n" if rec.more else b"\n"))

    def emit(self, records: Sequence[LogRecord]) -> None:
        if self._out is not None:
            _put(self._out, b"".join([self._format(r) for r in records]), records, self._drops)
            return
        if self._fd < 0:
            return
        chunk: list[bytes] = []
        size = 0
        for rec in records:
            data = self._format(rec)
            if (self._rotatable and self.max_bytes
                    and self._size + size + len(data) > self.max_bytes
                    and self._size + size > 0):
                self._write(b"".join(chunk))
                chunk, size = [], 0
                self._rotate()
            chunk.append(data)
            size += len(data)
        self._write(b"".join(chunk))

    def _write(self, data: bytes) -> None:
        """Append ``data`` (whole lines): each line is written whole or not at all.

        A write that fails (ENOSPC, EFBIG...) after writing part of ``data`` is cut back to
        its last whole line (``ftruncate``), and the rest is dropped: said once when the file
        stops taking lines, and once when it takes them again, with what was dropped.
        """
        if not data or self._fd < 0:
            return
        if self._broken_line:  # a cut-off line could not be taken back: end it first
            data = b"\n" + data
        done = 0
        error: OSError | None = None
        with memoryview(data) as view:
            while done < len(data):
                try:
                    n = os.write(self._fd, view[done:])
                except InterruptedError:
                    continue
                except OSError as exc:
                    error = exc
                    break
                if n <= 0:
                    error = OSError(errno.ENOSPC, "short write")
                    break
                done += n
        if error is None:
            self._size += done
            self._broken_line = False
            if self._failing is not None:
                log.warning("log file %s: written again; %d line(s) (%d bytes) were dropped "
                            "while it could not be written (%s)", self.path,
                            self._dropped_lines, self._dropped_bytes, self._failing)
                self._failing = None
                self._dropped_lines = self._dropped_bytes = 0
            return
        whole = data.rfind(b"\n", 0, done) + 1
        if whole < done:
            try:
                os.ftruncate(self._fd, os.fstat(self._fd).st_size - (done - whole))
            except OSError:
                whole = done
        self._broken_line = whole > 0 and data[whole - 1:whole] != b"\n"
        self._size += whole
        lost = memoryview(data)[whole:]
        self._dropped_bytes += len(lost)
        self._dropped_lines += bytes(lost).count(b"\n")
        if self._failing is None:
            self._failing = error.strerror or str(error)
            log.warning("log file %s: write failed (%s); its lines are dropped until it can "
                        "be written again (disk full?), which will be said", self.path, error)

    def _rotate(self) -> None:
        os.close(self._fd)
        self._fd = -1
        try:
            if self.backups:
                for i in range(self.backups - 1, 0, -1):
                    src = f"{self.path}.{i}"
                    if os.path.lexists(src):
                        os.replace(src, f"{self.path}.{i + 1}")
                os.replace(self.path, f"{self.path}.1")
            self._open(truncate=not self.backups)
        except OSError as exc:
            log.warning("log file %s: rotation failed (%s); appending to it", self.path, exc)
            self._open()

    def close(self) -> None:
        self._drops.say()
        if self._failing is not None:
            log.warning("log file %s: closed while it could not be written (%s); %d line(s) "
                        "(%d bytes) were dropped", self.path, self._failing,
                        self._dropped_lines, self._dropped_bytes)
            self._failing = None
        if self._out is not None:
            self._out.close()
            self._out = None
        elif self._fd >= 0:
            os.close(self._fd)
        self._fd = -1


class Ring:
    """The last lines of one worker, bounded by count and bytes."""

    def __init__(self, max_lines: int = 1000, max_bytes: int = 1024 * 1024) -> None:
        if max_lines < 1 or max_bytes < 1:
            raise ValueError(f"Ring needs max_lines, max_bytes >= 1, got {max_lines}, "
                             f"{max_bytes}")
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self._lines: deque[LogRecord] = deque()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._lines)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def extend(self, records: Iterable[LogRecord]) -> None:
        lines = self._lines
        for rec in records:
            lines.append(rec)
            self._bytes += len(rec.text)
        while lines and (len(lines) > self.max_lines or self._bytes > self.max_bytes):
            self._bytes -= len(lines.popleft().text)

    def tail(self, n: int | None = None) -> list[LogRecord]:
        if n is None or n >= len(self._lines):
            return list(self._lines)
        if n <= 0:
            return []
        return list(self._lines)[-n:]


Follower = Callable[[Sequence[LogRecord], int], None]


class _Follow:
    """One ``logs -f`` subscriber: delivered on the loop thread, lossy past its bound."""

    def __init__(self, callback: Follower, programs: frozenset[str] | None, max_pending: int,
                 loop: Loop) -> None:
        self.callback = callback
        self.programs = programs
        self.max_pending = max_pending
        self.loop = loop
        self.pending: list[LogRecord] = []
        self.dropped = 0
        self.scheduled = False
        self.closed = False

    def offer(self, records: Sequence[LogRecord]) -> None:
        take = (records if self.programs is None
                else [r for r in records if r.program in self.programs])
        room = self.max_pending - len(self.pending)
        if len(take) > room:
            self.dropped += len(take) - max(room, 0)
            take = take[:max(room, 0)]
        if take:
            self.pending.extend(take)
        if not self.scheduled and (self.pending or self.dropped):
            self.scheduled = True
            self.loop.call_later(0.0, self.deliver)

    def deliver(self) -> None:
        self.scheduled = False
        if self.closed:
            return
        batch, dropped = self.pending, self.dropped
        self.pending, self.dropped = [], 0
        self.callback(batch, dropped)


class LogHub:
    """Readers in, sinks/rings/followers out, with flow control (module docstring).

    Args:
        loop: the event loop.
        sinks: where every record goes.
        ring_lines, ring_bytes: the bound of each worker's ring.
    """

    def __init__(self, loop: Loop, sinks: Iterable[Sink] = (), *, ring_lines: int = 1000,
                 ring_bytes: int = 1024 * 1024) -> None:
        self._loop = loop
        self._sinks: list[Sink] = []
        self._congested: set[int] = set()  # id() of congested sinks
        self._readers: dict[int, tuple[PipeReader, str]] = {}
        self._labels: dict[int, str] = {}  # fd -> "web.0 stdout", for messages
        self._rings: dict[tuple[str, int], Ring] = {}
        self._ring_lines = ring_lines
        self._ring_bytes = ring_bytes
        self._follows: list[_Follow] = []
        self.lines = 0
        for sink in sinks:
            self.add_sink(sink)

    def add_sink(self, sink: Sink) -> None:
        sink.bind(self._on_congestion)
        self._sinks.append(sink)

    def remove_sink(self, sink: Sink) -> None:
        self._sinks.remove(sink)
        self._congested.discard(id(sink))
        self._apply_flow()

    def attach(self, fd: int, program: str, index: int, pid: int | None, stream: str,
               on_eof: Callable[[], None] | None = None) -> PipeReader:
        """Read ``fd`` (a worker's stdout or stderr pipe) until EOF; the hub closes it."""
        if stream not in ("stdout", "stderr"):
            raise ValueError(f"stream must be 'stdout' or 'stderr', got {stream!r}")
        ring = self._rings.get((program, index))
        if ring is None:
            ring = self._rings[(program, index)] = Ring(self._ring_lines, self._ring_bytes)
        emit = self._emit

        def on_lines(pieces: list[Piece]) -> None:
            ts = time.time()
            records = [LogRecord(ts, program, index, pid, stream, p.text, p.more, p.cont)
                       for p in pieces]
            ring.extend(records)
            emit(records)

        def eof() -> None:
            self._readers.pop(fd, None)
            self._labels.pop(fd, None)
            if on_eof is not None:
                on_eof()

        reader = PipeReader(fd, self._loop, on_lines, eof)
        self._readers[fd] = (reader, program)
        self._labels[fd] = f"{program}.{index} {stream}"
        if self._blocked(program):
            reader.pause()
        return reader

    def _emit(self, records: Sequence[LogRecord]) -> None:
        self.lines += len(records)
        program = records[0].program
        for sink in self._sinks:
            if sink.programs is None or program in sink.programs:
                sink.emit(records)
        for follow in self._follows:
            follow.offer(records)

    def _blocked(self, program: str) -> bool:
        if not self._congested:
            return False
        return any(id(s) in self._congested and (s.programs is None or program in s.programs)
                   for s in self._sinks)

    def _on_congestion(self, sink: Sink, congested: bool) -> None:
        if congested:
            self._congested.add(id(sink))
        else:
            self._congested.discard(id(sink))
        self._apply_flow()

    def _apply_flow(self) -> None:
        for reader, program in list(self._readers.values()):
            if self._blocked(program):
                reader.pause()
            else:
                reader.resume()

    @property
    def paused_readers(self) -> int:
        return sum(1 for reader, _ in self._readers.values() if reader.paused)

    def ring(self, program: str, index: int) -> Ring | None:
        return self._rings.get((program, index))

    def tail(self, n: int | None = None, program: str | None = None,
             index: int | None = None) -> list[LogRecord]:
        """The last ``n`` records of the matching workers' rings, oldest first."""
        out: list[LogRecord] = []
        for (prog, idx), ring in self._rings.items():
            if (program is None or prog == program) and (index is None or idx == index):
                out.extend(ring.tail(n))
        out.sort(key=lambda r: r.ts)
        return out if n is None else out[-n:] if n > 0 else []

    def forget(self, program: str, index: int | None = None) -> None:
        """Drop rings of a removed program (or one scaled-down worker)."""
        for key in [k for k in self._rings if k[0] == program and index in (None, k[1])]:
            del self._rings[key]

    def follow(self, callback: Follower, programs: Iterable[str] | None = None, *,
               max_pending: int = 10_000) -> Callable[[], None]:
        """Call ``callback(records, dropped)`` with new records; returns the unsubscribe.

        A follower that is slower than the workers loses records past ``max_pending`` and is
        told how many in ``dropped``; it never slows the workers down.
        """
        follow = _Follow(callback, None if programs is None else frozenset(programs),
                         max_pending, self._loop)
        self._follows.append(follow)

        def unsubscribe() -> None:
            follow.closed = True
            if follow in self._follows:
                self._follows.remove(follow)

        return unsubscribe

    def unfinished(self) -> int:
        """Output not yet out: bytes in the sinks' buffers, pieces readers hold, bytes in the
        pipes of readers that have not hit EOF (a pipe kept open by a leftover process but
        empty counts for nothing)."""
        total = sum(getattr(sink, "pending", 0) for sink in self._sinks)
        for reader, _ in self._readers.values():
            total += reader.held + reader.waiting()
        return total

    def flush(self, run_once: Callable[[float], object], timeout: float) -> bool:
        """At shutdown, before :meth:`close`: go on reading the pipes and writing the sinks
        (``run_once(deadline)`` runs one round of the loop) until everything read or readable
        is out or ``timeout`` seconds have passed. Returns True if everything is out."""
        deadline = time.monotonic() + timeout
        while self.unfinished():
            if time.monotonic() >= deadline:
                return False
            run_once(min(deadline, time.monotonic() + 0.1))
        return True

    def close(self) -> None:
        """Close every reader and sink (rings stay readable); what is left is dropped and said
        (use :meth:`flush` first)."""
        unread = [(self._labels.get(fd, program), reader.held, reader.waiting())
                  for fd, (reader, program) in self._readers.items()]
        unread = [x for x in unread if x[1] or x[2]]
        if unread:
            log.warning("workers' output dropped at shutdown, not written in time: %s",
                        ", ".join(f"{label}: {held} line(s) read, {waiting} bytes unread"
                                  for label, held, waiting in unread))
        self._labels.clear()
        for reader, _ in list(self._readers.values()):
            reader.close()
        self._readers.clear()
        for sink in self._sinks:
            sink.close()
        for follow in self._follows:
            follow.closed = True
        self._follows.clear()
