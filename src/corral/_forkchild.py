"""A worker forked by a start template runs as multiprocessing's fork ``Popen`` runs its child.

The template (:mod:`corral._template`) forks its workers itself, so it also does what
``Popen._launch`` does in the child: the process's bootstrap (``BaseProcess._bootstrap``) and,
from Python 3.13, the child's atexit handlers around it. On the Pythons whose multiprocessing
it was checked against (3.11-3.13) the bootstrap is corral's own, the same steps minus those
that only write memory in a new process; elsewhere multiprocessing's own runs.
"""

from __future__ import annotations

import atexit
import itertools
import sys
import threading
from multiprocessing import context as mp_context
from multiprocessing import process as mp_process
from multiprocessing import util as mp_util
from typing import Any

__all__ = ["run_forked"]


def run_forked(proc: Any, sentinel: int) -> int:
    """In a worker the template forked: run ``proc`` as multiprocessing's fork ``Popen`` runs
    its child (its ``_bootstrap`` and, from Python 3.13, the atexit handlers around it); the
    exit code is returned."""
    if _ATEXIT_IN_CHILD:
        atexit._clear()
        atexit.register(mp_util._exit_function)  # type: ignore[attr-defined]
    try:
        if _OWN_BOOTSTRAP and _unpatched(type(proc)):
            return _bootstrap(proc, sentinel)
        return int(proc._bootstrap(parent_sentinel=sentinel))
    finally:
        if _ATEXIT_IN_CHILD:
            atexit._run_exitfuncs()


# Since Python 3.13 multiprocessing's fork Popen runs the child's atexit handlers (its exit
# function among them, no longer called by the bootstrap).
_ATEXIT_IN_CHILD = sys.version_info >= (3, 13)
# What _bootstrap uses of multiprocessing's and threading's insides, as of Python 3.11-3.13;
# on any other version, or if one is missing, multiprocessing's own bootstrap runs.
_OWN_BOOTSTRAP = sys.version_info[:2] <= (3, 13) and all(
    hasattr(module, name) for module, names in (
        (mp_context, ("_concrete_contexts", "_default_context", "_force_start_method")),
        (mp_process, ("_process_counter", "_children", "_current_process", "_parent_process",
                      "_ParentProcess")),
        (mp_util, ("_finalizer_registry", "_afterfork_registry", "_run_after_forkers",
                   "_close_stdin", "_exit_function", "_flush_std_streams", "info")),
        (threading, ("_shutdown", "_HAVE_THREAD_NATIVE_ID")),
        (atexit, ("_clear", "_run_exitfuncs")),
    ) for name in names)


def _unpatched(cls: type) -> bool:
    """Whether ``cls`` bootstraps with multiprocessing's own methods (a tool that wraps them,
    coverage.py say, or a subclass that overrides them, must have its version run)."""
    return all(getattr(getattr(cls, name, None), "__module__", None) == "multiprocessing.process"
               for name in ("_bootstrap", "_after_fork"))


def _bootstrap(proc: Any, sentinel: int) -> int:
    """``proc._bootstrap(parent_sentinel=sentinel)``: the same steps, minus those that would
    only write memory here (an import statement run in a function, forcing the start method
    this process already has, clearing registries that are empty). Each page a new process
    writes costs it a copy-on-write fault (~3 us on a virtual machine): this saves each
    worker ~0.1 ms of CPU, most of the bootstrap's own."""
    code = 1
    try:
        method = proc._start_method
        if method is not None and (mp_context._default_context._actual_context  # type: ignore[attr-defined]
                                   is not mp_context._concrete_contexts[method]):  # type: ignore[attr-defined]
            mp_context._force_start_method(method)
        mp_process._process_counter = itertools.count(1)  # type: ignore[attr-defined]
        mp_process._children = set()  # type: ignore[attr-defined]
        if sys.stdin is not None:
            mp_util._close_stdin()  # type: ignore[attr-defined]
        previous = mp_process._current_process  # type: ignore[attr-defined]
        mp_process._current_process = proc  # type: ignore[attr-defined]
        mp_process._parent_process = mp_process._ParentProcess(  # type: ignore[attr-defined]
            proc._parent_name, proc._parent_pid, sentinel)
        if threading._HAVE_THREAD_NATIVE_ID:  # type: ignore[attr-defined]
            threading.main_thread()._set_native_id()  # type: ignore[attr-defined]
        try:
            if mp_util._finalizer_registry:  # type: ignore[attr-defined]
                mp_util._finalizer_registry.clear()  # type: ignore[attr-defined]
            if len(mp_util._afterfork_registry):  # type: ignore[attr-defined]
                mp_util._run_after_forkers()  # type: ignore[attr-defined]
        finally:
            del previous  # freed after the after-forkers ran, as multiprocessing does
        mp_util.info("child process calling self.run()")
        try:
            proc.run()
            code = 0
        finally:
            if not _ATEXIT_IN_CHILD:
                mp_util._exit_function()  # type: ignore[attr-defined]
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except BaseException:
        code = 1  # (the run may have returned, then the exit function raised)
        import traceback

        sys.stderr.write(f"Process {proc.name}:\n")
        traceback.print_exc()
    finally:
        threading._shutdown()  # type: ignore[attr-defined]
        mp_util.info("process exiting with exitcode %d", code)
        mp_util._flush_std_streams()  # type: ignore[attr-defined]
    return code


def _exit_code(value: object) -> int:
    """A worker's exit code for ``SystemExit(value)``, as multiprocessing gives it."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    sys.stderr.write(str(value) + "\n")
    return 1
