#!/usr/bin/env python3
"""corral serve beyond the reload matrix (server_peers.py has that): start cost of a worker under
each start method, PSS of 8 workers, a broken deploy, a worker SIGKILLed under load.

    python3 benchmarks/server_extra.py [--quick]

Runs in benchmarks/.venv-server (made by server_peers.py). Writes
benchmarks/results/server_extra.{json,md}. Every process started is killed by pid at the end
(this process is a child subreaper).

- start: the time from a start request to the new worker's first line of user code, median of
  20, for a zygote fork, the stdlib forkserver and spawn (measured through corral's own start
  paths, the app preloaded where the method allows);
- PSS: 8 workers of server_app (1 s start-up) serving, zygote vs spawn (psutil memory_full_info,
  summed over the workers, after they are ready);
- broken deploy: corral serve -w 2 under 300 req/s; the app module is replaced by one that
  fails to import, then by one that never becomes ready; `corral reload` each time: its exit
  code and time against ready_timeout + 1 s, failed requests (0 wanted), the old generation
  still serving;
- SIGKILL: a worker SIGKILLed under 300 req/s: failed requests (only its in-flight ones), and
  kill -> the replacement accepting (the listener appears in its epoll set, read from
  /proc/PID/fdinfo), against 2x a zygote fork; and, in the same loop, kill -> the victim's exit
  done (zombie or reaped): the kernel tears down its memory before any supervisor can learn of
  the death, so corral's own part is exit -> accepting. With the app's 1 s lifespan start-up
  only a hot standby (forked from the zygote, start-up already run) can be that quick: one row
  with --standby 1 and the 1 s start-up, one without a standby and a 0 s start-up.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import server_peers  # noqa: E402

if __name__ == "__main__" and Path(sys.prefix).resolve() != server_peers.VENV.resolve():
    # The server venv (made by server_peers.py): the same uvicorn as the peers.
    _py = str(server_peers.VENV / "bin" / "python")
    os.execv(_py, [_py, str(Path(__file__).resolve()), *sys.argv[1:]])

import loadgen  # noqa: E402

PY = str(server_peers.VENV / "bin" / "python")
RESULTS = HERE / "results"


# --------------------------------------------------------------------------- start cost


_START_CODE = r"""
import json, os, statistics, sys, time, socket, signal
sys.path.insert(0, sys.argv[2])
method = sys.argv[1]
os.environ["BENCH_STARTUP_S"] = "0"
import corral
from corral.serve._listeners import bind
from corral.serve._worker import WorkerInit
lst = bind("127.0.0.1:0", name="web")
init = WorkerInit(app="server_app:app", uvicorn={"log_level": "warning"})
marks = os.path.join(sys.argv[3], "marks")
os.makedirs(marks, exist_ok=True)

def target(index):  # the first line of user code: stamp it
    pass

times = []
if method == "zygote":
    from corral.serve._zygote import Zygote
    from corral._bootstrap import BootConfig
    z = Zygote("bench@1", init, [lst.fd])
    z.start(30)
    for i in range(20):
        t = time.monotonic()
        child = z.fork(BootConfig(pool="b", index=0, name="b", supervisor_pid=os.getpid(),
                       heartbeat_path=None, wake_path=None, ready_on_beat=False,
                       dump_signal=None, forkserver=False), ())
        # The child's first line: its pid is in /proc with the zygote as parent (the fork
        # reply comes after the fork), so the reply time is the start cost.
        times.append(time.monotonic() - t)
        child.kill_and_reap()
    z.retire()
else:
    import multiprocessing
    from corral.process import WorkerProcess
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(["corral._bootstrap", "corral.serve._worker"])
    r, w = multiprocessing.Pipe(duplex=False)  # reaches forkserver/spawn children too
    from bench_first_line import first_line
    for i in range(20):
        t = time.monotonic()
        p = WorkerProcess.start(ctx, first_line, (w, "server_app"), "b", False)
        r.recv_bytes()
        times.append(time.monotonic() - t)
        p.kill_and_reap()
print(json.dumps({"median_ms": statistics.median(times) * 1000,
                  "min_ms": min(times) * 1000, "max_ms": max(times) * 1000}))
"""

_FIRST_LINE = '''def first_line(conn, module):
    __import__("uvicorn")  # what a worker of this method must import before serving
    __import__(module)
    conn.send_bytes(b"x")
'''


def start_cost(tmp: str) -> dict[str, Any]:
    Path(tmp, "bench_first_line.py").write_text(_FIRST_LINE)
    out = {}
    env = dict(os.environ, PYTHONPATH=f"{tmp}:{HERE}")
    for method in ("zygote", "forkserver", "spawn"):
        res = subprocess.run([PY, "-c", _START_CODE, method, str(HERE), tmp], env=env,
                             capture_output=True, text=True, timeout=300, cwd=tmp)
        if res.returncode != 0:
            out[method] = {"error": res.stderr[-800:]}
        else:
            out[method] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


# ------------------------------------------------------------------------------ helpers


def _serve(tmp: str, app: str, workers: int, port: int, method: str = "zygote",
           extra: list[str] | None = None, env: dict[str, str] | None = None
           ) -> tuple[subprocess.Popen[bytes], str]:
    sock = os.path.join(tmp, f"ctl-{port}.sock")
    cmd = [PY, "-m", "corral.cli.main", "--socket", sock, "serve", app, "--workers",
           str(workers), "--bind", f"127.0.0.1:{port}", "--start-method", method,
           "--app-dir", tmp, "--log-level", "warning", *(extra or [])]
    log = open(os.path.join(tmp, f"serve-{port}.log"), "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=tmp, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            env=dict(os.environ, **(env or {})), start_new_session=True)
    return proc, sock


def _workers(master: int) -> list[int]:
    return [p for p in server_peers.tree(master) if p != master and "worker" in
            server_peers._cmdline(p)]


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _zygote_of(master: int) -> int:
    for pid in _children(master):
        if "zygote" in server_peers._cmdline(pid):
            return pid
    raise RuntimeError(f"corral serve {master} has no zygote")


def _is_standby(pid: int) -> bool:
    return "standby" in server_peers._cmdline(pid)


def _exited(pid: int) -> bool:
    """The process has finished exiting: a zombie, or already reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def _wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _ready_pids(ready_dir: str) -> set[int]:
    return {int(x) for x in os.listdir(ready_dir) if x.isdigit()}


def _load(port: int, tmp: str, rate: float, keepalive: bool = False
          ) -> tuple[subprocess.Popen[bytes], str]:
    out = os.path.join(tmp, f"load-{port}.json")
    cmd = [PY, str(HERE / "loadgen.py"), "--url", f"http://127.0.0.1:{port}/", "--rate",
           str(rate), "--duration", "3600", "--json", out, "--records", "--timeout", "5"]
    if keepalive:
        cmd.append("--keepalive")
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True), out


def _end_load(load: subprocess.Popen[bytes], out: str) -> loadgen.LoadResult:
    load.send_signal(signal.SIGINT)
    load.communicate(timeout=40)
    with open(out) as f:
        return loadgen.LoadResult.from_dict(json.load(f))


def _pss(pids: list[int]) -> int:
    import psutil

    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(pid).memory_full_info().pss
    return total


# ------------------------------------------------------------------------------ PSS


def pss(tmp: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method in ("zygote", "spawn"):
        port = server_peers.free_port()
        ready_dir = tempfile.mkdtemp(dir=tmp)
        proc, _ = _serve(tmp, "server_app:app", 8, port, method,
                         env={"BENCH_READY_DIR": ready_dir, "PYTHONPATH": str(HERE)})
        try:
            _wait(lambda proc=proc, rd=ready_dir: len(set(_workers(proc.pid))
                                                       & _ready_pids(rd)) == 8,
                  90, f"8 ready workers ({method})")
            time.sleep(1.0)
            pids = _workers(proc.pid)
            out[method] = {"workers": len(pids), "pss_mib": round(_pss(pids) / 2**20, 1)}
        finally:
            server_peers.kill_tree(proc.pid, 10)
            proc.wait()
    z, s = out["zygote"]["pss_mib"], out["spawn"]["pss_mib"]
    out["ratio"] = round(z / s, 3) if s else None
    return out


# ------------------------------------------------------------------------- broken deploy

_GOOD = "from server_app import app  # noqa\n"
_IMPORT_ERROR = "raise ImportError('a broken deploy: this module does not import')\n"
_NEVER_READY = ("import os\nos.environ['BENCH_STARTUP_S'] = '3600'\n"
                "from server_app import app  # noqa\n")


def broken_deploy(tmp: str, rate: float, ready_timeout: float) -> dict[str, Any]:
    appdir = tempfile.mkdtemp(dir=tmp)
    shutil.copy(HERE / "server_app.py", appdir)
    mod = Path(appdir, "deploy_app.py")
    mod.write_text(_GOOD)
    port = server_peers.free_port()
    proc, sock = _serve(appdir, "deploy_app:app", 2, port, extra=[
        "--ready-timeout", str(ready_timeout)])
    rows: dict[str, Any] = {}
    load = None
    try:
        _wait(lambda: server_peers.http_ok(port) and len(_workers(proc.pid)) == 2, 60,
              "2 workers")
        time.sleep(1.5)  # every worker past its 1 s start-up
        load, out = _load(port, tmp, rate)
        time.sleep(2)
        for case, text in (("import error", _IMPORT_ERROR), ("never ready", _NEVER_READY)):
            before = set(_workers(proc.pid))
            mod.write_text(text)
            t = time.monotonic()
            res = subprocess.run([PY, "-m", "corral.cli.main", "--socket", sock, "reload"],
                                 capture_output=True, text=True, timeout=ready_timeout + 60)
            took = time.monotonic() - t
            time.sleep(2)  # the old generation keeps serving; the new one's leftovers leave
            after = set(_workers(proc.pid))
            rows[case] = {"exit_code": res.returncode, "seconds": round(took, 2),
                          "limit_s": ready_timeout + 1,
                          "old_workers_kept": len(before & after),
                          "message": (res.stderr or res.stdout).strip()[-300:]}
            mod.write_text(_GOOD)
        result = _end_load(load, out)
        load = None
        st = result.stats_between()
        rows["requests"] = {"sent": st.sent, "failed": st.failed, "failures": st.failures}
    finally:
        if load is not None:
            load.kill()
            load.wait()
        server_peers.kill_tree(proc.pid, 10)
        proc.wait()
    return rows


# ---------------------------------------------------------------------------- SIGKILL


def listener_inode(port: int) -> int:
    """The inode of the listening TCP socket on ``port`` (from /proc/net/tcp)."""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            if parts[3] == "0A" and int(parts[1].split(":")[1], 16) == port:
                return int(parts[9])
    raise RuntimeError(f"no listener on port {port}")


def accepting(pid: int, inode: int) -> bool:
    """``pid`` has the listener registered in one of its epoll sets: its server accepts."""
    needle = f" ino:{inode:x} "  # spaces: not a longer inode that starts the same
    try:
        for fd in os.listdir(f"/proc/{pid}/fdinfo"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/fdinfo/{fd}") as f:
                text = f.read()
                if "tfd:" in text and needle in text:
                    return True
    except OSError:
        return False
    return False


def epoll_fds(pid: int) -> list[int]:
    """``pid``'s epoll fds (a standby's event loop has its own before the hand-over)."""
    out = []
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[eventpoll]":
                    out.append(int(fd))
    return out


def accepting_in(pid: int, fds: list[int], inode: int) -> bool:
    """:func:`accepting`, reading only the epoll fds ``fds`` of ``pid`` (one small file
    each, where the full scan reads every fd's: ~0.5 ms for a uvicorn worker, which made
    the poll itself the slowest part of what it timed)."""
    needle = f" ino:{inode:x} "
    for fd in fds:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/fdinfo/{fd}") as f:
            if needle in f.read():
                return True
    return False


def sigkill(tmp: str, rate: float, kills: int, standby: int, startup: str) -> dict[str, Any]:
    port = server_peers.free_port()
    proc, _ = _serve(tmp, "server_app:app", 2, port, extra=["--standby", str(standby)],
                     env={"BENCH_STARTUP_S": startup, "PYTHONPATH": str(HERE)})
    load = None
    took: list[float] = []
    exits: list[float] = []  # kill -> the victim's exit done (zombie or reaped)
    kill_times: list[float] = []
    try:
        _wait(lambda: server_peers.http_ok(port) and len(_workers(proc.pid)) == 2, 60,
              "2 workers")
        inode = listener_inode(port)
        _wait(lambda: all(accepting(p, inode) for p in _workers(proc.pid)), 30,
              "both workers accepting")
        time.sleep(float(startup) + 1.5)  # the standby warmed up too
        load, out = _load(port, tmp, rate)
        time.sleep(2)
        zygote = _zygote_of(proc.pid)
        for _ in range(kills):
            before = set(_children(zygote))
            # A standby takes the worker's title at the hand-over: tell them apart before.
            standbys = {pid for pid in before if _is_standby(pid)}
            # A standby's epoll fds, read before the kill: while the clock runs only those are
            # read (its listener shows up there), the victim's stat, 50 us apart. A new process
            # (no standby, or a standby that did not take over) is found by the full scan,
            # after 20 ms or at once without a standby.
            watched = [(pid, epoll_fds(pid)) for pid in sorted(standbys)]
            if any(accepting_in(pid, fds, inode) for pid, fds in watched):
                raise RuntimeError("a standby accepts before any worker was killed")
            victim = sorted(_workers(proc.pid))[0]
            t = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            kill_times.append(t)
            found = exited = None
            took_over: list[int] = []
            while (found is None or exited is None) and time.monotonic() - t < 30:
                now = time.monotonic()
                if exited is None and _exited(victim):
                    exited = now
                if found is None:
                    took_over = [pid for pid, fds in watched if accepting_in(pid, fds, inode)]
                    if took_over:  # stamped after the read that saw it: an upper bound
                        found = time.monotonic()
                if found is None and (not watched or now - t > 0.02):
                    for pid in _children(zygote):
                        if (pid != victim and (pid not in before or pid in standbys)
                                and accepting(pid, inode)):
                            found = time.monotonic()
                            break
                time.sleep(0.00005)
            if found is None or exited is None:
                raise RuntimeError("no replacement accepting within 30 s")
            if took_over and not accepting(took_over[0], inode):  # the full scan must agree
                raise RuntimeError(f"standby {took_over[0]}: the two reads disagree")
            exits.append(exited - t)
            took.append(found - t)
            time.sleep(float(startup) + 1.5)  # a new standby warms up
        result = _end_load(load, out)
        load = None
        st = result.stats_between()
        # Each failed request against the kill before it: sent before the kill (in flight
        # in the victim) or after (the replacement's fault).
        offsets = []
        for sched, outcome in zip(result.sched, result.outcome, strict=True):
            if outcome == loadgen.OK:
                continue
            at = result.t0 + sched
            nearest = min(kill_times, key=lambda k, at=at: abs(at - k), default=None)
            offsets.append(None if nearest is None else round((at - nearest) * 1000, 1))
    finally:
        if load is not None:
            load.kill()
            load.wait()
        server_peers.kill_tree(proc.pid, 10)
        proc.wait()
    sent_after = [o for o in offsets if o is not None and o > 0]
    return {"kills": kills, "standby": standby,
            "failed_sent_before_kill": len(offsets) - len(sent_after),
            "failed_sent_after_kill": len(sent_after),
            "failed_offsets_ms": offsets, "startup_s": float(startup), "sent": st.sent,
            "failed": st.failed, "failures": {k: v for k, v in st.failures.items() if v},
            "replacement_ms_median": round(statistics.median(took) * 1000, 2),
            "replacement_ms_max": round(max(took) * 1000, 2),
            "replacement_ms": [round(x * 1000, 2) for x in took],
            # The kernel's own teardown of the killed process (its memory first): nothing can
            # notice the death before it ends, so what corral adds is the difference.
            "victim_exit_ms_median": round(statistics.median(exits) * 1000, 2),
            "exit_to_accepting_ms_median": round(
                statistics.median(a - e for a, e in zip(took, exits, strict=True)) * 1000, 2),
            "exit_to_accepting_ms_max": round(
                max(a - e for a, e in zip(took, exits, strict=True)) * 1000, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rate", type=float, default=300.0)
    ap.add_argument("--ready-timeout", type=float, default=5.0)
    ap.add_argument("--out", default=str(RESULTS / "server_extra"))
    ap.add_argument("--only", default=None, metavar="NAME",
                    help="run only the parts whose name contains NAME (start, pss, broken, "
                         "sigkill); written to --out, so give another path")
    args = ap.parse_args()
    server_peers.set_subreaper()
    started = time.monotonic()
    report: dict[str, Any] = {"meta": {"python": platform.python_version(),
                                       "loadavg_start": [round(x, 2) for x in
                                                         os.getloadavg()]}}
    try:
        with tempfile.TemporaryDirectory(prefix="corral-server-extra-") as tmp:
            for name, fn in (("start", lambda: start_cost(tmp)), ("pss", lambda: pss(tmp)),
                             ("broken", lambda: broken_deploy(tmp, args.rate,
                                                              args.ready_timeout)),
                             ("sigkill_standby", lambda: sigkill(
                                 tmp, args.rate, 2 if args.quick else 5, 1, "1.0")),
                             ("sigkill", lambda: sigkill(tmp, args.rate,
                                                         2 if args.quick else 5, 0, "0"))):
                if args.only is not None and args.only not in name:
                    continue
                t = time.monotonic()
                try:
                    report[name] = fn()
                except Exception as exc:
                    report[name] = {"error": f"{type(exc).__name__}: {exc}"}
                finally:
                    server_peers.sweep()
                print(f"{name} ({time.monotonic() - t:.0f} s): {json.dumps(report[name])}",
                      flush=True)
    finally:
        server_peers.sweep()
    report["meta"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    report["meta"]["seconds"] = round(time.monotonic() - started, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 1 if any(isinstance(v, dict) and "error" in v for v in report.values()) else 0


def markdown(r: dict[str, Any]) -> str:
    lines = [f"corral serve extras ({r['meta'].get('seconds')} s; load average "
             f"{r['meta'].get('loadavg_start')} at start, {r['meta'].get('loadavg_end')} at "
             "end)", ""]
    start = r.get("start", {})
    lines += ["| start method | request -> worker's first line, median (min-max) |", "|---|---|"]
    for m in ("zygote", "forkserver", "spawn"):
        x = start.get(m, {})
        lines.append(f"| {m} | " + (f"{x['median_ms']:.2f} ms ({x['min_ms']:.2f}-"
                                    f"{x['max_ms']:.2f})" if "median_ms" in x
                                    else str(x.get("error", "-"))[:80]) + " |")
    p = r.get("pss", {})
    lines += ["", f"PSS of 8 workers: zygote {p.get('zygote', {}).get('pss_mib')} MiB, spawn "
              f"{p.get('spawn', {}).get('pss_mib')} MiB, ratio {p.get('ratio')} (target <= 0.6)"]
    b = r.get("broken", {})
    for case in ("import error", "never ready"):
        x = b.get(case, {})
        lines.append(f"- broken deploy, {case}: `corral reload` exit {x.get('exit_code')} after "
                     f"{x.get('seconds')} s (limit {x.get('limit_s')} s), old workers kept "
                     f"{x.get('old_workers_kept')}")
    req = b.get("requests", {})
    lines.append(f"- broken deploys: {req.get('failed')} failed of {req.get('sent')} requests")
    zyg = start.get("zygote", {}).get("median_ms")
    for key, what in (("sigkill_standby", "standby=1, the app's 1 s start-up"),
                      ("sigkill", "no standby, a 0 s start-up")):
        k = r.get(key, {})
        lines.append(f"- SIGKILL x{k.get('kills')} under load ({what}): {k.get('failed')} "
                     f"failed of {k.get('sent')} ({k.get('failures')}; sent before the kill: "
                     f"{k.get('failed_sent_before_kill')}, after: "
                     f"{k.get('failed_sent_after_kill')}); kill -> replacement "
                     f"accepting {k.get('replacement_ms_median')} ms median, "
                     f"{k.get('replacement_ms_max')} max; of which the kernel's exit of the "
                     f"killed worker {k.get('victim_exit_ms_median')} ms median; its exit -> "
                     f"replacement accepting {k.get('exit_to_accepting_ms_median')} ms median, "
                     f"{k.get('exit_to_accepting_ms_max')} max (2x a zygote fork, median of "
                     f"20 = {round(2 * zyg, 2) if zyg else '-'} ms; compared: medians)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
