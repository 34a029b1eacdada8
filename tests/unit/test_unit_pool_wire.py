"""The pool's wire protocol without sockets: frames in any cut, large frames, message kinds."""

from __future__ import annotations

import os
import pickle
from multiprocessing.connection import Pipe

from corral.pool._wire import (
    BIG_HEADER,
    HEADER,
    QUIT,
    READ_SIZE,
    FrameDecoder,
    WireKind,
    encode,
    header,
)


def _feed_all(decoder: FrameDecoder, data: bytes, step: int) -> list[bytes]:
    out: list[bytes] = []
    for i in range(0, len(data), step):
        out += [bytes(f) for f in decoder.feed(data[i:i + step])]
    return out


def test_frames_come_out_whole_whatever_the_cut() -> None:
    payloads = [b"a", b"", b"hello" * 100, pickle.dumps(("r", 42))]
    stream = b"".join(encode(p) for p in payloads)
    for step in (1, 2, 3, 4, 5, 7, 64, len(stream)):
        decoder = FrameDecoder()
        assert _feed_all(decoder, stream, step) == payloads, step
        assert decoder.buffered == 0


def test_an_incomplete_frame_waits_for_its_rest() -> None:
    decoder = FrameDecoder()
    frame = encode(b"abcdef")
    assert decoder.feed(frame[:3]) == []  # not even a whole header
    assert decoder.feed(frame[3:6]) == []
    assert decoder.buffered == 6
    assert decoder.feed(frame[6:] + encode(b"x")[:2]) == [b"abcdef"]
    assert decoder.feed(encode(b"x")[2:]) == [b"x"]


def test_a_large_frame_is_read_into_a_buffer_of_its_size() -> None:
    payload = os.urandom(3 * READ_SIZE + 17)
    data = encode(payload)
    decoder = FrameDecoder()
    assert decoder.feed(data[:1000]) == []
    assert decoder.buffered == 1000 - 4
    pos = 1000
    got = None
    while got is None:
        tail = decoder.big_tail()
        assert tail is not None
        n = min(len(tail), 40_000, len(data) - pos)
        tail[:n] = data[pos:pos + n]  # what os.readv(fd, [tail]) would do
        pos += n
        got = decoder.big_filled(n)
    assert bytes(got) == payload and pos == len(data)
    assert decoder.big_tail() is None
    assert decoder.feed(encode(b"next")) == [b"next"]


def test_the_eight_byte_length_of_huge_frames() -> None:
    assert header(5) == HEADER.pack(5)
    assert header(0x7FFFFFFF) == HEADER.pack(0x7FFFFFFF)
    assert header(1 << 31) == HEADER.pack(-1) + BIG_HEADER.pack(1 << 31)
    # multiprocessing reads such a header whatever the size; so does the decoder.
    payload = b"z" * 100
    data = HEADER.pack(-1) + BIG_HEADER.pack(len(payload)) + payload
    assert _feed_all(FrameDecoder(), data, 5) == [payload]


def test_frames_match_multiprocessing_connections() -> None:
    a, b = Pipe()
    try:
        a.send_bytes(b"from the worker")
        a.send_bytes(b"")
        raw = os.read(b.fileno(), 1000)
        assert FrameDecoder().feed(raw) == [b"from the worker", b""]
        os.write(b.fileno(), encode(b"a task") + QUIT)
        assert a.recv_bytes() == b"a task"
        assert a.recv_bytes() == b""  # quit
    finally:
        a.close()
        b.close()


def test_message_kinds_travel_as_one_character_strings() -> None:
    assert {k.value for k in WireKind} == set("hireut")
    msg = pickle.loads(pickle.dumps((WireKind.RESULT.value, 1)))
    assert type(msg[0]) is str and msg[0] == WireKind.RESULT
