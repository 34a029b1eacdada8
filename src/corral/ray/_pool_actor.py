"""The Ray actor that is one worker of ``ProcessPool(backend="ray")``: runs tasks, one at a time.

Its replies are the local pool's wire messages (:class:`~corral.pool._wire.WireKind`), pickled
by the actor itself and sent back as bytes, so the driver reads them as the local manager does
(:func:`corral.pool._replies.interpret`): a task's exception keeps its own type, with its
traceback in the worker, and a result or exception that cannot be pickled, or unpickled in the
driver, fails that task alone while the actor lives on.

Pickling is Ray's cloudpickle: functions defined in ``__main__`` or tests travel by value, as
they do in any Ray program.

Three concurrency groups, one thread each: the default one runs ``boot()`` and ``run()``;
"ctl" answers ``stacks()`` while a task runs (the evidence of a task past its timeout);
"watch" holds ``watch()``, a call that never returns, so the driver learns of the actor's death
whenever it happens, idle or busy (Ray fails a pending call of a dead actor within
milliseconds). This module imports no Ray until :func:`pool_actor_class` is called.
"""

from __future__ import annotations

import os
import pickle
import threading
import traceback
from typing import Any

from corral.pool._wire import WireKind
from corral.ray._actor import thread_stacks

__all__ = ["WATCH_GROUP", "pool_actor_class"]

WATCH_GROUP = "watch"

_HELLO, _INIT_FAILED, _RESULT, _RAISED, _UNPICKLABLE, _UNDECODABLE = (
    str(k.value) for k in (WireKind.HELLO, WireKind.INIT_FAILED, WireKind.RESULT,
                           WireKind.RAISED, WireKind.UNPICKLABLE, WireKind.UNDECODABLE))


def _dumps(obj: Any) -> bytes:
    from ray import cloudpickle

    return cloudpickle.dumps(obj, pickle.HIGHEST_PROTOCOL)  # type: ignore[no-any-return,no-untyped-call]


def _safe_str(obj: object) -> str:
    try:
        return str(obj)
    except BaseException:
        return f"<{type(obj).__name__} whose str() failed>"


def _tb(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def _unpicklable(text: str, tb: str, err: BaseException) -> bytes:
    try:
        return _dumps((_UNPICKLABLE, text, tb, err))
    except BaseException:
        return _dumps((_UNPICKLABLE, text, tb, None))


def _raised(exc: BaseException) -> bytes:
    text = _tb(exc)
    try:
        frame = _dumps((_RAISED, exc, text))
        pickle.loads(frame)  # one that pickles but cannot be rebuilt fails here, not there
    except BaseException as perr:
        return _unpicklable(
            f"the task raised {type(exc).__name__}: {_safe_str(exc)}, which could not be "
            f"pickled to send it back ({type(perr).__name__}: {_safe_str(perr)})", text, perr)
    return frame


def _result(value: Any) -> bytes:
    try:
        return _dumps((_RESULT, value))
    except Exception as exc:
        return _unpicklable(
            f"the task's result ({type(value).__name__}) could not be pickled to send it back "
            f"({type(exc).__name__}: {_safe_str(exc)})", _tb(exc), exc)
    except BaseException as exc:  # SystemExit from a __reduce__: the task's outcome, as raised
        return _raised(exc)


class PoolActor:
    """One pool worker, as the body of a Ray actor (see :func:`pool_actor_class`)."""

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._run_thread = 0

    def boot(self, initializer: Any, initargs: tuple[Any, ...]) -> tuple[int, str, bytes]:
        """Run the initializer: ``(pid, node id, frame)``, the frame HELLO or INIT_FAILED."""
        if initializer is not None:
            try:
                initializer(*initargs)
            except BaseException as exc:
                text = _tb(exc)
                try:
                    frame = _dumps((_INIT_FAILED, text, exc))
                    pickle.loads(frame)
                except BaseException:
                    frame = _dumps((_INIT_FAILED, text, None))
                return self._pid, "", frame
        node = ""
        try:
            import ray

            node = str(ray.get_runtime_context().get_node_id())
        except Exception:  # only used to decide whether the pid is on the driver's machine
            pass
        return self._pid, node, _dumps((_HELLO,))

    def run(self, payload: bytes) -> bytes:
        """Run one task, ``(fn, args, kwargs)`` pickled by the driver; its reply frame."""
        try:
            fn, args, kwargs = pickle.loads(payload)
        except BaseException as exc:  # SystemExit from a __reduce__ too: the worker carries on
            return _dumps((_UNDECODABLE, (
                f"the task could not be unpickled in the worker ({type(exc).__name__}: "
                f"{_safe_str(exc)}); its function and arguments must be importable there, or "
                "sent by value (Ray's runtime_env, or cloudpickle.register_pickle_by_value)"),
                _tb(exc)))
        del payload
        self._run_thread = threading.get_ident()
        try:
            value = fn(*args, **kwargs)
        except BaseException as exc:  # SystemExit and KeyboardInterrupt are outcomes too
            return _raised(exc)
        finally:
            self._run_thread = 0
            del fn, args, kwargs
        return _result(value)

    def watch(self) -> None:
        """Never returns: its failure tells the driver the actor has ended."""
        threading.Event().wait()

    def stacks(self) -> str:
        """Every other thread's Python stack (the evidence of a task past its timeout)."""
        return thread_stacks(self._run_thread, "the task")


_actor_class: Any = None


def pool_actor_class() -> Any:
    """``ray.remote(PoolActor)``, made once: no restarts and no retries by Ray (corral
    replaces workers and retries tasks itself), ``stacks`` in the "ctl" group."""
    global _actor_class
    if _actor_class is None:
        import ray

        from corral.ray._actor import CTL_GROUP

        ray.method(concurrency_group=CTL_GROUP)(PoolActor.stacks)
        ray.method(concurrency_group=WATCH_GROUP)(PoolActor.watch)
        remote: Any = ray.remote  # its stubs do not know concurrency_groups
        _actor_class = remote(concurrency_groups={CTL_GROUP: 1, WATCH_GROUP: 1},
                              max_restarts=0, max_task_retries=0)(PoolActor)
    return _actor_class
