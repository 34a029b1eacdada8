#!/usr/bin/env python3
"""``make bench``: corral beside the original WorkerProcessManager and the physical floor.

    python3 benchmarks/run.py [--quick] [--only SUBSTRING]

Sets up its own virtualenv (benchmarks/.venv-bench: corral in editable mode, duckframework,
matplotlib, psutil) and re-runs itself there. Each measurement runs in a fresh process
(scenarios.py) with a timeout; this process is a child subreaper, so every process any scenario
leaves behind ends up here and is killed by pid. Writes benchmarks/results/latest.{json,md} and
latency.png and prints the table.
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
VENV = HERE / ".venv-bench"
RESULTS = HERE / "results"


# ------------------------------------------------------------------------- the bench's venv


def _venv_digest() -> str:
    h = hashlib.sha256()
    for f in (HERE / "requirements.txt", ROOT / "pyproject.toml"):
        h.update(f.read_bytes())
    return h.hexdigest()


def ensure_venv() -> None:
    """Create/refresh benchmarks/.venv-bench and re-exec this script with its Python."""
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
        subprocess.run([*pip, "-r", str(HERE / "requirements.txt")], check=True)
        subprocess.run([*pip, "-e", str(ROOT)], check=True)
        stamp.write_text(digest)
    os.execv(str(python), [str(python), str(Path(__file__).resolve()), *sys.argv[1:]])


if __name__ == "__main__":
    ensure_venv()

# Only in the bench's venv from here on.
import contextlib  # noqa: E402
import ctypes  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import psutil  # noqa: E402

sys.path.insert(0, str(HERE))
import report  # noqa: E402

_PR_SET_CHILD_SUBREAPER = 36


@dataclass
class Job:
    scenario: str
    system: str
    params: dict[str, Any]
    timeout: float
    title: str
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    strays: list[str] = field(default_factory=list)


class OverallTimeout(Exception):
    pass


def compat_available() -> bool:
    try:
        import corral

        # corral resolves some names lazily: a missing module surfaces as ImportError, not
        # AttributeError, so hasattr alone can raise.
        return hasattr(corral, "WorkerProcessManager")
    except Exception:
        return False


def plan(quick: bool, compat: bool) -> tuple[list[Job], dict[str, Any]]:
    """Every measurement of this run, in order."""
    q = quick
    cfg = {
        "idle_sizes": [64] if q else [8, 64, 512],
        "idle_window": 1.0 if q else 10.0,
        "storm_window": 1.5 if q else 10.0,
        "startup_sizes": [8] if q else [8, 32, 128],
        "scrape_window": 3.0 if q else 10.0,
    }
    jobs: list[Job] = []

    def add(scenario: str, system: str, params: dict[str, Any], estimate: float,
            title: str) -> None:
        jobs.append(Job(scenario, system, dict(params, system=system), 60 + 4 * estimate, title))

    wpms = ["original", *(["compat"] if compat else [])]
    # 1. recovery, and its floor
    # The floor details (bare kill->pidfd->reap->start, fork round trip) only in full mode.
    if not q:
        add("floor_fork", "floor", {"reps": 300}, 1, "floor: os.fork round trip")
    for m in ("fork", "forkserver", "spawn"):
        few = m == "spawn"
        single = (2 if few else 8) if q else (10 if few else 30)
        multi = (1 if few else 2) if q else (5 if few else 10)
        bare = 10 if few else 20
        if not q:
            add("floor_start", "floor", {"method": m, "bare": bare}, 0.3 * bare,
                f"floor: bare kill -> pidfd -> reap -> start, {m}")
        add("recovery", "corral", {"method": m, "single": single, "multi": multi,
                                   "paired_floor": True},
            0.6 * (single + multi * 4), f"recovery: corral, {m} (and its floor, paired)")
    for system in wpms:
        slow = system == "original"
        add("recovery", system,
            {"method": "fork", "single": (3 if q else 10) if slow else (5 if q else 20),
             "multi": (1 if q else 4) if slow else (2 if q else 10),
             "phase": [0.0, 2.0] if slow else [0.02, 0.3]},
            30 if slow else 10, f"recovery: {system}, fork")
    # Duck's own call: restart_timeout=2. Kills rotate over 4 workers, each worker killed at
    # most every ~2.5 s (a restart within the cool-down of the last one waits, by design).
    for system in wpms:
        slow = system == "original"
        add("recovery", system,
            {"method": "fork", "single": (3 if q else 8) if slow else (4 if q else 12),
             "multi": 0, "restart_timeout": 2.0, "key": "recovery_duck",
             "paired_floor": not slow, "phase": [0.6, 0.7] if not slow else [0.6, 2.6]},
            40 if slow else 15, f"recovery: {system}, fork, restart_timeout=2 (Duck's call)")
    # Hot standbys (issue 16): SIGKILL -> the replacement's first line with standby=1, judged
    # against the fork floor of the same run under every start method; four killed at once
    # with standby=2 (two through standbys, two cold); a 2 s warm-up with and without.
    for m in ("fork", "forkserver", "spawn"):
        single = (3 if q else 12)
        add("recovery", "corral", {"method": m, "single": single, "multi": 0 if q else 4,
                                   "paired_floor": True, "floor_method": "fork",
                                   "standby": 1 if q else 2, "key": "recovery_standby",
                                   "phase": [0.03, 0.08]},
            1.5 * single + 12, f"recovery: corral, {m}, standby (and the fork floor, paired)")
    add("recovery", "corral", {"method": "forkserver", "single": 2 if q else 4, "multi": 0,
                               "worker": "slow_boot_sleeper", "key": "warm_cold",
                               "phase": [0.1, 0.2]},
        15, "recovery: corral, a 2 s warm-up, no standby")
    add("recovery", "corral", {"method": "forkserver", "single": 2 if q else 4, "multi": 0,
                               "worker": "slow_boot_sleeper", "key": "warm_standby",
                               "standby": 1, "warm_up": True, "phase": [0.1, 0.2]},
        20, "recovery: corral, a 2 s warm-up, standby=1")
    # 2. hang detection
    add("hang", "corral", {"reps": 3 if q else 10,
                           "beat_for": [0.1, 0.2] if q else [0.25, 0.35]}, 10, "hang: corral")
    for system in wpms:
        slow = system == "original"
        add("hang", system, {"reps": (2 if q else 6) if slow else (3 if q else 10),
                             "beat_for": ([0.1, 2.1] if slow else [0.1, 0.2]) if q
                             else ([0.3, 2.3] if slow else [0.25, 0.6])},
            40 if slow else 15, f"hang: {system}")
    # 3. beat cost
    k = 3 if q else 5  # repetitions of the timed loop: best of k
    n_fast = 300_000 if q else 1_000_000
    n_slow = 3000 if q else 20000  # the Manager's round trip is ~40 us a call
    add("beat", "corral", {"n": n_fast, "k": k}, 2, "beat: corral.beat()")
    add("beat", "floor", {"n": n_fast, "k": k, "n_manager": n_slow}, 5,
        "beat: floor (shared-memory store) and Manager().dict()")
    for system in wpms:
        add("beat", system, {"n": n_slow if system == "original" else n_fast, "k": k}, 5,
            f"beat: {system} update_heartbeat")
    # 4. idle cost, 8. scale
    for n in cfg["idle_sizes"]:
        for system in ["corral", *wpms]:
            for hb in (False, True):
                reps = 0
                if n == 512 and not hb:
                    reps = 3 if system == "original" else 10
                add("idle", system, {"workers": n, "heartbeat": hb,
                                     "window": cfg["idle_window"],
                                     "settle": 0.7 if q else 1.0,
                                     "recovery_reps": reps,
                                     "phase": [0.0, 2.0] if system == "original"
                                     else [0.02, 0.3]},
                    cfg["idle_window"] + 5 + n * 0.02 + reps * 2,
                    f"idle: {system}, {n} workers, heartbeats {'on' if hb else 'off'}")
    # 5. shutdown
    for system in ["corral", *wpms]:
        for ignore in (False, True):
            if q and ignore and system == "original":
                continue  # 8 s a repetition (one 1 s join per worker): not for the dev loop
            add("shutdown", system, {"ignore": ignore, "reps": 1 if q else 3},
                30 if ignore else 5,
                f"shutdown: {system}, workers {'ignore' if ignore else 'exit on'} SIGTERM")
    # 6. start-up
    for n in cfg["startup_sizes"]:
        for system, m in [("corral", "fork"), ("corral", "forkserver"), ("floor", "fork"),
                          ("floor", "forkserver"), *[(s, "fork") for s in wpms]]:
            add("startup", system, {"workers": n, "method": m, "reps": 1 if q else 3},
                n * 0.1, f"start-up: {system}, {n} workers, {m}")
    # 9. the metrics endpoint: CPU scraped every second (64), answer time (512)
    sw = cfg["scrape_window"]
    add("scrape", "corral", {"workers": 64, "window": sw, "interval": 1.0, "probes": True},
        2 * sw + 5, "metrics endpoint: 64 workers, scraped every 1 s")
    add("scrape", "corral", {"workers": 512, "window": sw, "interval": 0.2, "cpu": False},
        sw + 20, "metrics endpoint: 512 workers, answer time")
    if not q:
        add("scrape", "corral", {"workers": 512, "window": sw, "interval": 0.2, "cpu": False,
                                 "per_worker": True},
            sw + 20, "metrics endpoint: 512 workers, per-worker series, answer time")
    # 7. crash storm
    w = cfg["storm_window"]
    add("storm", "corral", {"window": w}, w, "crash storm: corral, default backoff")
    add("storm", "corral", {"window": w, "backoff": False}, w, "crash storm: corral, no backoff")
    for system in wpms:
        add("storm", system, {"window": w}, w, f"crash storm: {system}")
    # 9. command workers (issue 11): `corral run -n N -- CMD` beside supervisord and circus,
    # each as its own program, the floor a bare Popen of the same command in corral's job.
    for system in CMD_SYSTEMS:
        reps = (4 if q else 20) if system == "corral" else (3 if q else 12)
        add("cmd_recovery", system, {"reps": reps, "paired_floor": system == "corral"},
            reps * (0.8 if system == "corral" else 1.5) + 5,
            f"commands: {system}, SIGKILL -> replacement's first line")
    for system in CMD_SYSTEMS:
        add("cmd_shutdown", system, {"reps": 1 if q else 3}, 15,
            f"commands: {system}, stop of 8 that ignore SIGTERM (1 s timeout)")
    for system in CMD_SYSTEMS:
        add("cmd_idle", system, {"workers": 64, "window": cfg["idle_window"],
                                 "settle": 1.0 if q else 2.0}, cfg["idle_window"] + 20,
            f"commands: {system}, idle CPU with 64 commands")
    add("cmd_logs", "corral", {"rate": 10_000, "seconds": 2.0 if q else 5.0}, 15,
        "commands: corral run, 4 x 10,000 log lines/s")
    return jobs, cfg


CMD_SYSTEMS = ("corral", "supervisord", "circus")


# --------------------------------------------------------------------------- running jobs


def job_env() -> dict[str, str]:
    """The environment every scenario process runs in."""
    env = dict(os.environ)
    env["DUCK_SECRETS_DIR"] = str(VENV / "duck-secrets")  # duck writes a secret at import
    env["PYTHONPATH"] = str(HERE)
    env.pop("PYTHONSTARTUP", None)
    return env


def set_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print("warning: could not become a child subreaper; orphans go to init",
              file=sys.stderr)


def sweep(exclude: int | None = None, grace: float = 0.5) -> list[str]:
    """SIGKILL every descendant still running after ``grace`` s (orphans land here), reap;
    describe each.

    The grace lets what ends by itself a moment after its program (multiprocessing's forkserver
    and resource tracker, workers on their parent-death signal) do so without counting.
    """
    me = psutil.Process()
    procs = [p for p in me.children(recursive=True) if p.pid != exclude]
    _, procs = psutil.wait_procs(procs, timeout=grace) if grace > 0 and procs else ([], procs)
    found = []
    for proc in procs:
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                found.append(f"pid {proc.pid} {' '.join(proc.cmdline())[:80]!r} "
                             f"(age {time.time() - proc.create_time():.1f} s)")
                proc.kill()
        except psutil.Error:
            continue
    deadline = time.monotonic() + 5
    for proc in me.children():
        if proc.pid == exclude:
            continue
        # Reap by pid (never waitpid(-1): it could take a scenario's status from Popen).
        with contextlib.suppress(ChildProcessError):
            while time.monotonic() < deadline:
                pid, _ = os.waitpid(proc.pid, os.WNOHANG)
                if pid:
                    break
                time.sleep(0.005)
    return found


def run_job(job: Job, env: dict[str, str], tmp: str, deadline: float) -> None:
    result_path = os.path.join(tmp, "result.json")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(result_path)
    err_path = os.path.join(tmp, "stderr.txt")
    t0 = time.monotonic()
    timeout = min(job.timeout, max(1.0, deadline - t0))
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "scenarios.py"), job.scenario, json.dumps(job.params),
             result_path], cwd=str(HERE), env=env, stdin=subprocess.DEVNULL,
            stdout=err, stderr=err, start_new_session=True)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            job.error = f"timed out after {timeout:.0f} s"
            rc = None
        except BaseException:
            job.error = "interrupted"
            rc = None
            raise
        finally:
            if proc.poll() is None:
                # Everything below the scenario first (the subreaper keeps it ours), then it.
                sweep(exclude=proc.pid, grace=0)
                proc.kill()
                proc.wait()
            job.seconds = time.monotonic() - t0
            job.strays = sweep()
    if rc is not None and rc != 0:
        tail = Path(err_path).read_text(errors="replace").strip().splitlines()[-6:]
        job.error = f"exit code {rc}: " + " | ".join(x.strip() for x in tail)
    elif rc == 0:
        try:
            job.result = json.loads(Path(result_path).read_text())
        except (OSError, ValueError) as exc:
            job.error = f"no result: {exc}"
    if time.monotonic() > deadline:
        raise OverallTimeout


# --------------------------------------------------------------------------------- machine


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    from importlib import metadata

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "?"

    return {"cpu": model, "cores": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "implementation": platform.python_implementation(),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "corral": version("corral"), "duckframework": version("duckframework"),
            "supervisor": version("supervisor"), "circus": version("circus")}


def machine_line(m: dict[str, Any]) -> str:
    return (f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux {m['kernel']}, "
            f"{m['implementation']} {m['python']}; corral {m['corral']}, duckframework "
            f"{m['duckframework']}, supervisor {m.get('supervisor', '?')}, circus "
            f"{m.get('circus', '?')}; load average {m['loadavg_at_start']} at start"
            + (f", {m['loadavg_at_end']} at end" if "loadavg_at_end" in m else ""))


# ------------------------------------------------------------------------------------ main


NOTES = [
    "Every figure is the median over repetitions; (min-max) after it. Each system runs in a "
    "fresh process of its own, one at a time, in the same run.",
    "original = duck.utils.multiprocessing.process_manager.WorkerProcessManager from PyPI "
    "duckframework, as installed, at its most favourable settings: restart_timeout=0, "
    "enable_logs=False, fork (its closure target cannot run under spawn/forkserver). Its "
    "monitor polls every 2 s, so kills are placed at phases spread evenly over that poll "
    "(stratified), hangs at a random phase.",
    "corral runs with Backoff(reset_after=0) for recovery (restart at once, as after a crash "
    "following a stable run), RestartBudget(max_restarts=None), fork unless the row names "
    "another start method, logging off (as the original's enable_logs=False).",
    "floor = a bare multiprocessing.Process of the same start method: .start() -> its first "
    "line (4-at-once: 4 bare starts), measured in corral's own supervising process, alternating "
    "with corral's repetitions so both see the same load. The forkserver preloads the "
    "supervising program's imports for every system alike (CPython does not preload __main__).",
    "recovery = SIGKILL of a worker -> its replacement's first line of user code "
    "(time.monotonic() written to a FIFO); hang = the worker's last beat + heartbeat_timeout "
    "(0.5 s) -> its death (pidfd) / its replacement's first line.",
    "idle CPU = the supervisor process's CPU (clock_getcpuclockid, ns resolution) plus its "
    "helper processes' (the original's Manager server), per 10 s; workers sleep, and beat every "
    "0.2 s with heartbeats on (heartbeat_timeout 5 s).",
    "shutdown: 8 workers each with a grandchild (sleep 600); stop timeout 1 s; processes still "
    "running (not zombies) the moment stop() returns are counted, then killed by pid.",
    "metrics endpoint: Supervisor(http=...) with workers beating every 0.2 s (heartbeat_timeout "
    "5 s); a scraper process (benchmarks/scraper.py, stdlib only) GETs /metrics on one "
    "kept-alive connection as Prometheus does, once per interval; supervisor CPU = this "
    "process's (its monitor, spawner and endpoint threads) over the scraping window, per 10 s, "
    "beside the same pool with the endpoint on and nobody scraping; answer time = request sent "
    "-> body read, in the scraper; the first scrape also reads every worker's RSS; /readyz "
    "probes open a new connection each, as the kubelet does.",
    "commands (issue 11): every system supervises the same command, `python -I -S "
    "cmd_worker.py` (its first line is time.monotonic() written to the FIFO), each as its own "
    "program stopped with SIGTERM: `corral run -n N --stop-timeout 1 --set "
    "backoff={reset_after=0} --set budget={max_restarts=\"unlimited\"} -- CMD`; supervisord "
    "(`supervisord -n`, autorestart, startsecs=0, stopwaitsecs=1, its defaults otherwise: "
    "stopasgroup/killasgroup false); circusd (respawn, warmup_delay=0, graceful_timeout=1, "
    "endpoints on 127.0.0.1, its defaults otherwise). floor = a bare subprocess.Popen of the "
    "same argv -> its first line, alternating with corral's repetitions. Idle CPU counts the "
    "supervisor process and its helpers (corral's keeper), not the workers. The log row runs "
    "benchmarks/log_bench.py --through-corral: 4 commands x 10,000 numbered lines/s into "
    "corral run's console sink (prefixes, timestamps) on a pipe, every line checked.",
    "The machine is shared (2 cores): the load average at start and end is given above. Under "
    "load every latency grows, corral's (a monitor thread, a spawner thread and the new child "
    "handing work along) more than a bare start's.",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, no 512 (< 1 min)")
    ap.add_argument("--no-server", action="store_true",
                    help="skip the server scenario (server_peers.py, server_extra.py)")
    ap.add_argument("--only", default=None, help="run only jobs whose title contains this")
    ap.add_argument("--timeout", type=float, default=None,
                    help="overall limit, seconds (default 240 quick, 1200 full)")
    args = ap.parse_args()
    set_subreaper()
    started = time.monotonic()
    limit = args.timeout or (240.0 if args.quick else 1200.0)
    deadline = started + limit
    compat = compat_available()
    jobs, cfg = plan(args.quick, compat)
    if args.only:
        jobs = [j for j in jobs if args.only in j.title]
    mach = machine()
    mode = "quick" if args.quick else "full"
    print(f"corral bench ({mode}): {len(jobs)} measurements; {machine_line(mach)}")
    if not compat:
        print("corral.WorkerProcessManager is not available: no corral-compat column")

    env = job_env()

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    interrupted = None
    with tempfile.TemporaryDirectory(prefix="corral-bench-run-") as tmp:
        for i, job in enumerate(jobs, 1):
            print(f"[{i:2}/{len(jobs)}] {job.title} ...", end=" ", flush=True)
            try:
                run_job(job, env, tmp, deadline)
            except OverallTimeout:
                interrupted = f"overall time limit ({limit:.0f} s) reached"
            except KeyboardInterrupt:
                interrupted = "interrupted"
            status = "ok" if job.error is None else f"ERROR: {job.error}"
            stray = (f", {len(job.strays)} stray process(es) killed: {'; '.join(job.strays)}"
                     if job.strays else "")
            print(f"{job.seconds:.1f} s {status}{stray}", flush=True)
            if interrupted:
                print(f"stopping: {interrupted}")
                break
        sweep()

    # ------------------------------------------------------------------------- assemble
    samples: dict[str, dict[str, list[float]]] = {}
    errors: dict[str, dict[str, str]] = {}
    info: list[dict[str, Any]] = []
    for job in jobs:
        if job.error:
            errors.setdefault(job.system, {})[job.title] = job.error
        for key, value in job.result.items():
            if key == "info":
                info.append({"job": job.title, **value})
            elif key == "by_system":  # figures a job took for another column (a paired floor)
                for system, metrics in value.items():
                    for metric, values in metrics.items():
                        samples.setdefault(system, {}).setdefault(metric, []).extend(values)
            elif isinstance(value, list) and value:
                samples.setdefault(job.system, {}).setdefault(key, []).extend(value)
    summaries = {s: {k: report.summary(v) for k, v in metrics.items()}
                 for s, metrics in samples.items()}
    # The peers' columns only when they were measured (--only may leave them out).
    systems = [s for s in report.SYSTEMS if (s != "compat" or compat)
               and (s not in ("supervisord", "circus") or s in samples)]
    rows = report.rows(args.quick, cfg["storm_window"], cfg["idle_sizes"])
    header, table, records = report.build_table(rows, summaries, systems)
    text = report.text_table(header, table)
    elapsed = time.monotonic() - started
    mach["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print()
    print(f"machine: {machine_line(mach)}")
    print(text)
    misses = [(r["label"], t["target"]) for r in records for t in r["targets"]
              if t["pass"] is False]
    print()
    print(f"targets: {sum(1 for r in records for t in r['targets'] if t['pass'])} PASS, "
          f"{len(misses)} MISS" + "".join(f"\n  MISS: {lbl}: {t}" for lbl, t in misses))
    all_errors = [f"{s}: {t}: {e}" for s, d in errors.items() for t, e in d.items()]
    for e in all_errors:
        print(f"  error: {e}")
    strays = [(j.title, j.strays) for j in jobs if j.strays]
    for title, found in strays:
        print(f"  note: outlived the scenario '{title}' (killed): {'; '.join(found)}")

    RESULTS.mkdir(exist_ok=True)
    # A run cut short or narrowed by --only must not overwrite the last complete one.
    stem = "partial" if (interrupted or args.only) else "latest"
    out = {"mode": mode, "when": when, "seconds": round(elapsed, 1), "machine": mach,
           "machine_line": machine_line(mach), "systems": systems, "config": cfg,
           "interrupted": interrupted, "rows": records, "errors": all_errors,
           "strays": strays, "info": info, "notes": NOTES,
           "samples": summaries}
    (RESULTS / f"{stem}.json").write_text(json.dumps(out, indent=1, default=float) + "\n")
    md = [f"# corral benchmarks ({mode})", "",
          f"{when}, {elapsed:.0f} s. Machine: {machine_line(mach)}.", "",
          "Command: `make bench`" + ("-quick" if args.quick else "") + " (benchmarks/run.py).",
          "", report.markdown_table(header, table), "",
          f"Targets: {sum(1 for r in records for t in r['targets'] if t['pass'])} PASS, "
          f"{len(misses)} MISS.", ""]
    md += [f"- MISS: {lbl}: {t}" for lbl, t in misses]
    md += [f"- error: {e}" for e in all_errors]
    md += ["", "![recovery and hang-detection latency](latency.png)", "", "## How", ""]
    md += [f"- {n}" for n in NOTES]
    if interrupted:
        md += ["", f"**Incomplete run: {interrupted}.**"]
    (RESULTS / f"{stem}.md").write_text("\n".join(md) + "\n")
    try:
        report.chart(str(RESULTS / f"{'latency' if stem == 'latest' else stem}.png"), rows,
                     summaries, systems,
                     f"corral bench ({mode}), {when}\n{mach['cpu']}, {mach['cores']} cores, "
                     f"Linux {mach['kernel']}, Python {mach['python']}, load average "
                     f"{mach['loadavg_at_start'][0]} at start")
    except Exception as exc:  # the chart is a nicety: the figures are already written
        print(f"  chart failed: {type(exc).__name__}: {exc}")
    png = "latency.png" if stem == "latest" else f"{stem}.png"
    print(f"\nwrote {RESULTS.relative_to(ROOT)}/{stem}.json, {stem}.md, {png} "
          f"({elapsed:.0f} s)")
    server_rc = 0
    if not (args.only or args.no_server or interrupted):
        # Server mode (issue 12): corral serve beside uvicorn --workers and gunicorn with
        # uvicorn workers, reloaded under load; then start cost, PSS, a broken deploy, a kill.
        # Both scripts run in benchmarks/.venv-server (same venv for every server).
        print("\nserver scenario: corral serve, uvicorn --workers, gunicorn + UvicornWorker",
              flush=True)
        for script in ("server_peers.py", "server_extra.py"):
            cmd = [sys.executable, str(HERE / script), *(["--quick"] if args.quick else [])]
            server_rc |= subprocess.run(cmd, cwd=str(HERE)).returncode
    return 1 if interrupted or all_errors or server_rc else 0


if __name__ == "__main__":
    sys.exit(main())
