"""The command rows of the bench (issue 11): ``corral run`` beside supervisord, circus and the
floor, every system supervising the same command (``python -I -S cmd_worker.py MODE PROBE``).

Each system runs as its own program, as operators run it: ``corral run -n N -- CMD``,
``supervisord -n -c FILE``, ``circusd FILE``, stopped with SIGTERM. Every network endpoint
(circus's ZeroMQ ones) is on 127.0.0.1. The floor is a bare ``subprocess.Popen`` of the same
argv -> its first line, measured in the same scenario as corral's repetitions.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bench_workers as bw
from probe import Probe, Record, alive, kill_pids, process_cpu

HERE = Path(__file__).resolve().parent
CMD = [sys.executable, "-I", "-S", str(HERE / "cmd_worker.py")]

Params = dict[str, Any]
Result = dict[str, Any]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CommandPool:
    """One supervisor program running ``n`` copies of cmd_worker.py ``mode``."""

    def __init__(self, system: str, mode: str, n: int, probe: Probe, *,
                 stop_timeout: float = 1.0) -> None:
        self.system = system
        self.n = n
        self.probe = probe
        self.tmp = tempfile.mkdtemp(prefix=f"corral-bench-{system}-")
        self.proc: subprocess.Popen[bytes] | None = None
        # circus numbers its workers from 1 ($(circus.wid)): records are shifted back to 0..
        self.index_offset = 1 if system == "circus" else 0
        argv_tail = [mode, probe.path]
        if system == "corral":
            sock = os.path.join(self.tmp, "sock")
            os.mkdir(sock, 0o700)
            self.argv = [sys.executable, "-c", "from corral.cli.main import main; main()",
                         "--socket", os.path.join(sock, "c.sock"), "run", "-n", str(n),
                         "--name", "w", "--stop-timeout", f"{stop_timeout:g}",
                         # As the peers are set up: restart at once, never give up.
                         "--set", "backoff={reset_after=0}",
                         "--set", 'budget={max_restarts="unlimited"}', "--", *CMD, *argv_tail]
        elif system == "supervisord":
            conf = os.path.join(self.tmp, "supervisord.conf")
            cmd = " ".join([*CMD, *argv_tail, "%(process_num)d"])
            Path(conf).write_text(f"""\
[supervisord]
nodaemon = true
logfile = {self.tmp}/supervisord.log
pidfile = {self.tmp}/supervisord.pid
loglevel = warn

[unix_http_server]
file = {self.tmp}/supervisor.sock

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[program:w]
command = {cmd}
process_name = %(program_name)s_%(process_num)d
numprocs = {n}
autorestart = true
startsecs = 0
startretries = 1000000
stopwaitsecs = {stop_timeout:g}
stdout_logfile = NONE
stderr_logfile = NONE
""")
            self.argv = [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", conf]
        elif system == "circus":
            conf = os.path.join(self.tmp, "circus.ini")
            Path(conf).write_text(f"""\
[circus]
endpoint = tcp://127.0.0.1:{_free_port()}
pubsub_endpoint = tcp://127.0.0.1:{_free_port()}
statsd = false
loglevel = WARNING
logoutput = {self.tmp}/circus.log

[watcher:w]
cmd = {CMD[0]}
args = {" ".join([*CMD[1:], *argv_tail])} $(circus.wid)
numprocesses = {n}
warmup_delay = 0
graceful_timeout = {stop_timeout:g}
respawn = true
copy_env = true
""")
            self.argv = [sys.executable, "-m", "circus.circusd", conf]
        else:
            raise ValueError(system)

    def start(self) -> None:
        with open(os.path.join(self.tmp, "output.txt"), "wb") as out:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         cwd=self.tmp)

    def record(self, rec: Record) -> Record:
        return Record(rec.kind, rec.index - self.index_offset, rec.pid, rec.value,
                      rec.received)

    def next(self, timeout: float, kind: int, what: str) -> Record:
        return self.record(self.probe.next(timeout, kind, what))

    def wait_starts(self, timeout: float) -> dict[int, Record]:
        latest: dict[int, Record] = {}
        deadline = time.monotonic() + timeout
        while len(latest) < self.n:
            rec = self.next(max(0.001, deadline - time.monotonic()), bw.START,
                            f"first lines of {self.n} workers ({len(latest)} so far)")
            latest[rec.index] = rec
        return latest

    def own_pids(self) -> list[int]:
        """The supervisor and its helpers (corral's keeper): what its CPU figure counts."""
        import psutil

        assert self.proc is not None
        workers = self.probe.pids
        try:
            helpers = [c.pid for c in psutil.Process(self.proc.pid).children()
                       if c.pid not in workers]
        except psutil.NoSuchProcess:
            helpers = []
        return [self.proc.pid, *helpers]

    def stop(self, timeout: float = 60.0) -> float:
        """SIGTERM the supervisor; seconds until it has exited."""
        assert self.proc is not None
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout)
        return time.monotonic() - t0

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.stop(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        shutil.rmtree(self.tmp, ignore_errors=True)


def _finish(pool: CommandPool | None, probe: Probe) -> None:
    try:
        if pool is not None:
            pool.close()
    finally:
        kill_pids(probe.pids | probe.grandchildren, probe.started)
        probe.close()


def sc_cmd_recovery(p: Params) -> Result:
    """SIGKILL one command worker -> its replacement's first line; corral's repetitions are
    paired with the floor: a bare Popen of the same argv -> its first line."""
    system, n, reps = p["system"], p.get("workers", 4), p["reps"]
    probe = Probe()
    pool = CommandPool(system, "sleeper", n, probe)
    floor: list[float] = []
    single: list[float] = []
    bare: list[subprocess.Popen[bytes]] = []

    def bare_start(i: int) -> float:
        t0 = time.monotonic()
        proc = subprocess.Popen([*CMD, "sleeper", probe.path, str(1000 + i)],
                                stdin=subprocess.DEVNULL)
        bare.append(proc)
        rec = probe.next(15, bw.START, "a bare command's first line")
        proc.kill()
        proc.wait(10)
        return rec.value - t0

    try:
        pool.start()
        current = pool.wait_starts(60)
        time.sleep(0.5)
        if p.get("paired_floor"):
            bare_start(-1)  # warm-up
        for r in range(reps):
            time.sleep(0.05 + 0.1 * (r % 3))
            if p.get("paired_floor"):
                floor.append(bare_start(r))
                time.sleep(0.05)
            idx = r % n
            old = current[idx].pid
            t0 = time.monotonic()
            os.kill(old, signal.SIGKILL)
            while True:
                rec = pool.next(30, bw.START, f"the replacement of worker {idx}")
                current[rec.index] = rec
                if rec.index == idx and rec.pid != old:
                    break
            single.append(rec.value - t0)
        out: Result = {"cmd_recovery": single}
        if floor:
            out["by_system"] = {"floor": {"cmd_recovery": floor}}
        return out
    finally:
        for proc in bare:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        _finish(pool, probe)


def sc_cmd_shutdown(p: Params) -> Result:
    """SIGTERM to the supervisor of 8 commands that ignore SIGTERM (each with a `sleep`
    child): seconds until it exits, then processes still alive (workers + grandchildren)."""
    system, n = p["system"], p.get("workers", 8)
    seconds, left, left_gc = [], [], []
    for _ in range(p["reps"]):
        probe = Probe()
        pool = CommandPool(system, "stopper", n, probe, stop_timeout=1.0)
        try:
            pool.start()
            pool.wait_starts(60)
            while len(probe.grandchildren) < n:
                pool.next(30, bw.GRANDCHILD, "the grandchildren")
            time.sleep(0.2)
            workers, gcs = set(probe.pids), set(probe.grandchildren)
            seconds.append(pool.stop())
            left.append(sum(alive(pid) for pid in workers | gcs))
            left_gc.append(sum(alive(pid) for pid in gcs))
        finally:
            _finish(pool, probe)
    return {"cmd_shutdown": seconds, "cmd_shutdown.left": left,
            "info": {"system": system, "grandchildren_left": left_gc}}


def sc_cmd_idle(p: Params) -> Result:
    """CPU of the supervisor (and its helpers) over ``window`` s with n sleeping commands."""
    system, n, window = p["system"], p["workers"], p["window"]
    probe = Probe()
    pool = CommandPool(system, "sleeper", n, probe)
    try:
        pool.start()
        pool.wait_starts(60 + n * 0.2)
        time.sleep(p.get("settle", 2.0))
        pids = pool.own_pids()

        def used() -> float:
            return sum(c for c in (process_cpu(pid) for pid in pids) if c is not None)

        c0, t0 = used(), time.monotonic()
        time.sleep(window)
        cpu, elapsed = used() - c0, time.monotonic() - t0
        return {f"cmd_idle.{n}": [cpu / elapsed * 10.0],
                "info": {"system": system, "processes_counted": len(pids)}}
    finally:
        _finish(pool, probe)


def sc_cmd_logs(p: Params) -> Result:
    """4 commands x ``rate`` lines/s through ``corral run`` (log_bench --through-corral)."""
    import log_bench

    with tempfile.TemporaryDirectory() as tmp:
        res = log_bench.run_through_corral(p.get("workers", 4), p["rate"], p["seconds"], tmp)
    per10k = res["cpu"] / max(res["lines"], 1) * 10_000
    return {"cmd_logs.lost": [res["lost"] + res["order_errors"]],
            "cmd_logs.cpu": [per10k],
            "cmd_logs.rate": [res["lines"] / max(res["wall"], 1e-9)],
            "info": dict(res)}


SCENARIOS = {"cmd_recovery": sc_cmd_recovery, "cmd_shutdown": sc_cmd_shutdown,
             "cmd_idle": sc_cmd_idle, "cmd_logs": sc_cmd_logs}
