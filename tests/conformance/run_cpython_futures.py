"""Run CPython's own concurrent.futures process-pool tests against corral.ProcessPoolExecutor.

The tests are the ``test.test_concurrent_futures`` package that ships with the Python running
this script (3.13 here); nothing of it is copied into this repository. The substitution is one
line: in a scratch virtual environment made for the run, a ``.pth`` file makes
``concurrent.futures.ProcessPoolExecutor`` resolve to ``corral.ProcessPoolExecutor`` (lazily,
as ``concurrent.futures`` itself resolves it), in this process and in every interpreter the
tests start (``assert_python_ok`` scripts, spawn and forkserver children).

Each start method runs in a process of its own, in a new session, with this script as the
child subreaper: whatever process is left once it has ended is reported (and killed) as a
leftover. A test that runs past ``--test-timeout`` dumps every thread's stack and ends the run
(a timeout). Tests that read CPython's private attributes are skipped; ``SKIPPED`` below says
why for each.

    python tests/conformance/run_cpython_futures.py [--methods fork,forkserver,spawn] [-v]

The interpreter running it must be able to import corral and its dependencies (a venv with
corral installed, or PYTHONPATH=src with psutil and setproctitle importable). Exit status 0
only if every method passed with no failure, error, timeout or leftover process.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import site
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
METHODS = ("fork", "forkserver", "spawn")
MODULES = ("test_process_pool", "test_deadlock", "test_init", "test_shutdown", "test_wait",
           "test_as_completed")

_PROCESSES = "reads executor._processes, the standard library's dict of worker processes"
_MANAGER = ("reads executor._executor_manager_thread (and _processes, _call_queue), the "
            "standard library's internal thread and queue")
# Test name -> why it is skipped. Every one reads a private attribute of CPython's executor.
SKIPPED = {
    "test_killed_child": (
        _PROCESSES + "; it also asserts that one killed worker breaks the whole pool, which is "
        "the documented difference (corral fails that worker's task with WorkerLost, a "
        "BrokenProcessPool, and carries on)"),
    "test_saturation": _PROCESSES,
    "test_idle_process_reuse_one": (
        _PROCESSES + ", to count processes started on demand; corral starts max_workers "
        "workers at the first submit (documented)"),
    "test_idle_process_reuse_multiple": (
        _PROCESSES + ", to count processes started on demand; corral starts max_workers "
        "workers at the first submit (documented)"),
    "test_max_tasks_per_child": (
        _PROCESSES + " (the recycling it checks is covered by tests/integration/test_futures.py)"),
    "test_traceback": (
        "checks that type(exc.__cause__) is concurrent.futures.process._RemoteTraceback, a "
        "private class; corral's cause is corral.RemoteTraceback with the same .tb and str() "
        "(covered by tests/integration/test_futures.py)"),
    "test_shutdown_deadlock_pickle": _MANAGER,
    "test_processes_terminate": _PROCESSES,
    "test_context_manager_shutdown": _PROCESSES,
    "test_del_shutdown": _MANAGER,
    "test_shutdown_no_wait": _MANAGER,
}
# Private attributes corral.ProcessPoolExecutor does have: plain data, read by some tests.
PROVIDED = ("_max_workers", "_mp_context", "_broken")

_SUBSTITUTE = '''\
"""The conformance run's one substitution (see tests/conformance/run_cpython_futures.py)."""
import concurrent.futures as _cf

_stdlib_getattr = _cf.__getattr__


def __getattr__(name):
    if name == "ProcessPoolExecutor":
        from corral import ProcessPoolExecutor

        _cf.ProcessPoolExecutor = ProcessPoolExecutor
        return ProcessPoolExecutor
    return _stdlib_getattr(name)


_cf.__getattr__ = __getattr__
'''

_PR_SET_CHILD_SUBREAPER = 36


# ------------------------------------------------------------------------------- the parent


def _make_venv(root: Path) -> Path:
    """A scratch venv whose interpreters see corral (as this one does) and the substitution."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip()
    dirs = [d for d in site.getsitepackages() if os.path.isdir(d)]
    lines = [f"import site; site.addsitedir({d!r})" for d in dirs]
    lines.append(str(REPO / "src"))  # corral itself, even when it is not installed here
    lines.append("import _corral_cpython_substitute")
    Path(purelib, "_corral_cpython_substitute.py").write_text(_SUBSTITUTE)
    Path(purelib, "_corral_cpython_conformance.pth").write_text("\n".join(lines) + "\n")
    return python


def _become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _leftovers() -> list[str]:
    """Kill and describe every process left below this one (orphans reparent to us)."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            found.append(f"pid {proc.pid}: {' '.join(proc.cmdline())[:120]}")
            proc.kill()
        except psutil.Error:
            continue
    for proc in psutil.Process().children(recursive=True):
        try:
            proc.wait(5)
        except psutil.Error:
            pass
    return found


def _run_method(python: Path, method: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    cmd = [str(python), "-X", "faulthandler", str(Path(__file__).resolve()), "--child", method,
           "--result", str(out), "--test-timeout", str(args.test_timeout)]
    if args.verbose:
        cmd.append("-v")
    if args.only:
        cmd += ["--only", args.only]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        rc = proc.wait(args.method_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    elapsed = time.monotonic() - t0
    try:
        result: dict[str, Any] = json.loads(out.read_text())
        timed_out = False
    except (OSError, ValueError):  # no result: a test hung (faulthandler ended the run)
        result = {"passed": 0, "failed": [], "errors": [], "skipped": {}}
        timed_out = True
    result.update(method=method, rc=rc, seconds=elapsed, timed_out=timed_out,
                  leftovers=_leftovers())
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--test-timeout", type=float, default=120.0,
                        help="seconds one test may take before the run is ended (a timeout)")
    parser.add_argument("--method-timeout", type=float, default=900.0)
    parser.add_argument("--only", help="run only the tests whose id contains this")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args)

    print(f"CPython {sys.version.split()[0]}'s test.test_concurrent_futures against "
          "corral.ProcessPoolExecutor", flush=True)
    _become_subreaper()
    results = []
    with tempfile.TemporaryDirectory(prefix="corral-conformance-") as tmp:
        python = _make_venv(Path(tmp))
        for method in args.methods.split(","):
            print(f"== {method}", flush=True)
            results.append(_run_method(python, method, args, Path(tmp) / f"{method}.json"))
    ok = True
    print("\nSkipped (they read CPython's private attributes), under every start method:")
    for name, why in SKIPPED.items():
        print(f"  {name}: {why}")
    print("Private attributes corral.ProcessPoolExecutor provides (plain data): "
          + ", ".join(PROVIDED))
    print()
    print(f"{'method':<11} {'passed':>6} {'failed':>6} {'errors':>6} {'skipped':>7} "
          f"{'timeout':>7} {'leftover':>8} {'seconds':>7}")
    for r in results:
        bad = r["failed"] or r["errors"] or r["timed_out"] or r["leftovers"] or r["rc"] != 0
        ok = ok and not bad
        print(f"{r['method']:<11} {r['passed']:>6} {len(r['failed']):>6} {len(r['errors']):>6} "
              f"{len(r['skipped']):>7} {'yes' if r['timed_out'] else 'no':>7} "
              f"{len(r['leftovers']):>8} {r['seconds']:>7.1f}")
        for what in ("failed", "errors"):
            for test in r[what]:
                print(f"    {what}: {test}")
        other = {t: why for t, why in r["skipped"].items() if t.split(".")[-1] not in SKIPPED}
        for test, why in other.items():
            print(f"    skipped by CPython's test itself: {test}: {why}")
        for line in r["leftovers"]:
            print(f"    leftover: {line}")
    total = sum(r["passed"] for r in results)
    failed = sum(len(r["failed"]) + len(r["errors"]) for r in results)
    skipped = sum(len(r["skipped"]) for r in results)
    print(f"\nconformance: {total} passed, {failed} failed, {skipped} skipped")
    return 0 if ok else 1


# -------------------------------------------------------------------------------- the child



def _child(args: argparse.Namespace) -> int:
    import concurrent.futures
    import faulthandler
    import importlib
    import unittest

    import corral

    if concurrent.futures.ProcessPoolExecutor is not corral.ProcessPoolExecutor:
        print("the substitution is not in place", file=sys.stderr)
        return 2
    from test.test_concurrent_futures import util

    mixin = {"fork": util.ProcessPoolForkMixin, "forkserver": util.ProcessPoolForkserverMixin,
             "spawn": util.ProcessPoolSpawnMixin}[args.child]
    loader = unittest.TestLoader()
    suite = unittest.TestSuite()
    for name in MODULES:
        module = importlib.import_module(f"test.test_concurrent_futures.{name}")
        for attr in dir(module):
            cls = getattr(module, attr)
            if not (isinstance(cls, type) and issubclass(cls, unittest.TestCase)):
                continue
            if issubclass(cls, mixin):
                tests = loader.loadTestsFromTestCase(cls)
            elif attr == "FailingInitializerResourcesTest" and args.child != "fork":
                tests = unittest.TestSuite([cls(f"test_{args.child}")])
            else:
                continue
            for test in tests:
                method = test.id().split(".")[-1]
                if args.only and args.only not in test.id():
                    continue
                if method in SKIPPED:
                    setattr(test, method, unittest.skip(SKIPPED[method])(getattr(test, method)))
                suite.addTest(test)

    timeout = args.test_timeout

    class Result(unittest.TextTestResult):
        def startTest(self, test: unittest.TestCase) -> None:
            # A hung test: every thread's stack (the test's name in it), then the run ends
            # (reported as a timeout).
            if args.verbose:
                print(f"\n[{test.id()}]", file=sys.stderr, flush=True)
            faulthandler.dump_traceback_later(timeout, exit=True)
            super().startTest(test)

        def stopTest(self, test: unittest.TestCase) -> None:
            faulthandler.cancel_dump_traceback_later()
            super().stopTest(test)

    runner = unittest.TextTestRunner(verbosity=2 if args.verbose else 1, resultclass=Result)
    result = runner.run(suite)
    summary = {
        "passed": result.testsRun - len(result.failures) - len(result.errors)
                  - len(result.skipped),
        "failed": [t.id() for t, _ in result.failures],
        "errors": [t.id() for t, _ in result.errors],
        "skipped": {t.id(): why for t, why in result.skipped},
    }
    Path(args.result).write_text(json.dumps(summary))
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
