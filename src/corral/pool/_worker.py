"""The worker side of :class:`corral.ProcessPool`: run one task at a time, reply, repeat.

It runs inside :func:`corral._bootstrap.run_worker` (process group, parent-death protection,
stack-dump handler), so it only speaks the protocol of :mod:`corral.pool._wire`, over its own
socket with ``multiprocessing.Connection``'s framing; the pool's manager thread reads and writes
the other end without blocking. It imports nothing of the pool but the wire's vocabulary.
"""

from __future__ import annotations

import pickle
import traceback
from collections.abc import Callable, Iterable
from multiprocessing.connection import Connection
from typing import Any

from corral.pool._wire import WireKind

_PROTOCOL = pickle.HIGHEST_PROTOCOL
# Plain one-character strs, looked up once (they are pickled into every reply).
_HELLO, _INIT_FAILED, _RESULT, _RAISED, _UNPICKLABLE, _UNDECODABLE = (
    str(k.value) for k in (WireKind.HELLO, WireKind.INIT_FAILED, WireKind.RESULT,
                           WireKind.RAISED, WireKind.UNPICKLABLE, WireKind.UNDECODABLE))


def _safe_str(obj: object) -> str:
    try:
        return str(obj)
    except Exception:
        return f"<{type(obj).__name__} whose str() failed>"


def _error_frame(exc: BaseException) -> bytes:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        frame = pickle.dumps((_RAISED, exc, text), _PROTOCOL)
        # An exception that pickles but cannot be rebuilt (a custom __init__ with required
        # arguments it does not pass on) would only fail in the parent: find out here.
        pickle.loads(frame)
    except BaseException as perr:
        return _unpicklable_frame(
            f"the task raised {type(exc).__name__}: {_safe_str(exc)}, which could not be "
            f"pickled to send it back ({type(perr).__name__}: {_safe_str(perr)})", text, perr)
    return frame


def _unpicklable_frame(text: str, tb: str, err: BaseException) -> bytes:
    try:
        return pickle.dumps((_UNPICKLABLE, text, tb, err), _PROTOCOL)
    except BaseException:
        return pickle.dumps((_UNPICKLABLE, text, tb, None), _PROTOCOL)


def _result_frame(result: Any) -> bytes:
    try:
        return pickle.dumps((_RESULT, result), _PROTOCOL)
    except Exception as exc:
        return _unpicklable_frame(
            f"the task's result ({type(result).__name__}) could not be pickled to send it "
            f"back ({type(exc).__name__}: {_safe_str(exc)})",
            "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)), exc)
    except BaseException as exc:  # SystemExit from a __reduce__: the task's outcome, as raised
        return _error_frame(exc)


def main(index: int, conn: Connection, initializer: Callable[..., Any] | None,
         initargs: tuple[Any, ...], init_logger: str | None = None) -> None:
    """The worker loop (``run_worker``'s target).

    ``init_logger``: a logger that an initializer's failure is also logged to, in the worker
    (``concurrent.futures`` for the drop-in executor, as the standard library does).
    """
    del index  # the slot number is in the process title already
    if initializer is not None:
        try:
            initializer(*initargs)
        except BaseException as exc:
            text = traceback.format_exc()
            if init_logger is not None:
                import logging

                logging.getLogger(init_logger).critical("Exception in initializer:",
                                                        exc_info=True)
            try:
                try:
                    frame = pickle.dumps((_INIT_FAILED, text, exc), _PROTOCOL)
                    pickle.loads(frame)
                except BaseException:
                    frame = pickle.dumps((_INIT_FAILED, text, None), _PROTOCOL)
                conn.send_bytes(frame)
            except OSError:
                pass
            raise SystemExit(1) from None
    recv, send = conn.recv_bytes, conn.send_bytes
    loads = pickle.loads
    send(pickle.dumps((_HELLO,), _PROTOCOL))
    while True:
        try:
            data = recv()
        except EOFError:
            return
        if not data:
            return  # quit
        try:
            fn, args, kwargs = loads(data)
        except BaseException as exc:  # SystemExit from a __reduce__ too: the worker carries on
            send(pickle.dumps((_UNDECODABLE, (
                f"the task could not be unpickled in the worker ({type(exc).__name__}: "
                f"{_safe_str(exc)}); its function and arguments must be importable there: "
                "module-level, from a module the worker can import"),
                "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))),
                _PROTOCOL))
            continue
        del data
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            send(_error_frame(exc))
            continue
        finally:
            del fn, args, kwargs
        out = _result_frame(result)
        del result
        send(out)
        del out


def run_chunk(fn: Callable[..., Any], chunk: Iterable[tuple[Any, ...]]) -> list[Any]:
    """One task of ``ProcessPool.map(..., chunksize=n)``: ``fn`` over a chunk of argument tuples."""
    return [fn(*args) for args in chunk]
