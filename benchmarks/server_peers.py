#!/usr/bin/env python3
"""Rolling reloads under load: ``uvicorn --workers N`` (SIGHUP) and gunicorn with uvicorn
workers (HUP), side by side, in one run.

    python3 benchmarks/server_peers.py [--quick] [--rate 300] [--reloads 10] [--workers 2,4]
                                       [--modes new,keepalive] [--peers uvicorn,gunicorn]

Sets up benchmarks/.venv-server (requirements-server.txt + corral, editable) and re-runs itself
there. For each peer x worker count x connection mode: start the server on server_app:app
(1 s start-up, 20 ms handler), wait until every worker is ready, run loadgen.py at ``--rate``
in its own process, reload ``--reloads`` times with ``--gap`` s of steady state between
reloads, then stop everything. This process is a child subreaper and kills every process left
below it by pid, also on failure or Ctrl-C.

A reload starts at the signal and is over when no worker of the old generation is alive and
N workers of the new one have finished their start-up (server_app writes a marker per pid).
Requests are assigned to a reload window (the signal to 0.5 s, ``--settle``, after the reload
is over) by their scheduled send time; "steady" is every request outside the reload windows
(and after the first second). The process count is the
server's whole tree (master + workers + helpers), sampled every 10 ms from /proc.
Writes benchmarks/results/server_peers.{json,md}.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENV = HERE / ".venv-server"
RESULTS = HERE / "results"


def _venv_digest() -> str:
    h = hashlib.sha256()
    for f in (HERE / "requirements-server.txt", ROOT / "pyproject.toml"):
        h.update(f.read_bytes())
    return h.hexdigest()


def ensure_venv() -> None:
    """Create/refresh benchmarks/.venv-server and re-exec this script with its Python."""
    python = VENV / "bin" / "python"
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    stamp = VENV / ".installed"
    digest = _venv_digest()
    if not (stamp.exists() and stamp.read_text() == digest and python.exists()):
        print(f"setting up {VENV.relative_to(ROOT)} (once) ...", flush=True)
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run([*pip, "--upgrade", "pip"], check=True)
        subprocess.run([*pip, "-r", str(HERE / "requirements-server.txt")], check=True)
        subprocess.run([*pip, "-e", str(ROOT)], check=True)
        stamp.write_text(digest)
    os.execv(str(python), [str(python), str(Path(__file__).resolve()), *sys.argv[1:]])


if __name__ == "__main__":
    ensure_venv()

# Only in the server venv from here on.
import contextlib  # noqa: E402
import ctypes  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from importlib import metadata  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(HERE))
import loadgen  # noqa: E402

_PR_SET_CHILD_SUBREAPER = 36
PY = str(VENV / "bin" / "python")


# ------------------------------------------------------------------------ the process tree


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` from /proc (cheap: no scan of every process)."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
        except OSError:
            continue
    return out


def _alive(pid: int) -> bool:
    """Running and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def tree(root: int) -> list[int]:
    """``root`` and its live descendants."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if _alive(pid):
            out.append(pid)
            todo.extend(_children(pid))
    return out


def kill_tree(root: int, grace: float) -> None:
    """SIGTERM ``root``; after ``grace`` s SIGKILL whatever of its tree is left."""
    with contextlib.suppress(OSError):
        os.kill(root, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and tree(root):
        time.sleep(0.02)
    for pid in tree(root):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def set_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print("warning: not a child subreaper; orphans would go to init", file=sys.stderr)


def sweep() -> list[str]:
    """SIGKILL every live descendant of this process (orphans land here), reap them by pid."""
    found = []
    for _ in range(3):
        pids = [p for p in tree(os.getpid()) if p != os.getpid()]
        if not pids:
            break
        for pid in pids:
            found.append(f"{pid} {_cmdline(pid)[:70]!r}")
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    deadline = time.monotonic() + 5
    for pid in _children(os.getpid()):
        # Reap by pid, never waitpid(-1) (it would take a Popen's status from under it).
        with contextlib.suppress(ChildProcessError):
            while time.monotonic() < deadline and os.waitpid(pid, os.WNOHANG)[0] == 0:
                time.sleep(0.01)
    return found


# ------------------------------------------------------------------------------- one case


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def server_command(peer: str, workers: int, port: int) -> list[str]:
    # Keep-alive idle timeout 5 s for both (uvicorn's default; gunicorn's is 2 s).
    if peer == "uvicorn":
        return [PY, "-m", "uvicorn", "server_app:app", "--workers", str(workers),
                "--host", "127.0.0.1", "--port", str(port), "--timeout-keep-alive", "5",
                "--log-level", "warning", "--no-access-log"]
    if peer == "gunicorn":
        return [PY, "-m", "gunicorn", "-k", "uvicorn_worker.UvicornWorker", "-w", str(workers),
                "-b", f"127.0.0.1:{port}", "--keep-alive", "5", "--log-level", "warning",
                "server_app:app"]
    if peer == "corral":
        # corral serve: a zygote per generation, readiness-gated rolling reload on HUP.
        sock = os.path.join(tempfile.mkdtemp(prefix="corral-bench-"), "ctl.sock")  # 0700
        return [PY, "-m", "corral.cli.main", "--socket", sock, "serve", "server_app:app",
                "--workers", str(workers), "--bind", f"127.0.0.1:{port}",
                "--log-level", "warning"]
    raise ValueError(f"peer: expected 'corral', 'uvicorn' or 'gunicorn', got {peer!r}")


@dataclass
class Case:
    peer: str
    workers: int
    keepalive: bool
    reload_windows: list[tuple[float, float]] = field(default_factory=list)  # monotonic
    max_procs: int = 0
    max_workers: int = 0
    max_workers_sample: list[str] = field(default_factory=list)  # what was counted, at the max
    baseline_procs: int = 0
    result: loadgen.LoadResult | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def mode(self) -> str:
        return "keep-alive" if self.keepalive else "new conn"


class Watch:
    """Polls the server's tree every 10 ms while waiting, keeping the maxima."""

    def __init__(self, case: Case, master: int, ready_dir: str) -> None:
        self.case, self.master, self.ready_dir = case, master, ready_dir

    def workers(self) -> set[int]:
        return set(self._workers())

    def _workers(self) -> dict[int, str]:
        # Every worker process below the master (corral's are its zygotes' children), not
        # the helpers (resource tracker, corral's keeper and zygotes), nor what is not a
        # program of its own: an empty cmdline (a process in its exit, its memory gone) or
        # the master's own (a fork of the master not exec'd yet, e.g. a zygote being started).
        master = _cmdline(self.master)
        out = {}
        for p in tree(self.master):
            cmd = _cmdline(p)
            if p == self.master or not cmd or cmd == master or any(
                    h in cmd for h in ("resource_tracker", "corral-keeper", "zygote")):
                continue
            out[p] = cmd
        return out

    def ready(self) -> set[int]:
        return {int(x) for x in os.listdir(self.ready_dir) if x.isdigit()}

    def sample(self) -> None:
        n = len(tree(self.master))
        self.case.max_procs = max(self.case.max_procs, n)
        workers = self._workers()
        if len(workers) > self.case.max_workers:
            self.case.max_workers = len(workers)
            self.case.max_workers_sample = [f"{p} {c[:60]}" for p, c in sorted(workers.items())]

    def until(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.sample()
            if cond():
                return
            if not _alive(self.master):
                raise RuntimeError(f"the server (pid {self.master}) died while waiting for "
                                   f"{what}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.01)

    def hold(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        self.until(lambda: time.monotonic() >= end, seconds + 5, "the end of a pause")


def http_ok(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(loadgen.build_request("/", f"127.0.0.1:{port}", keep_alive=False))
            return s.recv(12).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def run_case(case: Case, args: argparse.Namespace, tmp: str) -> None:
    port = free_port()
    ready_dir = tempfile.mkdtemp(dir=tmp, prefix="ready-")
    env = dict(os.environ, BENCH_READY_DIR=ready_dir, PYTHONUNBUFFERED="1")
    log_path = os.path.join(tmp, f"{case.peer}-{case.workers}-{case.mode}.log")
    out_path = os.path.join(tmp, "load.json")
    n = case.workers
    with open(log_path, "wb") as log:
        server = subprocess.Popen(server_command(case.peer, n, port), cwd=str(HERE), env=env,
                                  stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                  start_new_session=True)
    load: subprocess.Popen[bytes] | None = None
    watch = Watch(case, server.pid, ready_dir)
    try:
        watch.until(lambda: len(watch.workers() & watch.ready()) == n and http_ok(port), 60,
                    f"{n} ready workers")
        watch.hold(0.3)
        case.baseline_procs = len(tree(server.pid))
        case.max_procs = case.max_workers = 0
        case.max_workers_sample = []
        cmd = [PY, str(HERE / "loadgen.py"), "--url", f"http://127.0.0.1:{port}/",
               "--rate", str(args.rate), "--duration", "3600", "--json", out_path, "--records",
               "--timeout", str(args.timeout)]
        if case.keepalive:
            cmd.append("--keepalive")
        load = subprocess.Popen(cmd, cwd=str(HERE), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        watch.hold(args.warmup)
        for i in range(args.reloads):
            old = watch.workers()
            t_sig = time.monotonic()
            os.kill(server.pid, signal.SIGHUP)

            def rolled(old: set[int] = old) -> bool:
                now = watch.workers()
                return not (old & now) and len((now - old) & watch.ready()) == n

            try:
                watch.until(rolled, args.reload_timeout, f"reload {i + 1}")
            finally:
                case.reload_windows.append((t_sig, time.monotonic()))
            watch.hold(args.gap)
        load.send_signal(signal.SIGINT)
        _, err = load.communicate(timeout=args.timeout + 30)
        if load.returncode != 0:
            raise RuntimeError(f"loadgen exit code {load.returncode}: {err.decode()[-500:]}")
        with open(out_path) as f:
            case.result = loadgen.LoadResult.from_dict(json.load(f))
    finally:
        if load is not None and load.poll() is None:
            load.kill()
            load.wait()
        kill_tree(server.pid, grace=10)
        server.wait()
        log_tail = Path(log_path).read_text(errors="replace").strip().splitlines()[-3:]
        if log_tail:
            case.notes.append("server log tail: " + " | ".join(log_tail))


# ---------------------------------------------------------------------------- the figures


def summarize(case: Case, settle: float) -> dict[str, Any]:
    """The figures of one case. A reload window runs from the signal to ``settle`` s after the
    reload is over, so the requests that queued up during it count as the reload's."""
    r = case.result
    assert r is not None
    rel = [(a - r.t0, b - r.t0 + settle) for a, b in case.reload_windows]
    in_reload = [r.stats_between(a, b) for a, b in rel]
    fail_reload: dict[str, int] = {k: sum(s.failures[k] for s in in_reload)
                                   for k in loadgen.FAILURES}
    # Steady: outside every reload window, after the first second.
    edges = [1.0] + [x for a, b in rel for x in (a, b)] + [r.duration]
    steady_parts = [r.stats_between(edges[i], edges[i + 1]) for i in range(0, len(edges), 2)]
    steady_lat: list[float] = []
    reload_lat: list[float] = []
    for s, lat, o in zip(r.sched, r.latency, r.outcome, strict=True):
        if o != loadgen.OK or s < 1.0:
            continue
        (reload_lat if any(a <= s < b for a, b in rel) else steady_lat).append(lat)
    steady_lat.sort()
    reload_lat.sort()
    overall = r.stats_between()
    durations = [b - a for a, b in case.reload_windows]
    # Where each failure fell: (reload number, seconds after its signal, class, on a reused
    # connection); reload 0 = outside every reload window.
    failed_at = []
    for s, o, reused in zip(r.sched, r.outcome, r.reused, strict=True):
        if o == loadgen.OK:
            continue
        where = next(((i + 1, s - a) for i, (a, b) in enumerate(rel) if a <= s < b), (0, s))
        failed_at.append([where[0], round(where[1], 3), loadgen.OUTCOMES[o], int(reused)])

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 1)

    p99_steady = loadgen.percentile(steady_lat, 99)
    p99_reload = loadgen.percentile(reload_lat, 99)
    return {
        "peer": case.peer, "workers": case.workers, "mode": case.mode,
        "reloads": len(case.reload_windows), "sent": overall.sent, "ok": overall.ok,
        "failed": overall.failed, "failures": overall.failures,
        "failed_in_reload": sum(fail_reload.values()), "failures_in_reload": fail_reload,
        "failed_on_reused": overall.on_reused,
        "failed_steady": sum(s.failed for s in steady_parts),
        "reload_s_median": round(statistics.median(durations), 2) if durations else None,
        "reload_s_max": round(max(durations), 2) if durations else None,
        "p50_steady_ms": ms(loadgen.percentile(steady_lat, 50)),
        "p99_steady_ms": ms(p99_steady), "p99_reload_ms": ms(p99_reload),
        "max_reload_ms": ms(reload_lat[-1] if reload_lat else None),
        "p99_ratio": (round(p99_reload / p99_steady, 1)
                      if p99_reload is not None and p99_steady else None),
        "baseline_procs": case.baseline_procs, "max_procs": case.max_procs,
        "max_workers": case.max_workers, "max_workers_sample": case.max_workers_sample,
        "connections_opened": r.connections_opened,
        "stale_dropped": r.stale_dropped, "loadgen_cpu_percent": round(r.cpu_percent, 1),
        "loadgen_lag_p99_ms": round(r.lag_p99 * 1000, 1), "error_samples": r.error_samples,
        "reload_s": [round(d, 3) for d in durations], "failed_at": failed_at,
    }


COLUMNS = [
    ("peer", "peer"), ("workers", "N"), ("mode", "mode"), ("sent", "sent"),
    ("failed", "failed"), ("failed_in_reload", "in reload"), ("refused", "refused"),
    ("reset", "reset"), ("premature_close", "premature"), ("timeout", "timeout"),
    ("non_2xx", "non-2xx"), ("other", "other"), ("reload_s_median", "reload s (med)"),
    ("reload_s_max", "max"), ("p99_steady_ms", "p99 steady ms"),
    ("p99_reload_ms", "p99 reload ms"), ("p99_ratio", "ratio"),
    ("max_reload_ms", "max reload ms"), ("max_workers", "max workers"),
    ("max_procs", "max procs"), ("baseline_procs", "procs idle"),
    ("loadgen_cpu_percent", "loadgen CPU %"),
]


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |",
             "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for row in rows:
        cells = []
        for key, _ in COLUMNS:
            value = row.get(key, row.get("failures", {}).get(key, ""))
            cells.append("-" if value is None else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def versions() -> dict[str, str]:
    out = {}
    for dist in ("corral", "uvicorn", "gunicorn", "uvicorn-worker", "httptools", "uvloop",
                 "a2wsgi"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "?"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 reloads, 2 workers")
    ap.add_argument("--rate", type=float, default=300.0)
    ap.add_argument("--reloads", type=int, default=10)
    ap.add_argument("--workers", default="2,4")
    ap.add_argument("--modes", default="new,keepalive")
    ap.add_argument("--peers", default="corral,uvicorn,gunicorn")
    ap.add_argument("--gap", type=float, default=2.0, help="steady seconds between reloads")
    ap.add_argument("--warmup", type=float, default=3.0, help="steady seconds before reloads")
    ap.add_argument("--settle", type=float, default=0.5,
                    help="seconds after a reload still counted as its window")
    ap.add_argument("--timeout", type=float, default=5.0, help="per request, seconds")
    ap.add_argument("--reload-timeout", type=float, default=60.0)
    ap.add_argument("--out", default=str(RESULTS / "server_peers"),
                    help="writes OUT.json and OUT.md")
    args = ap.parse_args()
    if args.quick:
        args.reloads, args.workers = min(args.reloads, 3), "2"
    set_subreaper()

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    # SIGINT too: a shell starts background jobs with SIGINT ignored, and Python keeps that.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    cases = [Case(peer, int(n), mode == "keepalive")
             for peer in args.peers.split(",") for n in args.workers.split(",")
             for mode in args.modes.split(",")]
    vers = versions()
    print(f"server peers: {len(cases)} cases, {args.reloads} reloads each at {args.rate:g} "
          f"req/s; {platform.python_version()}, {vers}", flush=True)
    rows: list[dict[str, Any]] = []
    interrupted = False
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="corral-server-peers-") as tmp:
            for i, case in enumerate(cases, 1):
                print(f"[{i}/{len(cases)}] {case.peer} -w {case.workers}, {case.mode} ...",
                      end=" ", flush=True)
                t = time.monotonic()
                try:
                    run_case(case, args, tmp)
                    row = summarize(case, args.settle)
                    rows.append(row)
                    print(f"{time.monotonic() - t:.0f} s: failed {row['failed']} "
                          f"({ {k: v for k, v in row['failures'].items() if v} }), reload "
                          f"{row['reload_s_median']} s, p99 {row['p99_steady_ms']} -> "
                          f"{row['p99_reload_ms']} ms, max procs {row['max_procs']}",
                          flush=True)
                except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                    case.error = f"{type(exc).__name__}: {exc}"
                    print(f"ERROR {case.error}", flush=True)
                    for note in case.notes:
                        print(f"    {note}", flush=True)
                finally:
                    strays = sweep()
                    if strays:
                        print(f"    killed {len(strays)} stray process(es): {strays}",
                              flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted", flush=True)
    finally:
        sweep()
    md = table(rows)
    print()
    print(md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"rate": args.rate, "reloads": args.reloads, "gap_s": args.gap,
            "settle_s": args.settle,
            "warmup_s": args.warmup, "timeout_s": args.timeout, "versions": vers,
            "python": platform.python_version(), "kernel": platform.release(),
            "cores": os.cpu_count(), "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "seconds": round(time.monotonic() - started, 1)}
    errors = [{"peer": c.peer, "workers": c.workers, "mode": c.mode, "error": c.error,
               "notes": c.notes} for c in cases if c.error]
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows,
                                                    "errors": errors}, indent=1))
    out.with_suffix(".md").write_text(
        f"Rolling reloads under load ({args.reloads} per row, {args.rate:g} req/s open loop, "
        f"server_app: 1 s start-up, 20 ms handler); {vers}; Python {meta['python']}, Linux "
        f"{meta['kernel']}, {meta['cores']} cores.\n\n{md}\n")
    return 130 if interrupted else 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
