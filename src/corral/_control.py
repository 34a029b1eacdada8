"""The control socket: protocol, socket directory, and the loop-driven server.

Wire format (both directions): a 4-byte big-endian length, then that many bytes of UTF-8 JSON
(an object), at most :data:`MAX_MESSAGE` bytes. ::

    request   {"v": 1, "id": 7, "command": "status", "args": {...}}
    reply     {"v": 1, "id": 7, "status": "ok", "data": ...}
              {"v": 1, "id": 7, "status": "error", "error": {"code": "...", "message": "..."}}
    stream    {"v": 1, "id": 7, "status": "ok", "data": ..., "more": true}   (any number)
              {"v": 1, "id": 7, "status": "ok", "data": ...}                 (the end frame)

A stream frame may carry ``"dropped": N``: N items were lost because the client read too
slowly (streams never slow corral down). Error codes are listed in :data:`ERROR_CODES`.

Access: a Unix stream socket (never TCP) in a directory only its owner can use (0700; socket
0600). Each connection is checked with SO_PEERCRED: the owner, root, and the configured
``allow_uids`` / ``allow_gids`` (the peer's effective gid) are let in; anyone else gets an
error frame ``forbidden`` and a log line. With allowances configured the directory is 0711 and
the socket 0666, so that those users can reach it at all: SO_PEERCRED is then the gate.

The server never blocks the loop: reads and writes are non-blocking, a message must arrive
whole within ``read_timeout`` of its first byte, oversized or malformed messages get an error
frame and the connection is closed, and each connection's output is bounded.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from corral._loop import Loop, TimerHandle
from corral._outbuf import OutBuffer
from corral.errors import CorralError

__all__ = [
    "ERROR_CODES",
    "MAX_MESSAGE",
    "PROTOCOL_VERSION",
    "CommandError",
    "ControlServer",
    "ControlSocketError",
    "ControlSocketInUse",
    "Deferred",
    "Dispatch",
    "FrameDecoder",
    "Peer",
    "ProtocolError",
    "Stream",
    "StreamChannel",
    "answer_when_done",
    "default_socket_dir",
    "encode_frame",
    "ensure_socket_dir",
    "peer_credentials",
    "socket_path",
]

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
MAX_MESSAGE = 1024 * 1024
_HEADER = struct.Struct(">I")

ERROR_CODES = {
    "bad_request": "the message is not valid JSON or lacks v/id/command",
    "too_large": "the message is longer than the limit",
    "timeout": "the message did not arrive whole in time",
    "version": "the protocol version is not supported",
    "forbidden": "the peer's uid/gid is not allowed",
    "busy": "too many connections",
    "unknown_command": "no such command",
    "internal": "corral failed while handling the command (see its log)",
}


class ControlSocketError(CorralError, OSError):
    """The control socket or its directory cannot be used (wrong owner/mode, not a socket)."""


class ControlSocketInUse(ControlSocketError):
    """Another corral is serving this socket."""


class ProtocolError(CorralError, ValueError):
    """A malformed, oversized or unexpected frame.

    Attributes:
        code: one of :data:`ERROR_CODES`.
    """

    def __init__(self, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code


class CommandError(CorralError):
    """Raise from ``dispatch`` to answer with an error frame.

    Args:
        message: for the user ("no program named 'wbe' (did you mean 'web'?)").
        code: a short machine-readable code (e.g. "unknown_program", "bad_args").
    """

    def __init__(self, message: str, code: str = "error") -> None:
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------ framing


def encode_frame(obj: Mapping[str, Any], max_size: int = MAX_MESSAGE) -> bytes:
    """Length-prefix the JSON of ``obj``; ProtocolError("too_large") past ``max_size``."""
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    if len(body) > max_size:
        raise ProtocolError(f"message of {len(body)} bytes is over the {max_size}-byte limit",
                            "too_large")
    return _HEADER.pack(len(body)) + body


class FrameDecoder:
    """Bytes in, JSON objects out; raises :class:`ProtocolError` on a bad frame."""

    def __init__(self, max_size: int = MAX_MESSAGE) -> None:
        self.max_size = max_size
        self._buf = bytearray()

    @property
    def partial(self) -> bool:
        """A frame has started but not finished."""
        return bool(self._buf)

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        out: list[dict[str, Any]] = []
        while len(self._buf) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._buf)
            if size > self.max_size:
                raise ProtocolError(
                    f"message of {size} bytes is over the {self.max_size}-byte limit",
                    "too_large")
            if len(self._buf) < _HEADER.size + size:
                break
            body = bytes(self._buf[_HEADER.size:_HEADER.size + size])
            del self._buf[:_HEADER.size + size]
            try:
                obj = json.loads(body)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ProtocolError(f"message is not valid UTF-8 JSON ({exc})") from None
            except RecursionError:
                # [[[[...]]]] a few KB long is past the parser's recursion limit: malformed
                # like any other, never a crash of the loop that reads it.
                raise ProtocolError("message is JSON nested too deep to read (arrays and "
                                    "objects nest a few hundred deep at most)") from None
            if not isinstance(obj, dict):
                raise ProtocolError(f"message must be a JSON object, got {type(obj).__name__}")
            out.append(obj)
        return out


# ------------------------------------------------------------------------------ where


def default_socket_dir(env: Mapping[str, str] | None = None, euid: int | None = None) -> str:
    """``/run/corral`` for root, ``$XDG_RUNTIME_DIR/corral``, else ``/tmp/corral-<uid>``."""
    env = os.environ if env is None else env
    euid = os.geteuid() if euid is None else euid
    if euid == 0:
        return "/run/corral"
    xdg = env.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg) and os.path.isdir(xdg):
        return os.path.join(xdg, "corral")
    return f"/tmp/corral-{euid}"


def socket_path(directory: str | None = None, name: str = "corral") -> str:
    """The socket of corral instance ``name`` in ``directory`` (default: the default dir)."""
    return os.path.join(directory or default_socket_dir(), f"{name}.sock")


def ensure_socket_dir(path: str, *, shared: bool = False) -> None:
    """Create ``path`` (mode 0700, or 0711 when ``shared``) or check an existing one.

    An existing directory must be a real directory (not a symlink), owned by us, and not
    readable or writable by group/others; otherwise ControlSocketError says what is wrong.
    """
    mode = 0o711 if shared else 0o700
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.mkdir(path, mode)
    st = os.lstat(path)
    euid = os.geteuid()
    if not stat.S_ISDIR(st.st_mode):
        raise ControlSocketError(f"control socket directory {path} is not a directory "
                                 "(a symlink or a file?); remove it or choose socket_dir")
    if st.st_uid != euid:
        raise ControlSocketError(f"control socket directory {path} is owned by uid "
                                 f"{st.st_uid}, not by us (uid {euid}); refusing to use it")
    current = stat.S_IMODE(st.st_mode)
    if current & 0o066:
        raise ControlSocketError(f"control socket directory {path} has mode {current:04o}; "
                                 f"expected {mode:04o} (others must not read or write it)")
    if current != mode:
        os.chmod(path, mode)


# ------------------------------------------------------------------------------ peers


@dataclass(frozen=True)
class Peer:
    """The process at the other end of a connection, as the kernel reports it."""

    pid: int
    uid: int
    gid: int


_UCRED = struct.Struct("3i")


def peer_credentials(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return Peer(*_UCRED.unpack(raw))


# ------------------------------------------------------------------------------ replies


class StreamChannel:
    """Where a streaming command sends its frames (loop thread only).

    ``send`` never blocks: when the client reads too slowly, items are dropped and counted,
    and the next frame that gets through carries ``"dropped": N``.
    """

    def __init__(self, conn: _Connection, request_id: Any) -> None:
        self._conn = conn
        self._id = request_id
        self.closed = False
        self.dropped = 0

    def send(self, data: Any) -> bool:
        if self.closed:
            return False
        frame: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": self._id, "status": "ok",
                                 "data": data, "more": True}
        if self.dropped:
            frame["dropped"] = self.dropped
        if self._conn.send(frame, droppable=True):
            self.dropped = 0
            return True
        self.dropped += 1
        return False

    def end(self, data: Any = None) -> None:
        if self.closed:
            return
        self.closed = True
        frame: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": self._id, "status": "ok",
                                 "data": data}
        if self.dropped:
            frame["dropped"] = self.dropped
        self._conn.send(frame)
        self._conn.stream_done(self._id)

    def fail(self, message: str, code: str = "error") -> None:
        if self.closed:
            return
        self.closed = True
        self._conn.send(_error(self._id, code, message))
        self._conn.stream_done(self._id)


class Stream:
    """Return from ``dispatch`` for a streaming command (``logs -f``, ``events -f``).

    Args:
        start: called on the loop thread with the :class:`StreamChannel` to send on.
        cancel: called on the loop thread if the client goes away before ``end``.
    """

    def __init__(self, start: Callable[[StreamChannel], None],
                 cancel: Callable[[], None] | None = None) -> None:
        self.start = start
        self.cancel = cancel


class Deferred:
    """Return from ``dispatch`` to answer later, e.g. once the supervisor thread has acted.

    :meth:`resolve` and :meth:`fail` may be called from any thread, before or after dispatch
    returns; the first call wins.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._outcome: tuple[bool, Any, str] | None = None
        self._deliver: Callable[[bool, Any, str], None] | None = None

    def resolve(self, data: Any = None) -> None:
        self._settle((True, data, ""))

    def fail(self, message: str, code: str = "error") -> None:
        self._settle((False, message, code))

    def _settle(self, outcome: tuple[bool, Any, str]) -> None:
        with self._lock:
            if self._outcome is not None:
                return
            self._outcome = outcome
            deliver = self._deliver
        if deliver is not None:
            deliver(*outcome)

    def _bind(self, deliver: Callable[[bool, Any, str], None]) -> None:
        with self._lock:
            self._deliver = deliver
            outcome = self._outcome
        if outcome is not None:
            deliver(*outcome)


def answer_when_done(replies: Sequence[Any], answer: Callable[[list[Any]], Any]
                     ) -> Deferred:
    """A Deferred resolved with ``answer(results)`` once every monitor reply (a
    :class:`corral._reply.Reply`) is done, or failed with the first error."""
    deferred = Deferred()
    results: list[Any] = [None] * len(replies)
    left = [len(replies)]
    lock = threading.Lock()

    def done(i: int, r: Any) -> None:
        if r.error is not None:
            deferred.fail(f"{type(r.error).__name__}: {r.error}", "failed")
            return
        with lock:
            results[i] = r.result
            left[0] -= 1
            last = left[0] == 0
        if last:
            deferred.resolve(answer(results))

    if not replies:
        deferred.resolve(answer([]))
    for i, reply in enumerate(replies):
        reply.add_done_callback(lambda r, i=i: done(i, r))
    return deferred


Dispatch = Callable[[str, dict[str, Any], Peer], Any]


def _error(request_id: Any, code: str, message: str) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": request_id, "status": "error",
            "error": {"code": code, "message": message}}


# ------------------------------------------------------------------------------ server


class _Connection:
    def __init__(self, server: ControlServer, sock: socket.socket, peer: Peer) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.fd = sock.fileno()
        self.decoder = FrameDecoder(server.max_message)
        self.streams: dict[Any, tuple[StreamChannel, Stream]] = {}
        self.pending = 0  # deferred replies not yet sent
        self.closed = False
        self.closing = False
        self.read_timer: TimerHandle | None = None
        self.idle_timer: TimerHandle | None = None
        self.idle_since: float | None = None  # monotonic; None while something is in flight
        self.out = OutBuffer(self.fd, server.loop, high_water=server.max_output // 2,
                             low_water=0, limit=server.max_output, owns_fd=False,
                             on_resume=self._drained, on_error=lambda _e: self.close(),
                             name=f"control connection of pid {peer.pid}")
        server.loop.add_reader(self.fd, self.on_readable)
        self.arm_idle()

    # -- output
    def send(self, frame: Mapping[str, Any], *, droppable: bool = False) -> bool:
        if self.closed:
            return False
        try:
            data = encode_frame(frame, self.server.max_message)
        except ProtocolError as exc:
            data = encode_frame(_error(frame.get("id"), "too_large", f"reply: {exc}"))
        except (TypeError, ValueError) as exc:
            log.error("control: reply to pid %d is not JSON-serialisable: %s", self.peer.pid,
                      exc)
            data = encode_frame(_error(frame.get("id"), "internal",
                                       "the reply could not be encoded (see corral's log)"))
        if droppable and self.out.congested:
            return False
        if not self.out.write(data):
            log.warning("control: pid %d reads its replies too slowly; disconnecting it",
                        self.peer.pid)
            self.close()
            return False
        return True

    def _drained(self) -> None:
        if self.closing and self.out.pending == 0:
            self.close()

    def finish_after_flush(self) -> None:
        """Close once what is queued has been written (after a fatal protocol error)."""
        self.closing = True
        self.server.loop.remove_reader(self.fd)
        if self.out.pending == 0:
            self.close()
        else:
            self.server.loop.call_later(self.server.read_timeout, self.close)

    # -- input
    def on_readable(self) -> None:
        if self.closed or self.closing:
            return
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        try:
            requests = self.decoder.feed(data)
        except ProtocolError as exc:
            log.warning("control: bad message from pid %d uid %d: %s", self.peer.pid,
                        self.peer.uid, exc)
            self.send(_error(None, exc.code, str(exc)))
            self.finish_after_flush()
            return
        for request in requests:
            if self.closed or self.closing:
                return
            self.handle(request)
        self.arm_read_timer()
        self.arm_idle()

    def arm_read_timer(self) -> None:
        if self.decoder.partial and self.read_timer is None:
            self.read_timer = self.server.loop.call_later(self.server.read_timeout,
                                                          self.on_read_timeout)
        elif not self.decoder.partial and self.read_timer is not None:
            self.read_timer.cancel()
            self.read_timer = None

    def on_read_timeout(self) -> None:
        self.read_timer = None
        if self.closed or not self.decoder.partial:
            return
        log.warning("control: pid %d sent an incomplete message and nothing more for %gs; "
                    "disconnecting it", self.peer.pid, self.server.read_timeout)
        self.send(_error(None, "timeout", f"message incomplete after "
                                           f"{self.server.read_timeout:g}s"))
        self.finish_after_flush()

    @property
    def evictable(self) -> bool:
        """Idle: nothing in flight either way (no stream, no reply, no partial message)."""
        return (self.idle_since is not None and not self.closed and not self.closing
                and not self.decoder.partial and self.out.pending == 0)

    def arm_idle(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        idle = not self.streams and not self.pending
        self.idle_since = (self.idle_since or time.monotonic()) if idle else None
        if self.server.idle_timeout is not None and idle:
            self.idle_timer = self.server.loop.call_later(self.server.idle_timeout,
                                                          self.on_idle)

    def on_idle(self) -> None:
        self.idle_timer = None
        if not self.closed and not self.streams and not self.pending:
            log.info("control: closing idle connection of pid %d", self.peer.pid)
            self.close()

    def handle(self, request: dict[str, Any]) -> None:
        rid = request.get("id")
        if request.get("v") != PROTOCOL_VERSION:
            self.send(_error(rid, "version", f"protocol version must be {PROTOCOL_VERSION}, "
                                             f"got {request.get('v')!r}"))
            return
        command, args = request.get("command"), request.get("args", {})
        if not isinstance(rid, int | str) or isinstance(rid, bool):
            self.send(_error(None, "bad_request", f"id must be an int or str, got {rid!r}"))
            return
        if not isinstance(command, str) or not command:
            self.send(_error(rid, "bad_request", f"command must be a non-empty str, got "
                                                 f"{command!r}"))
            return
        if args is None:
            args = {}
        if not isinstance(args, dict):
            self.send(_error(rid, "bad_request", f"args must be an object, got "
                                                 f"{type(args).__name__}"))
            return
        if rid in self.streams:
            self.send(_error(rid, "bad_request", f"id {rid!r} is already streaming"))
            return
        try:
            result = self.server.dispatch(command, args, self.peer)
        except CommandError as exc:
            self.send(_error(rid, exc.code, str(exc)))
            return
        except Exception:
            log.exception("control: command %r from pid %d failed", command, self.peer.pid)
            self.send(_error(rid, "internal", f"corral failed while handling {command!r} "
                                              "(see its log)"))
            return
        if isinstance(result, Stream):
            channel = StreamChannel(self, rid)
            self.streams[rid] = (channel, result)
            try:
                result.start(channel)
            except Exception:
                log.exception("control: starting stream %r failed", command)
                channel.fail(f"corral failed while starting {command!r} (see its log)",
                             "internal")
        elif isinstance(result, Deferred):
            self.pending += 1
            loop = self.server.loop

            def deliver(ok: bool, data: Any, code: str) -> None:
                loop.call_soon_threadsafe(self._deliver, rid, ok, data, code)

            result._bind(deliver)
        else:
            self.send({"v": PROTOCOL_VERSION, "id": rid, "status": "ok", "data": result})

    def _deliver(self, rid: Any, ok: bool, data: Any, code: str) -> None:
        self.pending -= 1
        if ok:
            self.send({"v": PROTOCOL_VERSION, "id": rid, "status": "ok", "data": data})
        else:
            self.send(_error(rid, code, str(data)))
        self.arm_idle()

    def stream_done(self, rid: Any) -> None:
        self.streams.pop(rid, None)
        self.arm_idle()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for timer in (self.read_timer, self.idle_timer):
            if timer is not None:
                timer.cancel()
        self.server.loop.remove_reader(self.fd)
        for channel, stream in list(self.streams.values()):
            channel.closed = True
            if stream.cancel is not None:
                try:
                    stream.cancel()
                except Exception:
                    log.exception("control: cancelling a stream failed")
        self.streams.clear()
        self.out.close()
        self.sock.close()
        self.server._forget(self)


class ControlServer:
    """The control socket's server side, on a :class:`~corral._loop.Loop`.

    Args:
        loop: the event loop.
        path: the socket path (see :func:`socket_path`); its directory is created/checked.
        dispatch: ``dispatch(command, args, peer)`` returns a JSON value (the reply), a
            :class:`Deferred` or a :class:`Stream`, or raises :class:`CommandError`.
        allow_uids, allow_gids: who besides the owner and root may use it.
        max_message: the largest frame, either way.
        read_timeout: seconds a started message has to arrive whole.
        idle_timeout: seconds a connection with nothing in flight may stay open (None: ever).
        max_connections: more are refused with ``busy``.
        max_output: bytes queued per connection before it is cut off (streams drop instead).
    """

    def __init__(self, loop: Loop, path: str, dispatch: Dispatch, *,
                 allow_uids: Iterable[int] = (), allow_gids: Iterable[int] = (),
                 max_message: int = MAX_MESSAGE, read_timeout: float = 5.0,
                 idle_timeout: float | None = 300.0, max_connections: int = 64,
                 max_output: int = 8 * 1024 * 1024) -> None:
        self.loop = loop
        self.path = path
        self.dispatch = dispatch
        self.allow_uids = frozenset(allow_uids)
        self.allow_gids = frozenset(allow_gids)
        self.max_message = max_message
        self.read_timeout = read_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.max_output = max(max_output, 2 * max_message)
        self.refused = 0
        self._sock: socket.socket | None = None
        self._lock_fd = -1
        self._inode: tuple[int, int] | None = None
        self._conns: set[_Connection] = set()

    @property
    def shared(self) -> bool:
        return bool(self.allow_uids or self.allow_gids)

    def allowed(self, peer: Peer) -> bool:
        return (peer.uid in (0, os.geteuid()) or peer.uid in self.allow_uids
                or peer.gid in self.allow_gids)

    def start(self) -> None:
        """Bind and listen; ControlSocketInUse if another corral serves ``path``."""
        directory = os.path.dirname(self.path) or "."
        ensure_socket_dir(directory, shared=self.shared)
        self._take_lock()
        try:
            self._clear_stale()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.bind(self.path)
                os.chmod(self.path, 0o666 if self.shared else 0o600)
                sock.listen(64)
                sock.setblocking(False)
            except BaseException:
                sock.close()
                raise
        except BaseException:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        self._sock = sock
        self.loop.add_reader(sock.fileno(), self._on_accept)
        if self.shared:
            log.info("control socket %s is reachable by uids %s and gids %s too (mode 0666 in "
                     "a 0711 directory; SO_PEERCRED decides)", self.path,
                     sorted(self.allow_uids), sorted(self.allow_gids))

    def _take_lock(self) -> None:
        # The lock file, not the socket, decides who owns the path: no race between two
        # corrals that both find a stale socket.
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ControlSocketInUse(
                    f"another corral (pid {owner}) is already serving {self.path}; stop it "
                    "first, or give this one another socket (socket_name / --socket)") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _clear_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlSocketError(f"{self.path} exists and is not a socket; refusing to "
                                     "replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        probe.settimeout(1.0)
        try:
            probe.connect(self.path)
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("control socket %s is stale (no server behind it); replacing it",
                     self.path)
            os.unlink(self.path)
            return
        except OSError as exc:
            raise ControlSocketError(f"cannot check the existing socket {self.path}: {exc}"
                                     ) from None
        finally:
            probe.close()
        raise ControlSocketInUse(f"another server answers on {self.path}; refusing to start")

    def _on_accept(self) -> None:
        assert self._sock is not None
        for _ in range(16):
            try:
                conn, _addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("control: accept failed (%s)", exc)
                return
            conn.setblocking(False)
            try:
                peer = peer_credentials(conn)
            except OSError as exc:
                log.warning("control: no peer credentials (%s); closing", exc)
                conn.close()
                continue
            if not self.allowed(peer):
                self.refused += 1
                log.warning("control: refused a connection from pid %d uid %d gid %d: not the "
                            "owner, root, or in allow_uids/allow_gids", peer.pid, peer.uid,
                            peer.gid)
                self._refuse(conn, "forbidden",
                             f"uid {peer.uid} (gid {peer.gid}) may not use this corral: only "
                             f"uid {os.geteuid()}, root, and the configured allow_uids / "
                             "allow_gids may")
                continue
            if len(self._conns) >= self.max_connections and not self._evict_idle(peer):
                log.warning("control: refused pid %d: %d connections already open, none of "
                            "them idle", peer.pid, len(self._conns))
                self._refuse(conn, "busy", f"too many connections ({self.max_connections})")
                continue
            self._conns.add(_Connection(self, conn, peer))

    def _evict_idle(self, newcomer: Peer) -> bool:
        """Close the connection idle the longest to make room; False: none is idle.

        Without it, clients that connect and say nothing (a stuck script, a loop of `nc -U`)
        would hold every slot for ``idle_timeout`` and lock out `corral status` and `stop`.
        """
        idle = [c for c in self._conns if c.evictable]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c.idle_since or 0.0)
        log.info("control: closing the connection of pid %d (idle %.1fs) to make room for "
                 "pid %d: %d connections open", oldest.peer.pid,
                 time.monotonic() - (oldest.idle_since or 0.0), newcomer.pid,
                 len(self._conns))
        oldest.close()
        return True

    @staticmethod
    def _refuse(conn: socket.socket, code: str, message: str) -> None:
        try:
            conn.send(encode_frame(_error(None, code, message)), socket.MSG_DONTWAIT)
        except OSError:
            pass
        conn.close()

    def _forget(self, conn: _Connection) -> None:
        self._conns.discard(conn)

    @property
    def connections(self) -> int:
        return len(self._conns)

    def close(self) -> None:
        """Close every connection and the socket; remove the socket file if it is ours."""
        for conn in list(self._conns):
            conn.close()
        if self._sock is not None:
            self.loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            try:
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self._inode:
                    os.unlink(self.path)
            except OSError:
                pass
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
