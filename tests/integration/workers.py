"""Worker targets for the integration tests.

They live at module level so that spawn and forkserver children can import them (tests/ and this
directory are on ``sys.path``, which multiprocessing passes on to its children). Every target takes
``index`` first, as corral calls ``target(index, *args)``.

Coordination with the test goes through files in a per-test directory (``flagdir``) and through
``corral.ready()``, never through timing.
"""

from __future__ import annotations

import ctypes
import faulthandler
import json
import os
import resource
import signal
import sys
import time
from pathlib import Path

import corral


def _forever() -> None:
    while True:
        time.sleep(3600)


def _no_core_dumps() -> None:
    # A deliberate segfault must not litter the working directory with core files.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def sleeper(index: int) -> None:
    """Run until killed (default SIGTERM disposition)."""
    _forever()


def graceful(index: int) -> None:
    """Exit 0 on SIGTERM, as a well-behaved server does."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    corral.ready()
    _forever()


def ignore_sigterm(index: int) -> None:
    """Ignore SIGTERM; signal readiness only once the disposition is in place."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    corral.ready()
    _forever()


def crash_at_once(index: int, code: int = 1) -> None:
    """Exit at once: a crash loop."""
    os._exit(code)


def crash_if(index: int, crashing: int = 0, code: int = 1) -> None:
    """Worker ``crashing`` exits at once every time; the others run until SIGTERM."""
    if index == crashing:
        os._exit(code)
    sleeper(index)


def slow_ready(index: int, delay: float = 0.05) -> None:
    """Boot for ``delay`` seconds, then report readiness; exit 0 on SIGTERM."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    time.sleep(delay)
    corral.ready()
    _forever()


def hang_holding_gil(index: int) -> None:
    """Boot, then hang in native code without releasing the GIL (no Python thread can run)."""
    corral.ready()
    ctypes.PyDLL(None).sleep(3600)  # PyDLL keeps the GIL held during the call


def _do_fault(fault: str) -> None:
    if fault == "exit0":
        sys.exit(0)
    elif fault == "exit1":
        sys.exit(1)
    elif fault == "segfault":
        _no_core_dumps()
        faulthandler.disable()  # inherited from pytest under fork: spare the log a traceback
        ctypes.string_at(0)  # a real invalid read in native code: SIGSEGV
    elif fault == "exception":
        raise RuntimeError("deliberate failure in the worker target")
    elif fault == "wait":
        corral.ready()  # the test applies the fault from outside (a signal)
        _forever()
    else:
        raise ValueError(f"unknown fault {fault!r}")


def fault_once(index: int, fault: str, flagdir: str, faulty_index: int = 0) -> None:
    """Worker ``faulty_index`` commits ``fault`` in its first life only; the others just run.

    Before the fault it writes its pid to ``flagdir/fault-<index>`` so the test knows which
    process failed; its replacement finds the file and runs normally.
    """
    if index == faulty_index:
        flag = Path(flagdir) / f"fault-{index}"
        if not flag.exists():
            tmp = flag.with_suffix(".tmp")
            tmp.write_text(str(os.getpid()))
            tmp.rename(flag)  # atomic: the test never reads a half-written pid
            _do_fault(fault)
    corral.ready()
    _forever()


def with_grandchild(index: int, flagdir: str) -> None:
    """Fork a grandchild that ignores SIGTERM; exit 0 on SIGTERM, leaving it behind.

    The grandchild's pid goes to ``flagdir/grandchild-<index>-<worker pid>``; readiness is
    reported only once the grandchild ignores SIGTERM, so a stop cannot race its set-up.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            os.write(w, b"x")
            os.close(w)
            while True:
                time.sleep(3600)
        finally:
            os._exit(0)
    os.close(w)
    os.read(r, 1)
    os.close(r)
    path = Path(flagdir) / f"grandchild-{index}-{os.getpid()}"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(str(pid))
    tmp.rename(path)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    corral.ready()
    _forever()


def report_identity(index: int, outdir: str) -> None:
    """Writes who and where it runs (uid, gids, cwd, umask, an env var, its parent-death
    signal) to outdir/identity-<index>.txt, then beats until stopped. Imports nothing after
    the switch: here the interpreter lives under /root, which ``nobody`` cannot read."""
    libc = ctypes.CDLL(None, use_errno=True)
    sig = ctypes.c_int(0)
    libc.prctl(2, ctypes.byref(sig), 0, 0, 0)  # PR_GET_PDEATHSIG
    mask = os.umask(0)
    os.umask(mask)
    data = {"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid(),
            "groups": sorted(os.getgroups()), "cwd": os.getcwd(), "umask": mask,
            "env": os.environ.get("CORRAL_TEST_VAR"), "home": os.environ.get("HOME"),
            "pdeathsig": sig.value, "pgid": os.getpgid(0)}
    path = Path(outdir) / f"identity-{index}.txt"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.rename(path)
    corral.ready()
    while True:
        corral.beat()
        time.sleep(0.05)
