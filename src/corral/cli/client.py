"""A blocking client for corral's control socket (the protocol is in :mod:`corral._control`)."""

from __future__ import annotations

import errno
import itertools
import os
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from corral._control import (
    MAX_MESSAGE,
    PROTOCOL_VERSION,
    FrameDecoder,
    ProtocolError,
    encode_frame,
)
from corral.errors import CorralError

__all__ = [
    "ControlClient",
    "ControlError",
    "Frame",
    "NotRunning",
    "PermissionDenied",
    "RemoteError",
]


class ControlError(CorralError):
    """Talking to a running corral failed."""


class NotRunning(ControlError):
    """No corral answers on the socket (missing, or a stale socket file)."""


class PermissionDenied(ControlError):
    """The socket refused us (file permissions, or corral's SO_PEERCRED check)."""


class RemoteError(ControlError):
    """corral answered with an error frame.

    Attributes:
        code: the error code (see corral._control.ERROR_CODES, or a command's own).
    """

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Frame:
    """One frame of a streamed reply."""

    data: Any
    dropped: int = 0  # items lost before this one because we read too slowly
    last: bool = False


class ControlClient:
    """Connects on first use; one request at a time.

    Args:
        path: the control socket.
        timeout: seconds to wait for connect and for each reply (not for stream frames).
    """

    def __init__(self, path: str, timeout: float | None = 10.0,
                 max_message: int = MAX_MESSAGE) -> None:
        self.path = path
        self.timeout = timeout
        self.max_message = max_message
        self._sock: socket.socket | None = None
        self._decoder = FrameDecoder(max_message)
        self._frames: list[dict[str, Any]] = []
        self._ids = itertools.count(1)

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def connect(self) -> None:
        if self._sock is not None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            what = "no socket there" if isinstance(exc, FileNotFoundError) else \
                "a stale socket, nobody listening"
            raise NotRunning(f"corral is not running at {self.path} ({what}); start it with "
                             "`corral run`, or point --socket at the right one") from None
        except PermissionError:
            sock.close()
            raise PermissionDenied(
                f"permission denied on {self.path}: it belongs to uid "
                f"{_owner(self.path)}; ask them to add uid {os.geteuid()} to allow_uids "
                "(or run as that user)") from None
        except TimeoutError:
            sock.close()
            raise ControlError(f"connecting to {self.path} timed out after {self.timeout}s"
                               ) from None
        except OSError as exc:
            sock.close()
            raise ControlError(f"cannot connect to {self.path}: {exc}") from None
        self._sock = sock

    def _send(self, command: str, args: Mapping[str, Any] | None) -> int:
        self.connect()
        assert self._sock is not None
        rid = next(self._ids)
        frame = {"v": PROTOCOL_VERSION, "id": rid, "command": command, "args": dict(args or {})}
        try:
            self._sock.sendall(encode_frame(frame, self.max_message))
        except ProtocolError as exc:
            raise ControlError(f"request {command!r} is too large: {exc}") from None
        except OSError as exc:
            # The server may have refused us and hung up already: its reason is waiting.
            self._raise_pending_error()
            self.close()
            if exc.errno in (errno.EPIPE, errno.ECONNRESET):  # a `top` or `-f` outliving it
                raise ControlError(f"corral at {self.path} closed the connection (it stopped, "
                                   "or refused us)") from None
            raise ControlError(f"sending {command!r} to {self.path} failed: {exc}") from None
        return rid

    def _raise_pending_error(self) -> None:
        assert self._sock is not None
        try:
            self._sock.settimeout(0.5)
            data = self._sock.recv(65536)
            frames = self._decoder.feed(data) if data else []
        except (OSError, ProtocolError):
            return
        for frame in frames:
            if frame.get("status") == "error":
                self.close()
                self._check(frame)

    def _next(self, rid: int, timeout: float | None) -> dict[str, Any]:
        assert self._sock is not None
        self._sock.settimeout(timeout)
        while True:
            for i, frame in enumerate(self._frames):
                if frame.get("id") in (rid, None):
                    del self._frames[i]
                    return frame
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                raise ControlError(f"no reply from corral at {self.path} within {timeout}s"
                                   ) from None
            except OSError as exc:
                if exc.errno == errno.ECONNRESET:
                    data = b""
                else:
                    raise ControlError(f"reading from {self.path} failed: {exc}") from None
            if not data:
                self.close()
                raise ControlError(f"corral at {self.path} closed the connection (it stopped, "
                                   "or refused us)")
            try:
                self._frames.extend(self._decoder.feed(data))
            except ProtocolError as exc:
                self.close()
                raise ControlError(f"bad reply from {self.path}: {exc}") from None

    @staticmethod
    def _check(frame: dict[str, Any]) -> None:
        if frame.get("v") != PROTOCOL_VERSION:
            raise ControlError(f"corral speaks protocol version {frame.get('v')!r}; this "
                               f"client speaks {PROTOCOL_VERSION}")
        if frame.get("status") == "error":
            err = frame.get("error") or {}
            code = str(err.get("code", "error"))
            message = str(err.get("message", "unknown error"))
            if code == "forbidden":
                raise PermissionDenied(message)
            raise RemoteError(message, code)
        if frame.get("status") != "ok":
            raise ControlError(f"bad reply status {frame.get('status')!r}")

    def call(self, command: str, args: Mapping[str, Any] | None = None) -> Any:
        """Send one command and return its ``data``; raise on an error frame."""
        rid = self._send(command, args)
        frame = self._next(rid, self.timeout)
        self._check(frame)
        if frame.get("more"):
            raise ControlError(f"{command!r} streams its reply; use stream()")
        return frame.get("data")

    def stream(self, command: str, args: Mapping[str, Any] | None = None
               ) -> Iterator[Frame]:
        """Send a streaming command now; iterate its frames until the end frame.

        The first frame is awaited with ``timeout``, later ones without a limit.
        """
        rid = self._send(command, args)
        return self._frames_of(rid)

    def _frames_of(self, rid: int) -> Iterator[Frame]:
        first = True
        while True:
            frame = self._next(rid, self.timeout if first else None)
            first = False
            self._check(frame)
            last = not frame.get("more")
            yield Frame(frame.get("data"), int(frame.get("dropped", 0)), last)
            if last:
                return


def _owner(path: str) -> str:
    try:
        return str(os.stat(os.path.dirname(path)).st_uid)
    except OSError:
        return "another user"
