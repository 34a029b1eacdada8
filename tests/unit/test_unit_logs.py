"""Log capture: LineSplitter, PipeReader, OutBuffer, sinks, rings, flow control.

Real pipes and real child processes; the loop is tests/selector_loop.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from corral._logs import (
    MAX_LINE,
    ConsoleSink,
    FileSink,
    JsonLinesSink,
    LineSplitter,
    LogHub,
    LogRecord,
    Piece,
    PipeReader,
    Ring,
)
from corral._outbuf import OutBuffer, open_output

pytestmark = pytest.mark.timeout(60)

TESTS = Path(__file__).resolve().parent.parent


# --- LineSplitter ------------------------------------------------------------------------------


def test_splitter_joins_across_feeds_and_keeps_empty_lines() -> None:
    s = LineSplitter()
    assert s.feed(b"hel") == []
    assert s.feed(b"lo\n\nwor") == [Piece(b"hello"), Piece(b"")]
    assert s.feed(b"ld\n") == [Piece(b"world")]
    assert s.flush() == []


def test_splitter_flushes_partial_last_line() -> None:
    s = LineSplitter()
    assert s.feed(b"a\nb") == [Piece(b"a")]
    assert s.flush() == [Piece(b"b")]
    assert s.flush() == []


def test_splitter_line_of_exactly_max_is_one_piece() -> None:
    s = LineSplitter(max_line=8)
    assert s.feed(b"x" * 8) == []
    assert s.feed(b"\n") == [Piece(b"x" * 8)]


def test_splitter_cuts_long_line_into_marked_pieces_nothing_lost() -> None:
    s = LineSplitter(max_line=4)
    out = s.feed(b"abcdefghij\nk\n")
    assert out == [Piece(b"abcd", True, False), Piece(b"efgh", True, True),
                   Piece(b"ij", False, True), Piece(b"k")]


def test_splitter_long_unterminated_line_is_bounded_and_flushed() -> None:
    s = LineSplitter(max_line=4)
    out = []
    for _ in range(5):
        out += s.feed(b"abc")
        assert s.buffered <= 4
    out += s.flush()
    assert b"".join(p.text for p in out) == b"abc" * 5
    assert [p.more for p in out] == [True] * (len(out) - 1) + [False]
    assert [p.cont for p in out] == [False] + [True] * (len(out) - 1)
    assert all(len(p.text) <= 4 for p in out)


def test_splitter_default_max_is_64k() -> None:
    s = LineSplitter()
    big = b"y" * (MAX_LINE * 2 + 10)
    out = s.feed(big + b"\n")
    assert [len(p.text) for p in out] == [MAX_LINE, MAX_LINE, 10]


def test_splitter_rejects_bad_max() -> None:
    with pytest.raises(ValueError, match="max_line"):
        LineSplitter(0)


# --- PipeReader -------------------------------------------------------------------------------


def test_pipe_reader_reads_lines_and_eof(loop) -> None:
    r, w = os.pipe()
    got: list[Piece] = []
    eof = []
    reader = PipeReader(r, loop, got.extend, lambda: eof.append(True))
    os.write(w, b"one\ntwo\nthr")
    loop.run_until(lambda: len(got) == 2, what="two lines")
    os.write(w, b"ee")
    os.close(w)
    loop.run_until(lambda: eof, what="eof")
    assert [p.text for p in got] == [b"one", b"two", b"three"]
    assert reader.closed
    assert r not in loop.watched_readers


def test_pipe_reader_pause_blocks_writer_and_resume_continues(loop) -> None:
    r, w = os.pipe()
    got: list[Piece] = []
    reader = PipeReader(r, loop, got.extend)
    reader.pause()
    assert r not in loop.watched_readers
    os.set_blocking(w, False)
    line = b"z" * 99 + b"\n"
    written = 0
    with pytest.raises(BlockingIOError):
        while True:  # the pipe fills: the writer would block
            written += os.write(w, line)
    loop.run_for(0.05)
    assert got == []
    reader.resume()
    loop.run_until(lambda: len(got) * 100 >= written - 99, what="drained")
    os.close(w)
    loop.run_until(lambda: reader.closed, what="eof")
    assert b"".join(p.text + b"\n" for p in got).startswith(line * (written // 100))


# --- OutBuffer --------------------------------------------------------------------------------


def test_open_output_pipe_gets_its_own_description() -> None:
    r, w = os.pipe()
    try:
        fd, regular = open_output(w)
        assert not regular
        assert not os.get_blocking(fd)
        assert os.get_blocking(w), "the original description must stay blocking"
        os.write(fd, b"hi")
        assert os.read(r, 2) == b"hi"
        os.close(fd)
    finally:
        os.close(r)
        os.close(w)


def test_open_output_regular_file_stays_blocking(tmp_path: Path) -> None:
    with open(tmp_path / "f", "wb") as f:
        fd, regular = open_output(f.fileno())
        assert regular and os.get_blocking(fd)
        os.close(fd)


def test_outbuffer_congestion_pause_resume_and_hard_limit(loop) -> None:
    r, w = os.pipe()
    os.set_blocking(w, False)
    events: list[str] = []
    out = OutBuffer(w, loop, high_water=64 * 1024, low_water=1024, limit=256 * 1024,
                    on_pause=lambda: events.append("pause"),
                    on_resume=lambda: events.append("resume"))
    chunk = b"a" * 16384
    accepted = 0
    while out.write(chunk):
        accepted += len(chunk)
        assert out.pending <= 256 * 1024
    assert events == ["pause"]
    assert out.congested and out.dropped_bytes == len(chunk)
    received = 0
    os.set_blocking(r, False)

    def drain() -> None:
        nonlocal received
        try:
            while True:
                data = os.read(r, 65536)
                if not data:
                    return
                received += len(data)
        except BlockingIOError:
            pass

    loop.add_reader(r, drain)
    loop.run_until(lambda: received == accepted, what="all accepted bytes")
    loop.remove_reader(r)
    assert events == ["pause", "resume"]
    assert out.pending == 0
    out.close()
    os.close(r)


def test_outbuffer_broken_pipe_reports_and_unblocks(loop) -> None:
    r, w = os.pipe()
    os.set_blocking(w, False)
    errors: list[OSError] = []
    events: list[str] = []
    out = OutBuffer(w, loop, high_water=1024, low_water=0, limit=1 << 20,
                    on_pause=lambda: events.append("pause"),
                    on_resume=lambda: events.append("resume"), on_error=errors.append)
    while not out.congested:
        out.write(b"b" * 70000)
    os.close(r)
    loop.run_until(lambda: errors, what="EPIPE")
    assert isinstance(errors[0], BrokenPipeError)
    assert events == ["pause", "resume"]
    assert out.write(b"more") is False
    out.close()


def test_outbuffer_rejects_bad_watermarks(loop) -> None:
    with pytest.raises(ValueError, match="low_water"):
        OutBuffer(1, loop, high_water=10, low_water=20, owns_fd=False)


# --- sinks --------------------------------------------------------------------------------------


def rec(text: bytes = b"hello", stream: str = "stdout", program: str = "web", index: int = 1,
        **kw: object) -> LogRecord:
    return LogRecord(1_700_000_000.25, program, index, 4242, stream, text, **kw)  # type: ignore[arg-type]


def read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    out = b""
    try:
        while chunk := os.read(fd, 65536):
            out += chunk
    except BlockingIOError:
        pass
    return out


def test_console_sink_prefix_padding_and_stderr_mark(loop) -> None:
    r, w = os.pipe()
    sink = ConsoleSink(loop, w, color=False, label_width=8)
    sink.emit([rec(), rec(b"oops", "stderr"), rec(b"x", program="worker", index=12)])
    sink.close()
    os.close(w)
    text = read_all(r).decode()
    os.close(r)
    assert text.splitlines() == [
        "web.1    |  hello",
        "web.1    |! oops",
        "worker.12 |  x",
    ]
    assert all(line.startswith(label) for line, label in
               zip(text.splitlines(), ["web.1 ", "web.1 ", "worker.12 |"], strict=True))


def test_console_sink_colours_only_when_asked_or_tty(loop) -> None:
    r, w = os.pipe()
    plain = ConsoleSink(loop, w)  # a pipe is not a TTY: no colours
    assert plain.color is False
    coloured = ConsoleSink(loop, w, color=True, timestamps=True)
    coloured.emit([rec(b"e", "stderr"), rec(b"a", more=True)])
    coloured.close()
    plain.close()
    os.close(w)
    text = read_all(r).decode()
    os.close(r)
    assert "\x1b[" in text and "\x1b[31m!" in text
    assert text.rstrip("\n").endswith("a\\"), "a piece that goes on is marked"


def test_json_lines_sink(loop) -> None:
    r, w = os.pipe()
    sink = JsonLinesSink(loop, w)
    sink.emit([rec(), rec(b"\xff bad utf8", "stderr", cont=True)])
    sink.close()
    os.close(w)
    lines = [json.loads(x) for x in read_all(r).splitlines()]
    os.close(r)
    assert lines[0] == {"schema": "corral.log/1", "ts": 1_700_000_000.25, "program": "web",
                        "index": 1, "pid": 4242, "stream": "stdout", "line": "hello"}
    assert lines[1]["line"] == "\ufffd bad utf8"
    assert lines[1]["cont"] is True and lines[1]["more"] is False


def test_file_sink_rotates_by_size_and_keeps_backups(loop, tmp_path: Path) -> None:
    path = tmp_path / "web.log"
    sink = FileSink(str(path), loop, max_bytes=1000, backups=2)
    assert sink.rotatable
    for i in range(100):
        sink.emit([rec(f"line {i:04d} ".encode() + b"x" * 30)])
    sink.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["web.log", "web.log.1", "web.log.2"]
    for p in tmp_path.iterdir():
        assert 0 < p.stat().st_size <= 1000
    assert path.read_text().splitlines()[-1].endswith("line 0099 " + "x" * 30)


def test_file_sink_backups_zero_truncates(loop, tmp_path: Path) -> None:
    path = tmp_path / "w.log"
    sink = FileSink(str(path), loop, max_bytes=200, backups=0, json=True)
    for i in range(50):
        sink.emit([rec(f"{i}".encode())])
    sink.close()
    assert [p.name for p in tmp_path.iterdir()] == ["w.log"]
    assert path.stat().st_size <= 200
    assert json.loads(path.read_text().splitlines()[-1])["line"] == "49"


def test_file_sink_never_rotates_a_symlink_or_fifo(loop, tmp_path: Path) -> None:
    # A symlink like /dev/stdout: written through, never renamed.
    link = tmp_path / "to-null"
    link.symlink_to("/dev/null")
    sink = FileSink(str(link), loop, max_bytes=10, backups=3)
    assert not sink.rotatable
    for _ in range(20):
        sink.emit([rec()])
    sink.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["to-null"]
    # A FIFO: no seek, no rotation, lines arrive in order.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    r = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    sink = FileSink(str(fifo), loop, max_bytes=10, backups=3)
    assert not sink.rotatable
    sink.emit([rec(f"{i}".encode()) for i in range(30)])
    sink.close()
    lines = read_all(r).decode().splitlines()
    os.close(r)
    assert [ln.rsplit(" ", 1)[-1] for ln in lines] == [str(i) for i in range(30)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "to-null"]


def test_file_sink_on_dev_stdout_pipe_in_a_child() -> None:
    """supervisord #1078: logfile=/dev/stdout must work when stdout is a pipe."""
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        from selector_loop import SelectorLoop
        from corral._logs import FileSink, LogRecord
        loop = SelectorLoop()
        sink = FileSink("/dev/stdout", loop, max_bytes=50, backups=2)
        assert not sink.rotatable
        for i in range(40):
            sink.emit([LogRecord(0.0, "p", 0, 1, "stdout", b"n%d" % i)])
        sink.close()
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30,
                         check=True)
    lines = out.stdout.decode().splitlines()
    assert [ln.rsplit(" ", 1)[-1] for ln in lines] == [f"n{i}" for i in range(40)]
    assert not os.path.exists("/dev/stdout.1")


# --- Ring and LogHub --------------------------------------------------------------------------


def test_ring_bounded_by_lines_and_bytes() -> None:
    ring = Ring(max_lines=3, max_bytes=100)
    ring.extend([rec(b"a"), rec(b"b"), rec(b"c"), rec(b"d")])
    assert [r.text for r in ring.tail()] == [b"b", b"c", b"d"]
    assert [r.text for r in ring.tail(2)] == [b"c", b"d"]
    assert ring.tail(0) == []
    ring.extend([rec(b"x" * 60), rec(b"y" * 60)])
    assert [r.text for r in ring.tail()] == [b"y" * 60]
    assert ring.nbytes == 60


def test_hub_routes_rings_followers_and_tail(loop) -> None:
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    hub = LogHub(loop, ring_lines=10)
    got: list[tuple[list[LogRecord], int]] = []
    unsubscribe = hub.follow(lambda recs, dropped: got.append((list(recs), dropped)),
                             programs=["api"])
    eofs: list[str] = []
    hub.attach(r1, "web", 0, 10, "stdout", on_eof=lambda: eofs.append("web"))
    hub.attach(r2, "api", 1, 11, "stderr", on_eof=lambda: eofs.append("api"))
    os.write(w1, b"w1\nw2\n")
    os.write(w2, b"a1\n")
    os.close(w1)
    os.close(w2)
    loop.run_until(lambda: len(eofs) == 2, what="both EOFs")
    loop.run_until(lambda: got, what="follower")
    assert [r.text for r in hub.tail(program="web")] == [b"w1", b"w2"]
    assert [(r.text, r.stream, r.pid) for r in hub.tail(program="api", index=1)] == [
        (b"a1", "stderr", 11)]
    assert len(hub.tail(2)) == 2
    assert [r.text for batch, _ in got for r in batch] == [b"a1"]
    unsubscribe()
    hub.forget("web")
    assert hub.ring("web", 0) is None
    hub.close()


def test_follower_is_lossy_not_blocking(loop) -> None:
    hub = LogHub(loop)
    got: list[tuple[int, int]] = []
    hub.follow(lambda recs, dropped: got.append((len(recs), dropped)), max_pending=5)
    r, w = os.pipe()
    hub.attach(r, "p", 0, 1, "stdout")
    os.write(w, b"".join(b"%d\n" % i for i in range(20)))
    os.close(w)
    loop.run_until(lambda: got, what="delivery")
    loop.run_for(0.05)
    assert got[0] == (5, 15)
    assert hub.ring("p", 0) is not None and len(hub.ring("p", 0)) == 20  # type: ignore[arg-type]
    hub.close()


WRITER = textwrap.dedent("""
    import os, sys
    n = int(sys.argv[1])
    out = os.fdopen(1, "wb", buffering=1 << 16)
    for i in range(n):
        out.write(b"%d %s\\n" % (i, b"p" * 60))
    out.flush()
""")


def test_slow_console_throttles_child_through_the_pipe_and_loses_nothing(loop) -> None:
    """Backpressure end to end: a console whose reader stalls pauses the worker's pipe."""
    n = 200_000
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(n)], stdout=subprocess.PIPE)
    try:
        con_r, con_w = os.pipe()
        sink = ConsoleSink(loop, con_w)
        os.close(con_w)  # the sink has its own description
        hub = LogHub(loop, [sink])
        fd = os.dup(child.stdout.fileno())  # type: ignore[union-attr]
        child.stdout.close()  # type: ignore[union-attr]
        eof: list[bool] = []
        hub.attach(fd, "w", 0, child.pid, "stdout", on_eof=lambda: eof.append(True))
        # Nobody reads the console: the sink congests and the reader is paused...
        loop.run_until(lambda: hub.paused_readers == 1, what="reader paused")
        assert sink.out.pending <= 4 * 1024 * 1024
        loop.run_for(0.3)
        assert child.poll() is None, "the child is blocked on its full pipe"
        assert hub.paused_readers == 1
        # ...and once the console drains, everything arrives, in order.
        received = bytearray()
        os.set_blocking(con_r, False)

        def drain() -> None:
            try:
                while chunk := os.read(con_r, 1 << 16):
                    received.extend(chunk)
            except BlockingIOError:
                pass

        loop.add_reader(con_r, drain)
        loop.run_until(lambda: eof and sink.out.pending == 0, timeout=60, what="all output")
        drain()
        loop.remove_reader(con_r)
        lines = bytes(received).splitlines()
        assert len(lines) == n
        assert [int(ln.split()[2]) for ln in lines[:: n // 100]] == list(range(0, n, n // 100))
        assert lines[-1].split()[2] == str(n - 1).encode()
        hub.close()
        os.close(con_r)
        assert child.wait(timeout=30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_fast_json_lines_equal_record_to_json(loop) -> None:
    from corral._logs import _json_lines, record_to_json

    records = [rec(), rec(b'q"uo\\te \x01 \xc3\xa9 \xff', "stderr", more=True),
               LogRecord(1.5, 'we"ird', 3, None, "stdout", b"")]
    lines = _json_lines(records).decode().splitlines()
    assert [json.loads(x) for x in lines] == [record_to_json(r) for r in records]


# --- a read of many short lines (formatted, it is far larger than the read) --------------------


def test_pipe_reader_paused_mid_read_holds_the_rest_and_delivers_it_on_resume(loop) -> None:
    """A read of 64 KiB of empty lines comes in batches; paused after the first, the reader
    holds the rest (and reads no more) until it is resumed, then delivers it in order."""
    r, w = os.pipe()
    batches: list[list[Piece]] = []
    reader: PipeReader

    def on_lines(pieces: list[Piece]) -> None:
        batches.append(pieces)
        reader.pause()

    reader = PipeReader(r, loop, on_lines)
    os.write(w, b"first\n" + b"\n" * 60_000 + b"last\n")
    loop.run_until(lambda: batches, what="the first batch")
    loop.run_for(0.05)
    assert len(batches) == 1 and reader.held > 0
    assert len(batches[0]) < 1000  # a batch, not the whole read
    while reader.held:
        reader.resume()
        n = len(batches)
        loop.run_until(lambda n=n: len(batches) > n, what="the next batch")
    got = [p.text for b in batches for p in b]
    assert got == [b"first"] + [b""] * 60_000 + [b"last"]
    os.close(w)
    reader.resume()
    loop.run_until(lambda: reader.closed, what="eof")


@pytest.mark.parametrize("json_sink", [False, True], ids=["console", "json"])
def test_bursts_of_empty_lines_reach_a_slow_sink_whole(loop, json_sink: bool) -> None:
    """One 64 KiB read of empty lines formats to ~4-8 MiB (a 60-character program name, or
    JSON): more than the sink's buffer may hold. It used to be refused, silently; now the
    reader is throttled instead: every line arrives, in order, and memory stays bounded."""
    name = "p" * 60
    con_r, con_w = os.pipe()
    sink: ConsoleSink | JsonLinesSink = (JsonLinesSink(loop, con_w) if json_sink
                                         else ConsoleSink(loop, con_w))
    os.close(con_w)
    hub = LogHub(loop, [sink])
    r, w = os.pipe()
    bursts, blank = 4, 100_000

    def write() -> None:
        with os.fdopen(w, "wb") as f:
            for i in range(bursts):
                f.write(b"seq %d\n" % i + b"\n" * blank)
            f.write(b"done\n")

    writer = threading.Thread(target=write, daemon=True)
    eof: list[bool] = []
    received = bytearray()
    os.set_blocking(con_r, False)
    peak = 0

    def drain() -> None:
        nonlocal peak
        peak = max(peak, sink.out.pending)
        try:
            received.extend(os.read(con_r, 1 << 16))  # slower than the worker: one read a turn
        except BlockingIOError:
            pass

    try:
        hub.attach(r, name, 0, 42, "stdout", on_eof=lambda: eof.append(True))
        writer.start()
        loop.add_reader(con_r, drain)
        loop.run_until(lambda: eof and sink.out.pending == 0, timeout=50, what="all output")
        while True:  # what is left in the pipe
            before = len(received)
            drain()
            if len(received) == before:
                break
        loop.remove_reader(con_r)
    finally:
        hub.close()
        writer.join(10)
        os.close(con_r)
    lines = bytes(received).splitlines()
    if json_sink:
        texts = [json.loads(x)["line"] for x in lines]
    else:
        texts = [x.split(b" |  ", 1)[1].decode() if b" |  " in x else "" for x in lines]
    assert [t for t in texts if t] == [f"seq {i}" for i in range(bursts)] + ["done"]
    assert len(texts) == bursts * (blank + 1) + 1
    assert sink.out.dropped_bytes == 0 and sink.drops.bytes == 0
    assert peak <= 2 * 1024 * 1024


def test_a_refused_write_is_counted_and_said(loop, caplog: pytest.LogCaptureFixture) -> None:
    """The last resort (a batch too big for the buffer at all) is never silent."""
    con_r, con_w = os.pipe()
    sink = ConsoleSink(loop, con_w)
    os.close(con_w)
    try:
        sink.out._limit = 100  # what a write may never pass
        with caplog.at_level("WARNING", logger="corral._logs"):
            # fill the pipe, then one write over the limit
            while sink.out.pending == 0:
                sink.emit([rec(b"x" * 40)])
            sink.emit([rec(b"y" * 500, program="api", index=3)])
        assert sink.drops.lines == 1 and sink.drops.bytes > 500
        assert any("api.3" in r.getMessage() and "dropped" in r.getMessage()
                   for r in caplog.records)
    finally:
        sink.close()
        os.close(con_r)


def test_splitter_never_cuts_inside_a_utf8_character() -> None:
    """Each piece is decoded on its own (JSON logs): a cut inside a character made two U+FFFD.
    The cut moves back to the character's start; bytes that are not UTF-8 are cut anyway."""
    for width in (1, 2, 3, 4):  # a, é, €, 😀
        char = "aé€😀"[width - 1].encode()
        for limit in range(width, 12):  # (a piece shorter than a character must cut it)
            for lead in range(4):
                text = b"x" * lead + char * 20
                s = LineSplitter(max_line=limit)
                pieces = s.feed(text + b"\n")
                assert b"".join(p.text for p in pieces) == text
                for p in pieces:
                    p.text.decode("utf-8")  # strict: no piece splits a character
                    assert 0 < len(p.text) <= limit
                    assert len(p.text) >= limit - 3 or not p.more
    s = LineSplitter(max_line=4)
    assert s.feed(b"a\xc3\xa9\xc3\xa9\n") == [Piece(b"a\xc3\xa9", True),
                                             Piece(b"\xc3\xa9", False, True)]
    # not UTF-8 (stray continuation bytes): cut at the limit, nothing lost
    assert s.feed(b"\x80\x80\x80\x80\x80\n") == [Piece(b"\x80" * 4, True),
                                                 Piece(b"\x80", False, True)]
    # max_line smaller than a character: the character is cut (a piece is never empty)
    s = LineSplitter(max_line=1)
    assert s.feed("é\n".encode()) == [Piece(b"\xc3", True), Piece(b"\xa9", False, True)]
    # an unterminated long line too, and the default 64 KiB cut
    s = LineSplitter()
    text = ("a" + "é" * 49_999).encode()
    pieces = s.feed(text) + s.flush()
    assert "".join(p.text.decode("utf-8") for p in pieces) == "a" + "é" * 49_999


def test_file_sink_full_disk_warns_once_and_never_leaves_a_cut_line(
        loop, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A file that stops taking writes part-way (RLIMIT_FSIZE here: a short write, then EFBIG,
    as ENOSPC does on a full disk): one warning when it starts, one when writing resumes with
    what was dropped; the file holds whole lines only, never a cut one glued to the next."""
    import re
    import resource
    import signal

    path = tmp_path / "w.log"
    sink = FileSink(str(path), loop, max_bytes=0)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    n = 0

    def batch() -> None:
        nonlocal n
        sink.emit([rec(b"line %05d " % (n + i) + b"y" * 100) for i in range(3)])
        n += 3

    try:
        with caplog.at_level("WARNING", logger="corral._logs"):
            batch()
            resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 1000, hard))
            for _ in range(200):
                batch()
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            for _ in range(3):
                batch()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
        sink.close()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "write failed" in messages[0]
    assert "written again" in messages[1]
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""
    nums = []
    for line in lines[:-1]:
        m = re.fullmatch(rb"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} web\.1 \|  line (\d{5}) y{100}",
                         line)
        assert m, line
        nums.append(int(m.group(1)))
    dropped = n - len(nums)
    assert nums[-9:] == list(range(n - 9, n))  # written again after
    assert f"{dropped} line(s)" in messages[1]


# --- shutdown: what was read reaches a slow console, for a bounded time ------------------------


def _hub_with_a_dead_worker(loop, nbytes: int) -> tuple[LogHub, ConsoleSink, int, threading.Thread]:
    """A hub whose console nobody reads yet and a "worker" that wrote ``nbytes`` and ended."""
    con_r, con_w = os.pipe()
    sink = ConsoleSink(loop, con_w)
    os.close(con_w)
    hub = LogHub(loop, [sink])
    r, w = os.pipe()

    def write() -> None:
        with contextlib.suppress(BrokenPipeError), os.fdopen(w, "wb") as f:
            for i in range(nbytes // 100):
                f.write(b"bye %06d " % i + b"z" * 89 + b"\n")

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    hub.attach(r, "w", 0, 42, "stdout")
    loop.run_until(lambda: hub.paused_readers == 1, what="the console congested")
    return hub, sink, con_r, writer


def test_hub_flush_at_shutdown_writes_everything_to_a_slow_console(loop) -> None:
    hub, _sink, con_r, writer = _hub_with_a_dead_worker(loop, 600_000)
    got = bytearray()

    def consume() -> None:  # a slow consumer: 4 KiB at a time, until EOF
        while True:
            chunk = os.read(con_r, 4096)
            if not chunk:
                return
            got.extend(chunk)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    try:
        loop.run_until(lambda: not writer.is_alive(), timeout=30, what="the worker's end")
        assert hub.flush(lambda until: loop.run_once(max(0.0, until - time.monotonic())), 30)
        assert hub.unfinished() == 0
    finally:
        hub.close()  # closes the console's fd: the consumer sees EOF
        consumer.join(10)
        os.close(con_r)
    lines = bytes(got).splitlines()
    assert len(lines) == 6000 and lines[-1].split()[3] == b"005999"


def test_hub_flush_gives_up_in_time_and_close_says_what_is_dropped(
        loop, caplog: pytest.LogCaptureFixture) -> None:
    hub, _sink, con_r, writer = _hub_with_a_dead_worker(loop, 600_000)
    try:
        t0 = time.monotonic()
        assert not hub.flush(lambda until: loop.run_once(max(0.0, until - time.monotonic())),
                             0.5)
        assert time.monotonic() - t0 < 3
        assert hub.unfinished() > 0
        with caplog.at_level("WARNING"):
            hub.close()
        text = "\n".join(r.getMessage() for r in caplog.records)
        assert "bytes unread" in text and "w.0 stdout:" in text  # the pipe, by worker
        assert re.search(r"console log sink: closed with \d+ bytes unwritten", text)
    finally:
        hub.close()
        os.close(con_r)
        writer.join(10)
