"""The worker side of :class:`corral.ProcessPool`: run one task at a time, reply, repeat.

It runs inside :func:`corral._bootstrap.run_worker` (process group, parent-death protection,
stack-dump handler), so it only speaks the protocol. Frames use multiprocessing's Connection
framing on the worker's own socket; the pool's manager thread reads and writes the other end
without blocking.

    pool -> worker:  pickle((fn, args, kwargs))     a task
                     b"" (an empty frame)           quit
    worker -> pool:  pickle(("h",))                 ready for tasks (the initializer ran)
                     pickle(("i", text))            the initializer failed (exit follows)
                     pickle(("r", value))           the task's result
                     pickle(("e", exc, text))       the task raised exc; text is its traceback
                     pickle(("u", text, tb))        the task ended, but its result or exception
                                                    could not be sent (or the task could not be
                                                    unpickled here); tb may be ""
"""

from __future__ import annotations

import pickle
import traceback
from collections.abc import Callable, Iterable
from multiprocessing.connection import Connection
from typing import Any

_PROTOCOL = pickle.HIGHEST_PROTOCOL


def _safe_str(obj: object) -> str:
    try:
        return str(obj)
    except Exception:
        return f"<{type(obj).__name__} whose str() failed>"


def _error_frame(exc: BaseException) -> bytes:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        frame = pickle.dumps(("e", exc, text), _PROTOCOL)
        # An exception that pickles but cannot be rebuilt (a custom __init__ with required
        # arguments it does not pass on) would only fail in the parent: find out here.
        pickle.loads(frame)
    except BaseException as perr:
        return pickle.dumps(("u", (
            f"the task raised {type(exc).__name__}: {_safe_str(exc)}, which could not be "
            f"pickled to send it back ({type(perr).__name__}: {_safe_str(perr)})"), text),
            _PROTOCOL)
    return frame


def main(index: int, conn: Connection, initializer: Callable[..., Any] | None,
         initargs: tuple[Any, ...]) -> None:
    """The worker loop (``run_worker``'s target)."""
    del index  # the slot number is in the process title already
    if initializer is not None:
        try:
            initializer(*initargs)
        except BaseException:
            text = traceback.format_exc()
            try:
                conn.send_bytes(pickle.dumps(("i", text), _PROTOCOL))
            except OSError:
                pass
            raise SystemExit(1) from None
    recv, send = conn.recv_bytes, conn.send_bytes
    loads, dumps = pickle.loads, pickle.dumps
    send(dumps(("h",), _PROTOCOL))
    while True:
        try:
            data = recv()
        except EOFError:
            return
        if not data:
            return  # quit
        try:
            fn, args, kwargs = loads(data)
        except BaseException as exc:
            send(dumps(("u", (
                f"the task could not be unpickled in the worker ({type(exc).__name__}: "
                f"{_safe_str(exc)}); its function and arguments must be importable there: "
                "module-level, from a module the worker can import"), ""), _PROTOCOL))
            continue
        del data
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            send(_error_frame(exc))
            continue
        finally:
            del fn, args, kwargs
        try:
            out = dumps(("r", result), _PROTOCOL)
        except BaseException as exc:
            out = dumps(("u", (
                f"the task's result ({type(result).__name__}) could not be pickled to send it "
                f"back ({type(exc).__name__}: {_safe_str(exc)})"), ""), _PROTOCOL)
        del result
        send(out)
        del out


def run_chunk(fn: Callable[..., Any], chunk: Iterable[tuple[Any, ...]]) -> list[Any]:
    """One task of ``ProcessPool.map(..., chunksize=n)``: ``fn`` over a chunk of argument tuples."""
    return [fn(*args) for args in chunk]
