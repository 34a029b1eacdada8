"""A supervising program in its own process, for the hardening tests that kill it, fork it or
let it exit abruptly.

Usage: python _hardening_script.py MODE START_METHOD FLAGDIR [N]

Modes:
  native-wait   a Supervisor whose workers each start ``sleep 600``; prints the worker pids as a
                JSON line once every worker is ready, then waits to be killed.
  duck-exit     WorkerProcessManager, the same workers; prints the pids, then does what Duck's
                App.stop() does: stop(graceful=True, wait=False) and os._exit(0).
  fork-child    a Supervisor, then os.fork(): the child calls status() and stop() (which must
                raise RuntimeError at once) and exits normally (atexit must not block); the
                parent prints a JSON line with what the child saw, stops its pool and exits.
  fork-compat   the same with a WorkerProcessManager.
  pool-wait     a ProcessPool whose running tasks each start a grandchild; prints their pids,
                then waits to be killed.
  fork-pool     a ProcessPool, then os.fork(): like fork-child.
  logs          a WorkerProcessManager with logging not configured (the default), one worker
                killed and replaced, then stop(): Duck's lines must reach stderr.
  logs-config   the same after logging.basicConfig(level=WARNING).
  killed-at-start  a Supervisor of N fork workers whose worker 1 starts a grandchild and
                SIGKILLs this process at once (see hardening_workers).
  emfile        a Supervisor whose process runs out of fds just as a worker dies (logging not
                configured, as in a program that never set it up); then the fds are freed:
                the pool must be alive and restart the worker. Prints {"ok", "ping",
                "workers"}.
  pids-full     (inside a pids cgroup) a Supervisor with health checks and memory readings
                whose worker 0 takes every pid: no thread can be started for a while; the pool
                must live on. Prints {"ping_full", "ping", "restarts", "checked_1"}.
  quiet-exit    WorkerProcessManager(enable_logs=False) of N workers that ignore SIGTERM;
                prints their pids, then exits without stop(): the stop at exit (SIGKILL after
                the grace) must stay as silent as an explicit stop().
  hung-check-exit  WorkerProcessManager whose health check never returns; once it hangs,
                stop(), print {"stopped_after"}, exit: the exit must not wait for the check.
  fork-forkserver  a forkserver ProcessPool, then os.fork(): the child makes a forkserver pool
                of its own and runs a task (the parent's server is not its child); prints
                {"child", "child_exit", "parent"}.
  atfork-lock   a lock of the program's made fork-safe with os.register_at_fork, held by a
                thread that logs through a corral logger in a loop, beside a crash-looping fork
                pool: restarts must go on (a fork waits for that lock). Prints {"restarts"}.
  fork-mask     a fork pool under a program whose SIGTERM handler writes a file: an at-fork
                hook records the signal mask each child is born with, the target what it
                starts with; one worker is killed and replaced, then stop(). Prints
                {"main", "workers"}.
  stop-in-handler  the main thread logs (its own records) in a loop through a file handler
                that the pool's records go through too; a SIGTERM handler calls
                stop(timeout=1) while workers crash and restart. Prints {"stop_took"}.
  locked-console  Duck's console: sys.stderr/stdout writes under one lock of the program's;
                N kills, each replacement must get past its first print within 10 s (a fork
                during corral's own log write would leave it stuck on that lock). Prints
                {"stuck": [...], "workers": [...]}.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path


def _wait_files(flagdir: Path, prefix: str, n: int, timeout: float = 30.0) -> list[Path]:
    deadline = time.monotonic() + timeout
    while True:
        found = sorted(p for p in flagdir.iterdir()
                       if p.name.startswith(prefix) and not p.name.endswith(".tmp"))
        if len(found) >= n:
            return found
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {n} {prefix} files")
        time.sleep(0.01)


def _report(flagdir: Path, n: int, worker_pids: list[int]) -> None:
    files = _wait_files(flagdir, "gc-", n)
    grandchildren = [int(p.read_text()) for p in files]
    print(json.dumps({"workers": worker_pids, "grandchildren": grandchildren}), flush=True)


def main() -> None:
    import hardening_workers as hw

    import corral

    mode, method, flagdir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    n = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    if mode == "native-wait":
        sup = corral.Supervisor(hw.with_sleep_child, workers=n, args=lambda i: (str(flagdir),),
                                start_method=method, ready_when="ready")
        sup.start()
        sup.wait_ready(timeout=30)
        _report(flagdir, n, sup.pids())
        threading.Event().wait()
    elif mode == "duck-exit":
        manager = corral.WorkerProcessManager(
            hw.duck_with_sleep_child, n, args_fn=lambda idx: (str(flagdir),),
            start_method=method, enable_logs=False)
        manager.start()
        _report(flagdir, n, manager.running_pids())
        manager.stop(graceful=True, wait=False)
        os._exit(0)
    elif mode == "pool-wait":
        pool = corral.ProcessPool(n, start_method=method, spare_workers=0)
        futures = [pool.submit(hw.task_with_sleep_child, str(flagdir)) for _ in range(n)]
        _report(flagdir, n, list(pool.worker_pids()))
        del futures
        threading.Event().wait()
    elif mode in ("fork-child", "fork-compat", "fork-pool"):
        if mode == "fork-pool":
            pool = corral.ProcessPool(1, start_method=method)
            pool.submit(abs, -1).result(timeout=30)
            calls = {"submit": lambda: pool.submit(abs, -2), "shutdown": pool.shutdown,
                     "worker_pids": pool.worker_pids, "spare_pids": pool.spare_pids,
                     "stats": pool.stats}
        elif mode == "fork-child":
            sup = corral.Supervisor(hw.exits_on_sigterm, workers=1, start_method=method)
            sup.start()
            calls = {"status": sup.status, "stop": sup.stop, "scale": lambda: sup.scale(2),
                     "running": lambda: _false(sup.running)}
        else:
            manager = corral.WorkerProcessManager(hw.sleep_duck, 1, start_method=method,
                                                  enable_logs=False)
            manager.start()
            calls = {"status": manager.status, "stop": manager.stop,
                     "running_pids": manager.running_pids,
                     "running": lambda: _false(manager.running)}
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            seen = {}
            for name, call in calls.items():
                try:
                    call()
                    seen[name] = "returned"
                except RuntimeError as exc:
                    seen[name] = f"RuntimeError: {exc}"
            os.write(w, json.dumps(seen).encode())
            os.close(w)
            sys.exit(0)  # a normal exit: atexit handlers run and must not block
        os.close(w)
        print(json.dumps(_child_report(r, pid, {})), flush=True)
        if mode == "fork-pool":
            pool.shutdown()
        elif mode == "fork-child":
            sup.stop()
        else:
            manager.stop()
    elif mode in ("logs", "logs-config"):
        if mode == "logs-config":
            logging.basicConfig(level=logging.WARNING, format="CONFIGURED %(message)s")
        manager = corral.WorkerProcessManager(
            hw.sleep_duck, 2, worker_name_fn=lambda idx: f"duck-worker-{idx}",
            restart_timeout=2, start_method=method)
        manager.start()
        victim = manager.running_pids()[1]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:
            pids = manager.running_pids()
            if len(pids) == 2 and victim not in pids:
                break
            if time.monotonic() > deadline:
                raise SystemExit("the killed worker was not replaced")
            time.sleep(0.01)
        manager.stop(wait=False)
        print(json.dumps({"victim": victim}), flush=True)
        sup = manager.supervisor
        assert sup is not None
        sup.wait(timeout=10)
        # At exit corral's own handler joins the events thread, so its last lines are out.
    elif mode == "killed-at-start":
        sup = corral.Supervisor(hw.kills_its_supervisor_at_once, workers=n,
                                args=lambda i: (str(flagdir),), start_method=method)
        sup.start()
        threading.Event().wait()  # until worker 1 kills this process
    elif mode == "slow-adopt":
        # The supervisor's thread held up between a worker's start and its registration with
        # the keeper, as a busy thread of the program's holding the GIL would hold it up: a
        # delay in adopt() makes that window certain. The worker kills us within it.
        from corral._keeper import keeper

        adopt = keeper.adopt

        def slow_adopt(slot: int, pgid: int) -> None:
            time.sleep(5)
            adopt(slot, pgid)

        keeper.adopt = slow_adopt  # type: ignore[method-assign]
        supervisor = os.getpid()
        sup = corral.Supervisor(hw.kills_its_supervisor_holding_the_gil, workers=1,
                                args=lambda i: (str(flagdir), supervisor), start_method=method)
        sup.start()
        threading.Event().wait()  # until the worker kills this process
    elif mode == "slow-adopt-command":
        # A command worker: the start returned, its group not registered yet (held up here as
        # in "slow-adopt"); the test SIGKILLs this process within that window.
        from corral._keeper import keeper

        adopt, register = keeper.adopt, keeper.register

        def slow_adopt(slot: int, pgid: int) -> None:
            time.sleep(30)
            adopt(slot, pgid)

        def slow_register(pgid: int) -> None:
            time.sleep(30)
            register(pgid)

        keeper.adopt = slow_adopt  # type: ignore[method-assign]
        keeper.register = slow_register  # type: ignore[method-assign]
        script = 'sleep 600 & echo "$! $$" > "$0/gc-0.tmp" && mv "$0/gc-0.tmp" "$0/gc-0"; wait'
        sup = corral.Supervisor(command=["sh", "-c", script, str(flagdir)], workers=1)
        sup.start()
        child, command = (int(x) for x in _wait_files(flagdir, "gc-", 1)[0].read_text().split())
        print(json.dumps({"workers": [command], "grandchildren": [child]}), flush=True)
        threading.Event().wait()
    elif mode == "pids-full":
        # Run inside a pids cgroup: worker 0 takes every pid left, so no thread can start.
        checks: list[int] = []

        def check(process: object, index: int) -> bool:
            checks.append(index)
            return True

        sup = corral.Supervisor(hw.takes_every_pid, workers=2, start_method=method,
                                args=lambda i: (str(flagdir),), ready_when="ready",
                                health_check=check,
                                health_check_interval=0.3, health_check_timeout=2,
                                max_memory=2**40, memory_check_interval=0.3)
        skipped = threading.Event()

        class Skips(logging.StreamHandler):  # type: ignore[type-arg]
            """corral's lines to stderr, as the last resort would; notes the skipped check."""

            def emit(self, record: logging.LogRecord) -> None:
                super().emit(record)
                if "no thread could be started" in record.getMessage():
                    skipped.set()

        logging.getLogger("corral").addHandler(Skips(sys.stderr))
        sup.start()
        _wait_files(flagdir, "full-", 1)
        if not skipped.wait(30):
            raise SystemExit("no check was skipped while every pid was taken")
        ping_full = sup.ping()
        checks.clear()
        deadline = time.monotonic() + 30
        while 1 not in checks and time.monotonic() < deadline:  # once pids are free again
            time.sleep(0.05)
        status = {st.index: st.restarts for st in sup.status(timeout=10)}
        print(json.dumps({"ping_full": ping_full, "ping": sup.ping(), "restarts": status,
                          "checked_1": 1 in checks}), flush=True)
        sup.stop(timeout=5)
    elif mode == "quiet-exit":
        manager = corral.WorkerProcessManager(hw.ignores_sigterm_duck, n, start_method=method,
                                              enable_logs=False, process_stop_timeout=0.5)
        manager.start()
        deadline = time.monotonic() + 30
        while len(pids := manager.running_pids()) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        print(json.dumps({"workers": pids}), flush=True)
        # No stop(): corral's exit handler stops the pool.
    elif mode == "hung-check-exit":
        def hangs(process: object, idx: int) -> bool:
            (flagdir / f"check-{idx}").write_text("1")
            time.sleep(600)
            return True

        manager = corral.WorkerProcessManager(hw.sleep_duck, 1, start_method=method,
                                              health_check_fn=hangs, enable_logs=False)
        manager.health_check_interval = 0.1
        manager.start()
        _wait_files(flagdir, "check-", 1)
        t0 = time.monotonic()
        manager.stop()
        print(json.dumps({"stopped_after": time.monotonic() - t0,
                          "workers": manager.running_pids()}), flush=True)
        # The interpreter's exit must not wait for the check's thread.
    elif mode == "fork-forkserver":
        with corral.ProcessPool(1, start_method="forkserver") as pool:
            pool.submit(abs, -1).result(timeout=30)
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                try:
                    with corral.ProcessPool(1, start_method="forkserver") as own:
                        seen = own.submit(abs, -5).result(timeout=30)
                except Exception as exc:
                    seen = f"{type(exc).__name__}: {exc}"
                os.write(w, json.dumps(seen).encode())
                os._exit(0)
            os.close(w)
            report = _child_report(r, pid, None)
            report["parent"] = pool.submit(abs, -6).result(timeout=30)
            print(json.dumps(report), flush=True)
    elif mode == "atfork-lock":
        _atfork_lock(method)
    elif mode == "fork-mask":
        _fork_mask(method, flagdir)
    elif mode == "stop-in-handler":
        _stop_in_handler(method, flagdir)
    elif mode == "emfile":
        _emfile(method)
    elif mode == "locked-console":
        _locked_console(method, flagdir, n)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


def _child_report(r: int, pid: int, empty: object) -> dict[str, object]:
    """What an os.fork() child wrote (JSON) to the pipe ``r`` until it closed it (``empty``
    if nothing), and its exit code once reaped."""
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return {"child": json.loads(data) if data else empty,
            "child_exit": os.waitstatus_to_exitcode(status)}


def _false(value: bool) -> None:
    """A property a forked child reads: it must say the pool does not run here."""
    if value is not False:
        raise AssertionError(f"True in a forked child: {value!r}")
    raise RuntimeError("running is False in this fork child")


def _restarts(sup: object) -> int:
    return sum(st.restarts for st in sup.status(timeout=10))  # type: ignore[attr-defined]


def _atfork_lock(method: str) -> None:
    """See the module's docstring (atfork-lock)."""
    import hardening_workers as hw

    import corral

    logging.basicConfig(level=logging.INFO, stream=open(os.devnull, "w"))  # noqa: SIM115
    lock = threading.Lock()

    def fresh() -> None:
        nonlocal lock
        lock = threading.Lock()

    os.register_at_fork(before=lock.acquire, after_in_parent=lock.release,
                        after_in_child=fresh)
    sup = corral.Supervisor(hw.crash_at_once_duck, workers=2, start_method=method,
                            backoff=corral.Backoff(initial=0.001, cap=0.005),
                            budget=corral.RestartBudget(max_restarts=10**6, window=1))
    sup.start()
    done = threading.Event()

    def logs_under_the_lock() -> None:
        log = logging.getLogger("corral.supervisor")
        while not done.is_set():
            with lock:
                log.info("the application logs while it holds its fork-safe lock")

    thread = threading.Thread(target=logs_under_the_lock, daemon=True)
    thread.start()
    first = _restarts(sup)
    deadline = time.monotonic() + 30
    while (restarts := _restarts(sup)) < first + 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    done.set()
    thread.join(10)
    print(json.dumps({"restarts": restarts - first}), flush=True)
    sup.stop(timeout=5)


def _fork_mask(method: str, flagdir: Path) -> None:
    """See the module's docstring (fork-mask)."""
    import hardening_workers as hw

    import corral

    main = os.getpid()

    def on_term(signum: int, frame: object) -> None:
        if os.getpid() != main:
            (flagdir / f"handler-{os.getpid()}").write_text("1")

    def born() -> None:  # first thing in every fork child, before multiprocessing's bootstrap
        mask = sorted(int(sig) for sig in signal.pthread_sigmask(signal.SIG_BLOCK, []))
        (flagdir / f"born-{os.getpid()}").write_text(json.dumps(mask))

    signal.signal(signal.SIGTERM, on_term)
    os.register_at_fork(after_in_child=born)
    sup = corral.Supervisor(hw.reports_signals, workers=2, args=lambda i: (str(flagdir),),
                            start_method=method, ready_when="ready")
    sup.start()
    sup.wait_ready(timeout=30)
    victim = sup.pids()[0]
    os.kill(victim, signal.SIGKILL)
    _wait_files(flagdir, "target-", 3)
    workers = [*sup.pids(), victim]
    sup.stop(timeout=5)
    print(json.dumps({"main": main, "workers": workers}), flush=True)


def _stop_in_handler(method: str, flagdir: Path) -> None:
    """See the module's docstring (stop-in-handler)."""
    import hardening_workers as hw

    import corral

    logging.basicConfig(level=logging.INFO, filename=str(flagdir / "app.log"))
    app = logging.getLogger("app")
    sup = corral.Supervisor(hw.crash_at_once_duck, workers=3, start_method=method,
                            backoff=corral.Backoff(initial=0.001, cap=0.005),
                            budget=corral.RestartBudget(max_restarts=10**6, window=1))
    took: list[float] = []

    def on_term(signum: int, frame: object) -> None:
        t0 = time.monotonic()
        sup.stop(timeout=1)
        took.append(time.monotonic() - t0)

    signal.signal(signal.SIGTERM, on_term)
    sup.start()

    def kick() -> None:
        time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=kick, daemon=True).start()
    while not took:
        app.info("tick %s", "x" * 200)
    print(json.dumps({"stop_took": took[0]}), flush=True)


def _emfile(method: str) -> None:
    """See the module's docstring (emfile)."""
    import hardening_workers as hw

    import corral

    sup = corral.Supervisor(hw.exits_on_sigterm, workers=2, start_method=method,
                            ready_when="ready", backoff=corral.Backoff(initial=0.05, cap=0.2))
    sup.start()
    sup.wait_ready(timeout=30)
    seen = set(sup.pids())
    victim = sup.status()[0].pid
    hog = []
    with contextlib.suppress(OSError):
        while True:
            hog.append(os.open(os.devnull, os.O_RDONLY))
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while (st := sup.status()) and st[0].pid == victim and time.monotonic() < deadline:
        time.sleep(0.01)  # until the monitor has taken the exit (its log line included)
    for fd in hog:
        os.close(fd)
    ok = True
    try:
        sup.wait_ready(timeout=30)
    except Exception as exc:
        ok = f"{type(exc).__name__}: {exc}"  # type: ignore[assignment]
    seen.update(sup.pids())
    print(json.dumps({"ok": ok, "ping": sup.ping(5.0), "workers": sorted(seen),
                      "restarted": victim not in sup.pids()}), flush=True)
    sup.stop()


def _locked_console(method: str, flagdir: Path, kills: int) -> None:
    """See the module's docstring (locked-console)."""
    import hardening_workers as hw

    import corral

    lock = threading.Lock()  # Duck wraps sys.stdout.write and sys.stderr.write like this
    for stream in (sys.stdout, sys.stderr):
        def write(data: str, _write: object = stream.write) -> int:
            with lock:
                return _write(data)  # type: ignore[operator,no-any-return]
        stream.write = write  # type: ignore[method-assign]
    manager = corral.WorkerProcessManager(
        hw.prints_then_sleeps_duck, 2, args_fn=lambda idx: (str(flagdir),),
        restart_timeout=0, start_method=method)  # enable_logs: lines at every restart
    manager.start()
    seen: set[int] = set()
    stuck: list[int] = []
    for k in range(kills):
        pids = manager.running_pids()
        seen.update(pids)
        _wait_files(flagdir, "printed-", len(seen) - len(stuck))
        os.kill(pids[k % 2], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not (new := [p for p in manager.running_pids() if p not in pids]):
            if time.monotonic() > deadline:
                raise SystemExit("the killed worker was not replaced")
            time.sleep(0.01)
        seen.update(new)
        while not (flagdir / f"printed-{new[0]}").exists():
            if time.monotonic() > deadline:
                stuck.append(new[0])
                os.kill(new[0], signal.SIGKILL)  # the next round starts clean
                break
            time.sleep(0.01)
    manager.stop()
    print(json.dumps({"stuck": stuck, "workers": sorted(seen)}), file=sys.__stdout__,
          flush=True)


if __name__ == "__main__":
    main()
