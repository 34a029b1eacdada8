"""One benchmark scenario per process: ``python scenarios.py NAME PARAMS_JSON RESULT_PATH``.

run.py starts each scenario in a fresh process, so each supervisor has its own CPU accounting,
its own forkserver and no state left over from another system. The scenario writes a JSON object
of ``{metric: [samples...]}`` (plus ``info``) to RESULT_PATH, and always stops what it started and
SIGKILLs, by pid, every worker and grandchild that reported to it.

This module is ``__main__`` of the supervising process: spawn and forkserver children re-import
it (CPython does not preload ``__main__`` into the forkserver), for corral and the floor alike.
Like any program that supervises with corral it imports corral at the top.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import random
import select
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import bench_workers as bw
from cmd_scenarios import SCENARIOS as CMD_SCENARIOS
from probe import Probe, Record, alive, kill_pids, process_cpu, rss_bytes

import corral

Params = dict[str, Any]
Result = dict[str, Any]

# --------------------------------------------------------------------------------- the systems


def wpm_classes(system: str) -> tuple[Any, Any]:
    """(WorkerProcessManager, HeartbeatHealthCheck) of the original or of corral's facade."""
    if system == "original":
        # Its worker target is a closure: it only works under fork (its default before 3.14).
        if multiprocessing.get_start_method(allow_none=True) is None:
            multiprocessing.set_start_method("fork")
        from duck.utils.multiprocessing.process_manager import (
            HeartbeatHealthCheck,
            WorkerProcessManager,
        )

        return WorkerProcessManager, HeartbeatHealthCheck
    if system == "compat":
        return corral.WorkerProcessManager, corral.HeartbeatHealthCheck  # type: ignore[attr-defined]
    raise ValueError(system)


class Pool:
    """One system supervising ``n`` workers that report to ``probe``.

    ``worker`` names a pair of targets in bench_workers: ``<worker>`` for corral and
    ``wpm_<worker>`` for WorkerProcessManager-style systems.
    """

    def __init__(self, system: str, worker: str, n: int, probe: Probe, *,
                 method: str = "fork", heartbeat: float | None = None,
                 extra: tuple[Any, ...] = (), stop_timeout: float = 1.0,
                 backoff: Any = None, restart_timeout: float = 0.0, standby: int = 0,
                 standby_init: Any = None, http: str | None = None) -> None:
        self.system = system
        self.probe = probe
        self.sup: Any = None
        self.wpm: Any = None
        self.hc: Any = None
        path = probe.path
        if system == "corral":
            self.sup = corral.Supervisor(
                getattr(bw, worker), workers=n, args=lambda i: (path, *extra),
                start_method=method, heartbeat_timeout=heartbeat,
                # A worker killed after any uptime restarts at once (the recovery figure); a
                # crash storm passes the default Backoff.
                backoff=backoff if backoff is not None else corral.Backoff(reset_after=0),
                budget=corral.RestartBudget(max_restarts=None), stop_timeout=stop_timeout,
                standby=standby, standby_init=standby_init, http=http)
        else:
            wpm_cls, hc_cls = wpm_classes(system)
            if heartbeat is not None:
                self.hc = hc_cls(heartbeat)
            # The original at its most favourable: restart_timeout=0 (its default 5 s sleep
            # after each restart only adds to its latencies), no log output. The "Duck" rows
            # pass restart_timeout=2, as Duck's own server calls it.
            self.wpm = wpm_cls(
                getattr(bw, "wpm_" + worker), n, args_fn=lambda i: (path, *extra),
                health_check_fn=self.hc, restart_timeout=restart_timeout, enable_logs=False,
                verbose_logs=False, process_stop_timeout=stop_timeout)

    def start(self) -> None:
        if self.sup is not None:
            self.sup.start()
        else:
            self.wpm.start()

    def stop(self) -> None:
        if self.sup is not None:
            self.sup.stop()
        elif self.wpm is not None:
            self.wpm.stop()

    def close(self) -> None:
        """Stop, and end the health check's Manager server (the original never does)."""
        try:
            self.stop()
        finally:
            if self.hc is not None:
                mgr = getattr(self.hc, "_multiprocessing_manager", None)
                if mgr is not None:
                    try:
                        mgr.shutdown()
                    except Exception:
                        pass


def helper_pids(probe: Probe) -> list[int]:
    """This process's children that are not workers: Manager server, forkserver, trackers."""
    import psutil

    return [c.pid for c in psutil.Process().children() if c.pid not in probe.pids]


def cpu_of(pids: list[int]) -> float:
    return sum(c for c in (process_cpu(pid) for pid in pids) if c is not None)


def wait_starts(probe: Probe, n: int, timeout: float) -> dict[int, Record]:
    """Wait until workers 0..n-1 have each reported a first line; return the latest per index."""
    latest: dict[int, Record] = {}
    deadline = time.monotonic() + timeout
    while len(latest) < n:
        rec = probe.next(max(0.001, deadline - time.monotonic()), bw.START,
                         f"first lines of {n} workers ({len(latest)} so far)")
        latest[rec.index] = rec
    return latest


def pause(lo: float, hi: float) -> None:
    time.sleep(random.uniform(lo, hi))


def phases(n: int, lo: float, hi: float) -> list[float]:
    """n waits spread evenly over [lo, hi) (one at random in each n-th, in random order).

    The original polls every 2 s: its latency is the time left until the next poll, so the
    kills must sample that phase evenly. Stratified, a median of ten is the true median within
    ~0.1 s, where ten independent draws could land anywhere from 0.5 to 1.5 s.
    """
    out = [lo + (hi - lo) * (i + random.random()) / n for i in range(n)]
    random.shuffle(out)
    return out


# ---------------------------------------------------------------------------------- recovery


def sc_recovery(p: Params) -> Result:
    """SIGKILL one worker (then four at once): kill -> replacement's first line.

    With ``paired_floor``, each repetition is preceded by its floor, measured in this same
    process under the same load: bare Processes of the same start method, .start() -> first
    line (one, or four for the four-at-once figure).
    """
    system, method, n = p["system"], p.get("method", "fork"), p.get("workers", 4)
    lo, hi = p.get("phase", (0.02, 0.06))
    paired = p.get("paired_floor", False)
    timeout = p.get("timeout", 15)
    key = p.get("key", "recovery")
    standby = p.get("standby", 0)
    probe = Probe()
    pool = Pool(system, p.get("worker", "sleeper"), n, probe, method=method,
                restart_timeout=p.get("restart_timeout", 0.0), standby=standby,
                standby_init=bw.warm_up if p.get("warm_up") else None)
    # The floor is a bare start of the same method, or of fork ("standby" rows are judged
    # against the fork floor whatever their own start method).
    ctx = multiprocessing.get_context(p.get("floor_method", method))
    floor_single: list[float] = []
    floor_multi: list[float] = []

    def bare_starts(k: int) -> float:
        t0 = time.monotonic()
        procs = []
        for i in range(k):
            proc = ctx.Process(target=bw.first_line, args=(probe.path, 1000 + i))
            proc.start()
            procs.append(proc)
        last = 0.0
        for _ in range(k):
            rec = probe.next(timeout, bw.START, "a bare process's first line")
            last = max(last, rec.value)
        for proc in procs:
            proc.join(10)
        return last - t0

    def bare_recovery() -> float:
        """The whole floor of a restart: SIGKILL a bare process, see its pidfd readable,
        reap it, start a bare process -> its first line (the standby rows' floor)."""
        victim = ctx.Process(target=bw.sleeper, args=(2000, probe.path))
        victim.start()
        probe.next(timeout, bw.START, "a bare victim's first line")
        pidfd = os.pidfd_open(victim.pid)  # type: ignore[arg-type]
        t0 = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)  # type: ignore[arg-type]
        select.select([pidfd], [], [], 10)
        os.close(pidfd)
        victim.join(10)
        proc = ctx.Process(target=bw.first_line, args=(probe.path, 1000))
        proc.start()
        rec = probe.next(timeout, bw.START, "a bare replacement's first line")
        proc.join(10)
        return rec.value - t0

    try:
        pool.start()
        current = wait_starts(probe, n, 30 + n * 0.2)
        pause(0.2, 0.3)  # let the start-up settle
        if paired:
            bare_starts(1)  # warm-up: a first start pays one-off costs
        single = []
        waits = phases(p["single"], lo, hi)
        for r in range(p["single"]):
            if paired:
                pause(lo, hi)
                floor_single.append(bare_recovery() if standby else bare_starts(1))
            if standby:
                wait_standbys(pool, standby)
            time.sleep(waits[r])  # a random phase: the original polls every 2 s
            idx = r % n
            old = current[idx].pid
            t0 = time.monotonic()
            os.kill(old, signal.SIGKILL)
            while True:
                rec = probe.next(timeout, bw.START, f"the replacement of worker {idx}")
                current[rec.index] = rec
                if rec.index == idx and rec.pid != old:
                    break
            single.append(rec.value - t0)
        multi = []
        per_rank: dict[int, list[float]] = {}
        victims = list(range(min(4, n)))
        waits = phases(p.get("multi", 0), lo, hi)
        for r in range(p.get("multi", 0)):
            if paired:
                pause(lo, hi)
                floor_multi.append(bare_starts(len(victims)))
            if standby:
                wait_standbys(pool, standby)
            time.sleep(waits[r])
            old_pids = {i: current[i].pid for i in victims}
            t0 = time.monotonic()
            for i in victims:
                os.kill(old_pids[i], signal.SIGKILL)
            replaced: dict[int, float] = {}
            while len(replaced) < len(victims):
                rec = probe.next(timeout * 2, bw.START, "four replacements")
                current[rec.index] = rec
                if rec.index in old_pids and rec.pid != old_pids[rec.index]:
                    replaced[rec.index] = rec.value
            multi.append(max(replaced.values()) - t0)
            if standby:  # each of the 4, in the order they came back
                for k, at in enumerate(sorted(replaced.values())):
                    per_rank.setdefault(k, []).append(at - t0)
        out: Result = {f"{key}.{method}": single}
        if multi:
            out[f"{'recovery4' if key == 'recovery' else key + '4'}.{method}"] = multi
        for k, samples in per_rank.items():
            out[f"{key}4.{method}.{k + 1}"] = samples
        if paired:
            floor: Result = {f"{key}.{method}": floor_single}
            if floor_multi:
                floor[f"{'recovery4' if key == 'recovery' else key + '4'}.{method}"] = (
                    floor_multi)
            out["by_system"] = {"floor": floor}
        return out
    finally:
        finish(pool, probe)


def wait_standbys(pool: Pool, n: int, timeout: float = 60.0) -> None:
    """Until ``n`` hot standbys are ready (each kill is answered by a ready one)."""
    deadline = time.monotonic() + timeout
    while sum(1 for s in pool.sup.status() if s.standby and s.ready) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{n} standby(s) not ready within {timeout}s")
        time.sleep(0.005)


def finish(pool: Pool | None, probe: Probe) -> None:
    try:
        if pool is not None:
            pool.close()
    finally:
        kill_pids(probe.pids | probe.grandchildren, probe.started)
        probe.close()


# -------------------------------------------------------------------------------------- floor


def sc_floor_start(p: Params) -> Result:
    """The bare recovery: SIGKILL a bare child, wait on its pidfd, reap, start another bare
    Process of the same start method -> its first line. (The start alone is measured paired
    with corral's recovery, in sc_recovery.)"""
    method = p["method"]
    ctx = multiprocessing.get_context(method)
    probe = Probe()
    procs: list[Any] = []

    def start(target: Callable[..., None], *args: Any) -> Any:
        proc = ctx.Process(target=target, args=args)
        proc.start()
        procs.append(proc)
        return proc

    try:
        warm = start(bw.first_line, probe.path)  # the forkserver's own start is not the floor
        probe.next(30, bw.START, "the warm-up process")
        warm.join(10)
        bare = []
        proc = start(bw.sleeper, 0, probe.path)
        rec = probe.next(15, bw.START, "a bare sleeper")
        for _ in range(p["bare"]):
            pause(0.02, 0.06)
            pidfd = os.pidfd_open(rec.pid)
            t0 = time.monotonic()
            os.kill(rec.pid, signal.SIGKILL)
            select.select([pidfd], [], [], 10)
            os.close(pidfd)
            proc.join(10)
            proc = start(bw.sleeper, 0, probe.path)
            rec = probe.next(15, bw.START, "a bare replacement")
            bare.append(rec.value - t0)
        proc.kill()
        proc.join(10)
        return {f"recovery_bare.{method}": bare}
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join(5)
        finish(None, probe)


def sc_floor_fork(p: Params) -> Result:
    """A bare os.fork() whose child _exits at once, reaped by the parent: the round trip."""
    samples = []
    for _ in range(p["reps"]):
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        samples.append(time.monotonic() - t0)
    return {"fork_roundtrip": samples}


# ------------------------------------------------------------------------------------ hangs


def sc_hang(p: Params) -> Result:
    """A worker beats every 50 ms, then stops: (last beat + timeout) -> death, -> replacement."""
    system, hbt = p["system"], p.get("heartbeat_timeout", 0.5)
    lo, hi = p.get("beat_for", (0.25, 0.35))
    probe = Probe()
    pool = Pool(system, "hanger", 1, probe, method=p.get("method", "fork"), heartbeat=hbt,
                extra=(lo, hi, 0.05))
    kill, replace = [], []
    try:
        pool.start()
        rec = probe.next(30, bw.START, "the first worker")
        pidfd = os.pidfd_open(rec.pid)
        for _ in range(p["reps"]):
            last = probe.next(hi + 10, bw.LAST_BEAT, "the worker's last beat")
            deadline = last.value + hbt
            ready, _, _ = select.select([pidfd], [], [], 30)
            if not ready:
                raise TimeoutError(f"{system} did not kill a hung worker within 30 s")
            dead = time.monotonic()
            os.close(pidfd)
            rec = probe.next(30, bw.START, "the replacement of the hung worker")
            pidfd = os.pidfd_open(rec.pid)
            kill.append(dead - deadline)
            replace.append(rec.value - deadline)
        os.close(pidfd)
        return {"hang.kill": kill, "hang.replace": replace}
    finally:
        finish(pool, probe)


# ------------------------------------------------------------------------------- beat cost


def sc_beat(p: Params) -> Result:
    """ns per heartbeat call, timed in a loop of n calls inside a real worker, k times over.

    Best of k is the cost itself; the other repetitions only add preemption on a busy machine.
    """
    system, n, k = p["system"], p["n"], p.get("k", 5)
    probe = Probe()
    pool = None
    procs: list[Any] = []

    def results(what: str, count: int, timeout: float) -> list[float]:
        return [probe.next(timeout, bw.RESULT, what).value for _ in range(count)]

    try:
        if system == "floor":
            ctx = multiprocessing.get_context("fork")
            proc = ctx.Process(target=bw.floor_beat_cost, args=(probe.path, n, k))
            procs.append(proc)
            proc.start()
            floor = results("the floor's result", k, 60)
            baseline = probe.next(60, bw.BASELINE, "the empty loop").value
            proc.join(10)
            mgr = multiprocessing.Manager()
            try:
                shared = mgr.dict()
                km = max(1, k // 2)
                proc = ctx.Process(target=bw.manager_dict_cost,
                                   args=(probe.path, shared, p["n_manager"], km))
                procs.append(proc)
                proc.start()
                manager = results("the Manager dict result", km, 120)
                proc.join(10)
            finally:
                mgr.shutdown()
            return {"beat": floor, "beat.manager": manager, "beat.loop": [baseline]}
        pool = Pool(system, "beat_cost", 1, probe, heartbeat=60.0, extra=(n, k))
        pool.start()
        values = results("the beat loop's result", k, 120)
        baseline = probe.next(60, bw.BASELINE, "the empty loop").value
        return {"beat": values, "beat.loop": [baseline]}
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join(5)
        finish(pool, probe)


# ------------------------------------------------------------------------ idle cost and scale


def sc_idle(p: Params) -> Result:
    """Supervisor CPU (its own + helpers') over a window with n sleeping/beating workers."""
    system, n, hb, window = p["system"], p["workers"], p["heartbeat"], p["window"]
    probe = Probe()
    worker = "beater" if hb else "sleeper"
    rss0 = rss_bytes()
    pool = Pool(system, worker, n, probe, method="fork", heartbeat=5.0 if hb else None,
                extra=(0.2,) if hb else ())
    try:
        pool.start()
        starts = wait_starts(probe, n, 60 + n * 0.2)
        time.sleep(p.get("settle", 1.0))
        # On a busy machine the supervisor may still be digesting the start-up: wait (up to
        # 5 s) for a quarter second in which it used under 1 ms of CPU, then measure.
        settle_end = time.monotonic() + 5
        while time.monotonic() < settle_end:
            c0 = process_cpu(os.getpid()) or 0.0
            time.sleep(0.25)
            if (process_cpu(os.getpid()) or 0.0) - c0 < 0.001:
                break
        rss1 = rss_bytes()
        helpers = helper_pids(probe)
        cpu0 = process_cpu(os.getpid()) or 0.0
        hcpu0 = cpu_of(helpers)
        t0 = time.monotonic()
        time.sleep(window)
        elapsed = time.monotonic() - t0
        cpu = (process_cpu(os.getpid()) or 0.0) - cpu0
        hcpu = cpu_of(helpers) - hcpu0
        tag = f"{n}.{'on' if hb else 'off'}"
        out: Result = {
            f"idle.{tag}": [(cpu + hcpu) / elapsed * 10.0],  # CPU seconds per 10 s
            f"rss.{tag}": [(rss1 - rss0) / n],
            "info": {"helpers": len(helpers), "helper_cpu_per_10s": hcpu / elapsed * 10.0,
                     "window": elapsed},
        }
        if p.get("recovery_reps"):
            current = {i: r.pid for i, r in starts.items()}
            lat = []
            waits = phases(p["recovery_reps"], *p.get("phase", (0.02, 0.06)))
            for r in range(p["recovery_reps"]):
                time.sleep(waits[r])
                idx = (r * 37) % n
                old = current[idx]
                t0 = time.monotonic()
                os.kill(old, signal.SIGKILL)
                while True:
                    rec = probe.next(15, bw.START, f"the replacement of worker {idx}")
                    current[rec.index] = rec.pid
                    if rec.index == idx and rec.pid != old:
                        break
                lat.append(rec.value - t0)
            out[f"recovery.{n}"] = lat
        return out
    finally:
        finish(pool, probe)


# -------------------------------------------------------------------------------- shutdown


def sc_shutdown(p: Params) -> Result:
    """stop() of 8 workers (each with a grandchild) that exit on / ignore SIGTERM."""
    system, ignore, n = p["system"], p["ignore"], p.get("workers", 8)
    tag = "ignore" if ignore else "exit"
    seconds, left, left_gc = [], [], []
    for _ in range(p["reps"]):
        probe = Probe()
        pool = Pool(system, "stopper", n, probe, extra=(ignore,), stop_timeout=1.0)
        try:
            pool.start()
            wait_starts(probe, n, 30)
            while len(probe.grandchildren) < n:
                probe.next(30, bw.GRANDCHILD, "the grandchildren")
            pause(0.1, 0.15)
            workers, gcs = set(probe.pids), set(probe.grandchildren)
            t0 = time.monotonic()
            pool.stop()
            seconds.append(time.monotonic() - t0)
            # Counted the moment stop() returns: a blocking stop() promises nothing is left.
            left.append(sum(alive(pid) for pid in workers | gcs))
            left_gc.append(sum(alive(pid) for pid in gcs))
        finally:
            finish(pool, probe)
    return {f"shutdown.{tag}": seconds, f"shutdown.{tag}.left": left,
            "info": {"grandchildren_left": left_gc}}


# --------------------------------------------------------------------------------- start-up


def sc_startup(p: Params) -> Result:
    """start() -> every one of n workers has run its first line."""
    system, n, method = p["system"], p["workers"], p.get("method", "fork")
    samples = []
    for _ in range(p["reps"]):
        probe = Probe()
        pool = None
        procs: list[Any] = []
        try:
            if system == "floor":
                # From cold, as corral's start-up: under forkserver this includes the server's
                # own start, which corral's start() pays too.
                ctx = multiprocessing.get_context(method)
                t0 = time.monotonic()
                for i in range(n):
                    proc = ctx.Process(target=bw.sleeper, args=(i, probe.path))
                    proc.start()
                    procs.append(proc)
            else:
                pool = Pool(system, "sleeper", n, probe, method=method)
                t0 = time.monotonic()
                pool.start()
            starts = wait_starts(probe, n, 60 + n)
            samples.append(max(r.value for r in starts.values()) - t0)
        finally:
            for proc in procs:
                proc.kill()
                proc.join(5)
            finish(pool, probe)
    return {f"startup.{method}.{n}": samples}


# ------------------------------------------------------------------------------ crash storm


def sc_storm(p: Params) -> Result:
    """A worker that exits at once, for ``window`` s: restarts made, supervisor CPU used."""
    system, window = p["system"], p["window"]
    probe = Probe()
    backoff = None
    if system == "corral":
        backoff = (corral.Backoff() if p.get("backoff", True)
                   else corral.Backoff(initial=0.0, cap=0.0, jitter=0.0, reset_after=0.0))
    pool = Pool(system, "crasher", 1, probe, backoff=backoff)
    tag = "storm" if p.get("backoff", True) else "storm_nobackoff"
    try:
        cpu0 = process_cpu(os.getpid()) or 0.0
        t0 = time.monotonic()
        pool.start()
        starts = 0
        while True:
            left = t0 + window - time.monotonic()
            if left <= 0:
                break
            starts += sum(1 for r in probe.drain(min(left, 0.2)) if r.kind == bw.START)
        elapsed = time.monotonic() - t0
        cpu = (process_cpu(os.getpid()) or 0.0) - cpu0 + cpu_of(helper_pids(probe))
        # Restarts are counted in the window as it is (backoff grows: they do not scale);
        # CPU is per 10 s.
        return {f"{tag}.restarts": [max(0, starts - 1)],
                f"{tag}.cpu": [cpu / elapsed * 10.0],
                "info": {"window": elapsed, "starts": starts}}
    finally:
        finish(pool, probe)


# ------------------------------------------------------------------------ metrics endpoint


class Scraper:
    """benchmarks/scraper.py (a process of its own) against ``address``: started and ready
    before :meth:`run`, so that a measurement around ``run()`` leaves its start out."""

    def __init__(self, address: tuple[str, int], path: str, interval: float, count: int,
                 close: bool = False) -> None:
        import subprocess

        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scraper.py")
        args = [sys.executable, script, address[0], str(address[1]), path, str(interval),
                str(count)] + (["close"] if close else [])
        self.timeout = 60 + interval * count * 2
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.proc.kill()
            raise RuntimeError(f"scraper did not start: {line!r}")

    def run(self) -> dict[str, Any]:
        """Let it scrape; wait for its report (the last answer is in when this returns)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        report: dict[str, Any] = json.loads(self.proc.stdout.readline())
        self.proc.wait(self.timeout)
        return report


def _scrape(address: tuple[str, int], path: str, interval: float, count: int,
            close: bool = False) -> dict[str, Any]:
    return Scraper(address, path, interval, count, close).run()


def sc_scrape(p: Params) -> Result:
    """Supervisor CPU with the HTTP endpoint on, idle and then scraped every ``interval`` s,
    and how long a scrape takes to answer; ``n`` workers beating every 0.2 s."""
    n, window, interval = p["workers"], p["window"], p["interval"]
    per_worker = p.get("per_worker", False)
    probe = Probe()
    pool = Pool("corral", "beater", n, probe, method="fork", heartbeat=5.0, extra=(0.2,),
                http=None if per_worker else "127.0.0.1:0")
    endpoint = None
    load = os.getloadavg()[0]
    try:
        pool.start()
        wait_starts(probe, n, 60 + n * 0.2)
        if per_worker:
            from corral.endpoint import Endpoint

            endpoint = Endpoint("127.0.0.1:0", pools=[pool.sup], per_worker=True).start()
            address = endpoint.address
        else:
            address = pool.sup.http_address
        time.sleep(p.get("settle", 1.0))
        tag = f"scrape.{n}" + (".pw" if per_worker else "")
        out: Result = {"info": {"loadavg_1m_at_start": load, "workers": n,
                                "per_worker": per_worker}}
        # The first scrape reads every worker's RSS (later ones within 5 s reuse it).
        first = _scrape(address, "/metrics", 0.0, 1)
        out[f"{tag}.first"] = first["times"]
        if p.get("cpu", True):
            # Endpoint on, nobody asking: the baseline of the same pool in the same run.
            cpu0, t0 = process_cpu(os.getpid()) or 0.0, time.monotonic()
            time.sleep(window)
            idle = ((process_cpu(os.getpid()) or 0.0) - cpu0) / (time.monotonic() - t0)
            out[f"{tag}.idle"] = [idle * 10.0]
        count = max(1, int(window / interval))
        scraper = Scraper(address, "/metrics", interval, count)
        cpu0, t0 = process_cpu(os.getpid()) or 0.0, time.monotonic()
        report = scraper.run()
        elapsed = time.monotonic() - t0
        cpu = (process_cpu(os.getpid()) or 0.0) - cpu0
        if p.get("cpu", True):
            out[f"{tag}.cpu"] = [cpu / elapsed * 10.0]  # CPU seconds per 10 s
        out[f"{tag}.per_scrape"] = [cpu / count]
        out[f"{tag}.latency"] = report["times"]
        out["info"].update(size=report["size"], statuses=report["statuses"], scrapes=count,
                           loadavg_1m_at_end=os.getloadavg()[0])
        if p.get("probes"):
            # Kubelet-style probes: a new connection each time.
            report = _scrape(address, "/readyz", 0.0, 20, close=True)
            out[f"{tag}.readyz"] = report["times"]
        return out
    finally:
        if endpoint is not None:
            endpoint.close()
        finish(pool, probe)


SCENARIOS: dict[str, Callable[[Params], Result]] = {
    "recovery": sc_recovery, "floor_start": sc_floor_start, "floor_fork": sc_floor_fork,
    "hang": sc_hang, "beat": sc_beat, "idle": sc_idle, "shutdown": sc_shutdown,
    "startup": sc_startup, "storm": sc_storm, "scrape": sc_scrape,
}
SCENARIOS.update(CMD_SCENARIOS)  # the command rows: corral run, supervisord, circus


def main() -> int:
    name, params, result_path = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    # The original runs with enable_logs=False; corral's log lines (one per unexpected exit, to
    # stderr through logging's last-resort handler) are switched off the same way.
    logging.getLogger("corral").setLevel(logging.CRITICAL)
    # CPython <= 3.13 never preloads __main__ into the forkserver (it passes 'main_path', which
    # get_preparation_data never sets), so every forkserver child re-runs this module and its
    # imports. Preload those imports for every system alike; corral adds its own modules and the
    # target's to this list, and the floor gets the same head start.
    multiprocessing.set_forkserver_preload(["__main__", "corral", "bench_workers", "probe"])
    result = SCENARIOS[name](params)
    with open(result_path, "w") as fh:
        json.dump(result, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
