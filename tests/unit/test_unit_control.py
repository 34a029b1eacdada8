"""The control socket: framing, the socket directory, the server on a loop thread, the blocking
client, peer-credential checks with a real second user, and a second corral on one socket."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import struct
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from corral._control import (
    CommandError,
    ControlServer,
    ControlSocketError,
    ControlSocketInUse,
    Deferred,
    FrameDecoder,
    Peer,
    ProtocolError,
    Stream,
    StreamChannel,
    default_socket_dir,
    encode_frame,
    ensure_socket_dir,
    socket_path,
)
from corral.cli.client import (
    ControlClient,
    ControlError,
    NotRunning,
    PermissionDenied,
    RemoteError,
)
from selector_loop import SelectorLoop
from support import wait_for

pytestmark = pytest.mark.timeout(60)

NOBODY = 65534


# --- framing ----------------------------------------------------------------------------------


def test_frames_roundtrip_across_split_feeds() -> None:
    data = encode_frame({"v": 1, "id": 1, "command": "x"}) + encode_frame({"é": [1, 2]})
    dec = FrameDecoder()
    out = []
    for i in range(len(data)):
        out += dec.feed(data[i:i + 1])
        if i < len(data) - 1:
            assert dec.partial or out
    assert out == [{"v": 1, "id": 1, "command": "x"}, {"é": [1, 2]}]
    assert not dec.partial


def test_frame_errors() -> None:
    with pytest.raises(ProtocolError, match="over the 10-byte limit") as e:
        FrameDecoder(10).feed(struct.pack(">I", 11))
    assert e.value.code == "too_large"
    with pytest.raises(ProtocolError, match="not valid UTF-8 JSON"):
        FrameDecoder().feed(struct.pack(">I", 3) + b"{x}")
    with pytest.raises(ProtocolError, match="JSON object, got list"):
        FrameDecoder().feed(struct.pack(">I", 2) + b"[]")
    with pytest.raises(ProtocolError, match="over the 50-byte limit"):
        encode_frame({"x": "y" * 100}, max_size=50)


# --- the socket directory ----------------------------------------------------------------------


def test_default_socket_dir() -> None:
    assert default_socket_dir({}, euid=0) == "/run/corral"
    assert default_socket_dir({"XDG_RUNTIME_DIR": "/tmp"}, euid=1000) == "/tmp/corral"
    assert default_socket_dir({"XDG_RUNTIME_DIR": "/nonexistent"}, euid=1000) == \
        "/tmp/corral-1000"
    assert default_socket_dir({}, euid=1000) == "/tmp/corral-1000"
    assert socket_path("/x", "web") == "/x/web.sock"


def test_ensure_socket_dir_creates_and_checks(tmp_path: Path) -> None:
    d = tmp_path / "corral"
    ensure_socket_dir(str(d))
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    ensure_socket_dir(str(d), shared=True)
    assert stat.S_IMODE(d.stat().st_mode) == 0o711
    os.chmod(d, 0o755)
    with pytest.raises(ControlSocketError, match="mode 0755; expected 0700"):
        ensure_socket_dir(str(d))
    os.chmod(d, 0o700)
    link = tmp_path / "link"
    link.symlink_to(d)
    with pytest.raises(ControlSocketError, match="not a directory"):
        ensure_socket_dir(str(link))
    if os.geteuid() == 0:
        os.chown(d, NOBODY, -1)
        with pytest.raises(ControlSocketError, match=f"owned by uid {NOBODY}"):
            ensure_socket_dir(str(d))


# --- a server on a loop thread -----------------------------------------------------------------


class LoopThread:
    """Runs a SelectorLoop in a thread; the server is set up before the thread starts."""

    def __init__(self) -> None:
        self.loop = SelectorLoop()
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        self.loop.thread = threading.get_ident()
        while not self._stop:
            self.loop.run_once(0.05)

    def call(self, fn: Callable[[], Any]) -> Any:
        done = threading.Event()
        box: list[Any] = []

        def run() -> None:
            box.append(fn())
            done.set()

        self.loop.call_soon_threadsafe(run)
        assert done.wait(10)
        return box[0]

    def stop(self) -> None:
        self._stop = True
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def sockdir() -> Iterator[str]:
    # Under /tmp with a 0711 parent, so a second user can reach it when the test allows it.
    parent = tempfile.mkdtemp(prefix="corral-ctl-")
    os.chmod(parent, 0o711)
    yield os.path.join(parent, "corral")
    shutil.rmtree(parent, ignore_errors=True)


def make_server(sockdir: str, dispatch: Callable[[str, dict[str, Any], Peer], Any],
                **kw: Any) -> tuple[LoopThread, ControlServer]:
    lt = LoopThread()
    server = ControlServer(lt.loop, os.path.join(sockdir, "corral.sock"), dispatch, **kw)
    server.start()
    lt.start()
    return lt, server


@pytest.fixture
def serve(sockdir: str) -> Iterator[Callable[..., tuple[LoopThread, ControlServer]]]:
    started: list[tuple[LoopThread, ControlServer]] = []

    def start(dispatch: Callable[[str, dict[str, Any], Peer], Any], **kw: Any
              ) -> tuple[LoopThread, ControlServer]:
        pair = make_server(sockdir, dispatch, **kw)
        started.append(pair)
        return pair

    yield start
    for lt, server in started:
        lt.call(server.close)
        lt.stop()


def echo_dispatch(command: str, args: dict[str, Any], peer: Peer) -> Any:
    if command == "echo":
        return {"args": args, "peer": [peer.pid, peer.uid, peer.gid]}
    if command == "fail":
        raise CommandError("no program named 'wbe' (did you mean 'web'?)", "unknown_program")
    if command == "crash":
        raise RuntimeError("boom")
    if command == "unjsonable":
        return {"x": object()}
    raise CommandError(f"unknown command {command!r}", "unknown_command")


def test_call_reply_and_errors(serve) -> None:
    _lt, server = serve(echo_dispatch)
    sock = server.path
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(sock)).st_mode) == 0o700
    with ControlClient(sock) as c:
        assert c.call("echo", {"a": 1}) == {"args": {"a": 1},
                                            "peer": [os.getpid(), os.getuid(), os.getgid()]}
        with pytest.raises(RemoteError, match="did you mean 'web'") as e:
            c.call("fail")
        assert e.value.code == "unknown_program"
        with pytest.raises(RemoteError, match="failed while handling 'crash'") as e:
            c.call("crash")
        assert e.value.code == "internal"
        with pytest.raises(RemoteError) as e:
            c.call("unjsonable")
        assert e.value.code == "internal"
        assert c.call("echo") == {"args": {}, "peer": [os.getpid(), os.getuid(), os.getgid()]}


def raw_connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    return s


def read_frame(s: socket.socket) -> dict[str, Any] | None:
    dec = FrameDecoder()
    while True:
        data = s.recv(65536)
        if not data:
            return None
        frames = dec.feed(data)
        if frames:
            return frames[0]


def test_bad_requests_get_clear_errors(serve) -> None:
    _lt, server = serve(echo_dispatch)
    cases = [
        ({"v": 2, "id": 1, "command": "echo"}, "version"),
        ({"v": 1, "id": [1], "command": "echo"}, "bad_request"),
        ({"v": 1, "id": 1}, "bad_request"),
        ({"v": 1, "id": 1, "command": "echo", "args": [1]}, "bad_request"),
    ]
    s = raw_connect(server.path)
    for frame, code in cases:
        s.sendall(encode_frame(frame))
        reply = read_frame(s)
        assert reply is not None and reply["status"] == "error", frame
        assert reply["error"]["code"] == code
    s.close()
    # Not JSON: an error frame, then the connection is closed.
    s = raw_connect(server.path)
    s.sendall(struct.pack(">I", 5) + b"hello")
    reply = read_frame(s)
    assert reply is not None and reply["error"]["code"] == "bad_request"
    assert "not valid UTF-8 JSON" in reply["error"]["message"]
    assert read_frame(s) is None
    s.close()


def test_oversized_message_is_refused_at_once(serve) -> None:
    _lt, server = serve(echo_dispatch, max_message=1024)
    s = raw_connect(server.path)
    s.sendall(struct.pack(">I", 10 * 1024 * 1024))  # and never the body
    reply = read_frame(s)
    assert reply is not None and reply["error"]["code"] == "too_large"
    assert "10485760 bytes is over the 1024-byte limit" in reply["error"]["message"]
    assert read_frame(s) is None
    s.close()


def test_slow_message_times_out_without_blocking_others(serve) -> None:
    _lt, server = serve(echo_dispatch, read_timeout=1.0)
    slow = raw_connect(server.path)
    data = encode_frame({"v": 1, "id": 1, "command": "echo"})
    slow.sendall(data[:7])
    # Meanwhile the loop answers someone else at once.
    t0 = time.monotonic()
    with ControlClient(server.path) as c:
        assert c.call("echo", {"n": 1})["args"] == {"n": 1}
    assert time.monotonic() - t0 < 1.0
    reply = read_frame(slow)
    assert reply is not None and reply["error"]["code"] == "timeout"
    assert read_frame(slow) is None
    slow.close()


def test_idle_connection_is_closed(serve) -> None:
    _lt, server = serve(echo_dispatch, idle_timeout=0.3)
    s = raw_connect(server.path)
    assert read_frame(s) is None  # EOF after the idle timeout
    s.close()


def test_idle_connections_make_room_for_a_new_one(serve) -> None:
    # Clients that connect and say nothing held every slot for idle_timeout: `corral status`
    # and `corral stop` were refused "busy" meanwhile. The one idle longest now makes room.
    lt, server = serve(echo_dispatch, max_connections=3, read_timeout=30.0)
    idle = []
    for _ in range(3):
        idle.append(raw_connect(server.path))
        n = len(idle)
        wait_for(lambda n=n: lt.call(lambda: server.connections) == n, 10,
                 "the connection accepted")
    with ControlClient(server.path) as c:
        assert c.call("echo", {"n": 1})["args"] == {"n": 1}
    assert read_frame(idle[0]) is None  # the oldest was closed for it
    for s in idle:
        s.close()
    wait_for(lambda: lt.call(lambda: server.connections) == 0, 10, "every connection closed")
    # Connections with a message under way are not idle: then a newcomer is refused.
    busy = []
    data = encode_frame({"v": 1, "id": 1, "command": "echo"})
    for _ in range(3):
        s = raw_connect(server.path)
        s.sendall(data[:7])
        busy.append(s)
        n = len(busy)
        wait_for(lambda n=n: lt.call(lambda: sum(
            c.decoder.partial for c in server._conns)) == n, 10, "the partial message read")
    late = raw_connect(server.path)
    reply = read_frame(late)
    assert reply is not None and reply["error"]["code"] == "busy", reply
    late.close()
    for s in busy:
        s.sendall(data[7:])
        got = read_frame(s)
        assert got is not None and got["status"] == "ok", got
        s.close()


def test_deferred_reply_from_another_thread(serve) -> None:
    pending: list[Deferred] = []

    def dispatch(command: str, args: dict[str, Any], peer: Peer) -> Any:
        if command == "early":
            d = Deferred()
            d.resolve("already")
            return d
        d = Deferred()
        pending.append(d)
        return d

    _lt, server = serve(dispatch)
    with ControlClient(server.path) as c:
        assert c.call("early") == "already"
        result: list[Any] = []
        t = threading.Thread(target=lambda: result.append(c.call("later")))
        t.start()
        deadline = time.monotonic() + 10
        while not pending and time.monotonic() < deadline:
            time.sleep(0.01)
        pending[0].resolve({"stopped": 4})
        pending[0].fail("ignored: first call wins")
        t.join(10)
        assert result == [{"stopped": 4}]
        t = threading.Thread(target=lambda: result.append(_catch(lambda: c.call("later"))))
        t.start()
        while len(pending) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        pending[1].fail("worker 3 did not stop", "timeout")
        t.join(10)
        assert isinstance(result[1], RemoteError) and result[1].code == "timeout"


def _catch(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:
        return exc


def test_stream_frames_end_and_cancel(serve) -> None:
    channels: list[StreamChannel] = []
    cancelled: list[bool] = []

    def dispatch(command: str, args: dict[str, Any], peer: Peer) -> Any:
        if command == "count":
            def start(ch: StreamChannel) -> None:
                for i in range(args["n"]):
                    ch.send(i)
                ch.end({"total": args["n"]})
            return Stream(start)
        return Stream(channels.append, lambda: cancelled.append(True))

    lt, server = serve(dispatch)
    with ControlClient(server.path) as c:
        frames = list(c.stream("count", {"n": 5}))
        assert [f.data for f in frames] == [0, 1, 2, 3, 4, {"total": 5}]
        assert [f.last for f in frames] == [False] * 5 + [True]
        # A follow that the client abandons is cancelled on the server.
        it = c.stream("follow")
        lt.call(lambda: None)
        deadline = time.monotonic() + 10
        while not channels and time.monotonic() < deadline:
            time.sleep(0.01)
        lt.call(lambda: channels[0].send("line 1"))
        assert next(it).data == "line 1"
    deadline = time.monotonic() + 10
    while not cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cancelled == [True]
    assert lt.call(lambda: server.connections) == 0


def test_slow_stream_reader_drops_with_count_never_blocks(serve) -> None:
    channels: list[StreamChannel] = []
    _lt, server = serve(lambda c, a, p: Stream(channels.append), max_output=256 * 1024,
                        max_message=64 * 1024)
    lt = _lt
    with ControlClient(server.path) as c:
        it = c.stream("follow")
        deadline = time.monotonic() + 10
        while not channels and time.monotonic() < deadline:
            time.sleep(0.01)
        payload = "x" * 4000
        sent = lt.call(lambda: sum(channels[0].send(payload) for _ in range(2000)))
        assert sent < 2000  # the client is not reading: some were dropped at once
        lt.call(lambda: channels[0].end("bye"))
        frames = list(it)
        assert len(frames) == sent + 1
        assert frames[-1].data == "bye" and frames[-1].dropped == 2000 - sent


def test_client_errors_when_nothing_runs(tmp_path: Path) -> None:
    with pytest.raises(NotRunning, match="no socket there"):
        ControlClient(str(tmp_path / "none.sock")).call("status")
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    with pytest.raises(NotRunning, match="stale socket"):
        ControlClient(str(stale)).call("status")


def test_client_sees_server_close(serve) -> None:
    asked: list[Deferred] = []

    def dispatch(command: str, args: dict[str, Any], peer: Peer) -> Any:
        asked.append(Deferred())
        return asked[-1]

    lt, server = serve(dispatch)
    with ControlClient(server.path) as c:
        t = threading.Thread(target=lambda: lt.call(server.close))
        result: list[Any] = []
        reader = threading.Thread(target=lambda: result.append(_catch(lambda: c.call("x"))))
        reader.start()
        deadline = time.monotonic() + 10
        while not asked and time.monotonic() < deadline:
            time.sleep(0.01)
        t.start()
        t.join(10)
        reader.join(10)
        assert isinstance(result[0], ControlError)
        assert "closed the connection" in str(result[0])


def test_client_asking_again_after_server_close(serve) -> None:
    """A client that outlives corral (`top` between two frames) says so plainly."""
    lt, server = serve(lambda command, args, peer: {"ok": 1})
    with ControlClient(server.path) as c:
        assert c.call("x") == {"ok": 1}
        lt.call(server.close)
        err = _catch(lambda: c.call("x"))
        assert isinstance(err, ControlError)
        assert "closed the connection (it stopped" in str(err)


# --- one corral per socket ---------------------------------------------------------------------


def test_second_server_on_same_socket_is_refused(serve, sockdir: str) -> None:
    _lt, server = serve(echo_dispatch)
    other_loop = SelectorLoop()
    second = ControlServer(other_loop, server.path, echo_dispatch)
    with pytest.raises(ControlSocketInUse, match=f"pid {os.getpid()}.*already serving"):
        second.start()
    other_loop.close()
    # The first one is untouched.
    with ControlClient(server.path) as c:
        assert c.call("echo")["args"] == {}


def test_stale_socket_is_replaced_and_non_socket_refused(sockdir: str) -> None:
    ensure_socket_dir(sockdir)
    path = os.path.join(sockdir, "corral.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # its server died: the file stays behind
    loop = SelectorLoop()
    server = ControlServer(loop, path, echo_dispatch)
    server.start()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    server.close()
    assert not os.path.exists(path)
    Path(path).write_text("not a socket")
    with pytest.raises(ControlSocketError, match="is not a socket"):
        ControlServer(loop, path, echo_dispatch).start()
    loop.close()


def test_server_answering_without_lock_is_detected(sockdir: str) -> None:
    ensure_socket_dir(sockdir)
    path = os.path.join(sockdir, "corral.sock")
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(path)
    other.listen(1)
    loop = SelectorLoop()
    try:
        with pytest.raises(ControlSocketInUse, match="another server answers"):
            ControlServer(loop, path, echo_dispatch).start()
        assert os.path.exists(path)
    finally:
        other.close()
        loop.close()


# --- a real second user -----------------------------------------------------------------------


def as_nobody(path: str) -> dict[str, Any]:
    """Fork, become nobody, call ``echo`` on ``path``; return what happened."""
    r, w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with the loop thread alive
        pid = os.fork()
    if pid == 0:  # the child: no pytest machinery, only os._exit
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                with ControlClient(path, timeout=10) as c:
                    out = {"ok": c.call("echo")}
            except PermissionDenied as exc:
                out = {"denied": str(exc)}
            except Exception as exc:
                out = {"error": f"{type(exc).__name__}: {exc}"}
            os.write(w, json.dumps(out).encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return json.loads(data)


needs_root = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="a real second user (nobody) needs setuid, which only root can do; run the suite "
           "as root to test the SO_PEERCRED refusal")


@needs_root
def test_other_user_is_refused_by_peercred_with_clear_error(serve, caplog) -> None:
    # allow_uids opens the file permissions (0711 dir, 0666 socket); SO_PEERCRED decides.
    lt, server = serve(echo_dispatch, allow_uids=[12345])
    assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o666
    with caplog.at_level("WARNING", logger="corral._control"):
        out = as_nobody(server.path)
        deadline = time.monotonic() + 10
        while not lt.call(lambda: server.refused) and time.monotonic() < deadline:
            time.sleep(0.01)
    assert "denied" in out, out
    assert f"uid {NOBODY}" in out["denied"] and "allow_uids" in out["denied"]
    assert lt.call(lambda: server.refused) == 1
    assert any(f"uid {NOBODY}" in r.getMessage() and "refused" in r.getMessage()
               for r in caplog.records)


@needs_root
def test_other_user_cannot_even_reach_a_private_socket(serve) -> None:
    _lt, server = serve(echo_dispatch)  # no allowances: 0700 directory
    out = as_nobody(server.path)
    assert "denied" in out, out
    assert "permission denied" in out["denied"] and "allow_uids" in out["denied"]


@needs_root
def test_allowed_uid_and_gid_are_let_in(serve) -> None:
    _lt, server = serve(echo_dispatch, allow_gids=[NOBODY])
    out = as_nobody(server.path)
    assert out.get("ok", {}).get("peer", [None, None])[1:] == [NOBODY, NOBODY], out
