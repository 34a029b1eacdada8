"""Rows, targets and rendering: the terminal table, latest.md, latest.json, latency.png."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SYSTEMS = ("corral", "compat", "original", "supervisord", "circus", "floor")
HEADERS = {"corral": "corral", "compat": "corral-compat", "original": "original",
           "supervisord": "supervisord", "circus": "circus", "floor": "floor"}

Results = dict[str, dict[str, list[float]]]  # system -> metric -> samples


def summary(samples: list[float]) -> dict[str, Any]:
    s = sorted(samples)
    n = len(s)

    def q(p: float) -> float:
        if n == 1:
            return s[0]
        k = (n - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return s[lo] + (s[hi] - s[lo]) * (k - lo)

    return {"n": n, "median": statistics.median(s), "min": s[0], "max": s[-1],
            "p25": q(0.25), "p75": q(0.75), "mean": statistics.fmean(s),
            "samples": samples}


Summaries = dict[str, dict[str, Any]]  # system -> summary of one metric
Check = Callable[[Summaries], bool | None]


@dataclass
class Target:
    text: str
    # (summaries by system) -> True/False, or None when a figure it needs is missing
    check: Check


@dataclass
class Row:
    key: str
    label: str
    unit: str  # "ms", "ns", "ms/10s", "KiB", "count"
    scale: float = 1.0  # samples are multiplied by this for display
    targets: list[Target] = field(default_factory=list)
    chart: bool = False
    stat: str = "median"  # the headline figure: "median", or "min" for best-of-k timings


def _med(s: Summaries, system: str) -> float | None:
    entry = s.get(system)
    return None if entry is None else float(entry["median"])


def below(limit: float, system: str = "corral") -> Check:
    def check(s: Summaries) -> bool | None:
        v = _med(s, system)
        return None if v is None else v < limit
    return check


def at_most(limit: float, system: str = "corral") -> Check:
    def check(s: Summaries) -> bool | None:
        v = _med(s, system)
        return None if v is None else v <= limit
    return check


def max_at_most(limit: float, system: str = "corral") -> Check:
    def check(s: Summaries) -> bool | None:
        entry = s.get(system)
        return None if entry is None else float(entry["max"]) <= limit
    return check


def ratio_at_most(limit: float, other: str, system: str = "corral") -> Check:
    def check(s: Summaries) -> bool | None:
        a, b = _med(s, system), _med(s, other)
        if a is None or b is None or b == 0:
            return None
        return a / b <= limit
    return check


def faster_than(*others: str, system: str = "corral") -> Check:
    """Below every one of ``others`` (None until all were measured)."""
    def check(s: Summaries) -> bool | None:
        a = _med(s, system)
        bs = [_med(s, o) for o in others]
        if a is None or any(b is None for b in bs):
            return None
        return all(a < b for b in bs if b is not None)
    return check


def command_rows() -> list[Row]:
    """The command workers (issue 11): corral run beside supervisord, circus and the floor."""
    return [
        Row("cmd_recovery", "commands: SIGKILL -> replacement's 1st line (floor: bare Popen)",
            "ms", 1e3, [Target("<= 2x floor", ratio_at_most(2.0, "floor")),
                        Target("faster than supervisord and circus",
                               faster_than("supervisord", "circus"))], chart=True),
        Row("cmd_shutdown", "commands: stop of 8 that ignore SIGTERM, 1 s timeout", "ms", 1e3,
            [Target("< 1200 ms", below(1200.0))]),
        Row("cmd_shutdown.left", "  left alive (workers + grandchildren)", "count", 1.0,
            [Target("0", max_at_most(0))]),
        Row("cmd_idle.64", "commands: idle CPU of the supervisor, 64 commands", "ms/10s", 1e3,
            [Target("< 2 ms per 10 s", below(2.0))]),
        Row("cmd_logs.lost", "commands: log lines lost, 4 x 10,000 lines/s", "count", 1.0,
            [Target("0", max_at_most(0))]),
        Row("cmd_logs.rate", "  lines/s through corral run (all 4)", "lines/s", 1.0),
        Row("cmd_logs.cpu", "  corral's CPU per 10,000 lines", "ms", 1e3),
    ]


def rows(quick: bool, storm_window: float, idle_sizes: list[int]) -> list[Row]:
    out = []
    for m in ("fork", "forkserver", "spawn"):
        targets = []
        if m in ("fork", "forkserver"):
            targets.append(Target("<= 2x floor", ratio_at_most(2.0, "floor")))
        if m == "fork":
            targets.append(Target(">= 100x faster than original",
                                  ratio_at_most(0.01, "original")))
        out.append(Row(f"recovery.{m}", f"recovery, {m}: SIGKILL -> new worker's 1st line",
                       "ms", 1e3, targets, chart=True))
    for m in ("fork", "forkserver", "spawn"):
        # Against its own floor (4 bare starts). Not against the original's 100x: with
        # restart_timeout=0 it restarts all four in one poll (~1 s), and 4 bare starts alone
        # take ~1/100 of that.
        targets = []
        if m in ("fork", "forkserver"):
            targets.append(Target("<= 2x floor", ratio_at_most(2.0, "floor")))
        out.append(Row(f"recovery4.{m}", f"recovery, 4 killed at once, {m} (all 4 back)", "ms",
                       1e3, targets, chart=m == "fork"))
    for m in ("fork", "forkserver", "spawn"):
        out.append(Row(f"recovery_standby.{m}",
                       f"recovery, {m}, standby=1: SIGKILL -> replacement's 1st line "
                       "(floor: fork kill->pidfd->start)", "ms",
                       1e3, [Target("<= 1.0x the fork floor", ratio_at_most(1.0, "floor"))],
                       chart=True))
    for m in ("fork", "forkserver", "spawn"):
        out.append(Row(f"recovery_standby4.{m}", f"  4 killed at once, {m}, standby=2: all back",
                       "ms", 1e3))
        for k, nth in ((1, "1st"), (2, "2nd"), (3, "3rd"), (4, "4th")):
            out.append(Row(f"recovery_standby4.{m}.{k}", f"    the {nth} back", "ms", 1e3))
    out.append(Row("warm_cold.forkserver",
                   "recovery with a 2 s warm-up, no standby: SIGKILL -> serving", "ms", 1e3))
    out.append(Row("warm_standby.forkserver",
                   "recovery with a 2 s warm-up, standby=1 (warm-up in standby_init)", "ms", 1e3,
                   [Target("< 50 ms", below(50.0))]))
    out.append(Row("recovery_duck.fork",
                   "recovery, fork, WorkerProcessManager(restart_timeout=2) as Duck calls it",
                   "ms", 1e3, [Target("compat <= 2x floor",
                                      ratio_at_most(2.0, "floor", system="compat"))]))
    for m in ("fork", "forkserver", "spawn"):
        out.append(Row(f"recovery_bare.{m}",
                       f"  floor detail: bare kill->pidfd->reap->start, {m}", "ms", 1e3))
    out.append(Row("fork_roundtrip", "  floor detail: os.fork()+_exit+waitpid", "ms", 1e3))
    out.append(Row("hang.kill", "hang: (last beat + 0.5 s) -> worker dead", "ms", 1e3,
                   [Target("< 50 ms", below(50.0))], chart=True))
    out.append(Row("hang.replace", "hang: (last beat + 0.5 s) -> new worker's 1st line", "ms",
                   1e3, chart=True))
    out.append(Row("beat", "beat: per call in a worker, best of k loops", "ns", 1.0,
                   [Target("< 300 ns", below(300.0))], stat="min"))
    out.append(Row("beat.manager", "  reference: Manager().dict()[i] = time.time()", "ns",
                   stat="min"))
    out.append(Row("beat.loop", "  empty loop, per iteration (in the beat figures)", "ns"))
    for n in idle_sizes:
        for hb in ("off", "on"):
            targets = []
            if n == 64:
                targets.append(Target("< 2 ms per 10 s", below(2.0)))
            if n == 512:
                targets.append(Target("< 1% of a core", below(100.0)))
            out.append(Row(f"idle.{n}.{hb}", f"idle CPU, {n} workers, heartbeats {hb}",
                           "ms/10s", 1e3, targets))
    for n in idle_sizes:
        if n >= 64:
            out.append(Row(f"rss.{n}.off", f"supervisor RSS per worker, {n} workers", "KiB",
                           1 / 1024))
    if 512 in idle_sizes:
        out.append(Row("recovery.512", "recovery with 512 workers, fork", "ms", 1e3,
                       chart=True))
    out.append(Row("shutdown.exit", "stop(), 8 workers that exit on SIGTERM", "ms", 1e3,
                   [Target("< 100 ms", below(100.0))]))
    out.append(Row("shutdown.exit.left", "  left alive (workers + grandchildren)", "count", 1.0,
                   [Target("0", max_at_most(0))]))
    out.append(Row("shutdown.ignore", "stop(), 8 workers that ignore SIGTERM", "ms", 1e3,
                   [Target("< 1200 ms", below(1200.0))]))
    out.append(Row("shutdown.ignore.left", "  left alive (workers + grandchildren)", "count",
                   1.0, [Target("0", max_at_most(0))]))
    for m in ("fork", "forkserver"):
        for n in ((8,) if quick else (8, 32, 128)):
            # Issue 9's target for fork start-ups (a forkserver start-up is the server's).
            out.append(Row(f"startup.{m}.{n}", f"start-up, {n} workers, {m}: all 1st lines",
                           "ms", 1e3, [Target("<= 1.2x floor", ratio_at_most(1.2, "floor"))]
                           if m == "fork" else []))
    out.append(Row("scrape.64.cpu", "metrics: supervisor CPU, 64 workers, scraped every 1 s",
                   "ms/10s", 1e3, [Target("< 5 ms per 10 s", below(5.0))]))
    out.append(Row("scrape.64.idle", "  same pool, endpoint on, nobody scraping", "ms/10s",
                   1e3))
    out.append(Row("scrape.64.per_scrape", "  CPU per scrape, 64 workers", "ms", 1e3))
    out.append(Row("scrape.64.latency", "  answer time of /metrics, 64 workers", "ms", 1e3))
    out.append(Row("scrape.64.readyz", "  answer time of /readyz, new connection each", "ms",
                   1e3))
    out.append(Row("scrape.512.latency", "metrics: answer time of /metrics, 512 workers", "ms",
                   1e3, [Target("< 50 ms", below(50.0))]))
    out.append(Row("scrape.512.first", "  first scrape (reads 512 RSS)", "ms", 1e3))
    out.append(Row("scrape.512.per_scrape", "  CPU per scrape, 512 workers", "ms", 1e3))
    out.append(Row("scrape.512.pw.latency", "  with per-worker series (1,536 more)", "ms",
                   1e3, [Target("< 50 ms", below(50.0))]))
    w = f"{storm_window:g} s"
    # corral: its default Backoff; original/compat: restart_timeout=0, as everywhere here.
    out.append(Row("storm.restarts", f"crash storm, as configured: restarts in {w}",
                   "count"))
    out.append(Row("storm.cpu", "crash storm, as configured: supervisor CPU", "ms/10s",
                   1e3))
    out.append(Row("storm_nobackoff.restarts", f"crash storm, no backoff: restarts in {w}",
                   "count"))
    out.append(Row("storm_nobackoff.cpu", "crash storm, no backoff: supervisor CPU", "ms/10s",
                   1e3))
    out.extend(command_rows())
    return out


# ---------------------------------------------------------------------------------- format


def fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    if a >= 0.01:
        return f"{v:.3f}"
    return f"{v:.2g}"


def cell(entry: dict[str, Any] | None, scale: float) -> str:
    if entry is None:
        return "-"
    if "error" in entry:
        return "error"
    med = fmt(entry["median"] * scale)
    if entry["n"] == 1:
        return med
    return f"{med} ({fmt(entry['min'] * scale)}-{fmt(entry['max'] * scale)})"


def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
    if not a or not b or "error" in a or "error" in b or b["median"] == 0:
        return "-"
    r = a["median"] / b["median"]
    if r == 0:
        return "0"
    if r < 1:
        return f"1/{1 / r:.3g}"
    return f"{r:.3g}x"


def build_table(rows_: list[Row], summaries: dict[str, dict[str, dict[str, Any]]],
                systems: list[str]) -> tuple[list[str], list[list[str]], list[dict[str, Any]]]:
    """Header, text rows and a JSON-ready record per row (with target results)."""
    header = ["metric", "unit", *[HEADERS[s] for s in systems], "corral/orig", "corral/floor",
              "target", "result"]
    table, records = [], []
    for row in rows_:
        per = {s: summaries.get(s, {}).get(row.key) for s in systems}
        if row.stat != "median":  # the headline (and what targets and ratios use)
            per = {s: None if v is None else dict(v, median=v[row.stat])
                   for s, v in per.items()}
        if all(v is None for v in per.values()):
            continue
        # Targets are in display units: check the scaled figures.
        present = {s: {k: (x * row.scale if k in ("median", "min", "max", "p25", "p75", "mean")
                           else x) for k, x in v.items()}
                   for s, v in per.items() if v is not None and "error" not in v}
        verdicts = []
        for t in row.targets:
            ok = t.check(present)
            verdicts.append({"target": t.text, "pass": ok})
        if "compat" in systems and row.targets:
            compat_present = dict(present)
            if "compat" in compat_present:
                compat_present["corral"] = compat_present["compat"]
                for v, t in zip(verdicts, row.targets, strict=True):
                    v["compat_pass"] = t.check(compat_present)
        result = " ".join("-" if v["pass"] is None else ("PASS" if v["pass"] else "MISS")
                          for v in verdicts)
        table.append([row.label, row.unit, *[cell(per[s], row.scale) for s in systems],
                      ratio(per.get("corral"), per.get("original")),
                      ratio(per.get("corral"), per.get("floor")),
                      "; ".join(t.text for t in row.targets), result])
        records.append({"key": row.key, "label": row.label.strip(), "unit": row.unit,
                        "scale": row.scale, "headline": row.stat,
                        "values": {s: (None if v is None else
                                       {k: (x * row.scale if isinstance(x, float | int) and
                                            k not in ("n",) else x)
                                        for k, x in v.items() if k != "samples"})
                                   for s, v in per.items()},
                        "targets": verdicts})
    return header, table, records


def text_table(header: list[str], table: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    lines = []
    for j, r in enumerate([header, *table]):
        parts = [r[0].ljust(widths[0]), r[1].ljust(widths[1])]
        parts += [r[i].rjust(widths[i]) for i in range(2, len(r) - 2)]
        parts += [r[-2].ljust(widths[-2]), r[-1]]
        lines.append("  ".join(parts).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(header: list[str], table: list[list[str]]) -> str:
    def esc(x: str) -> str:
        return x.replace("|", "\\|").strip() or " "

    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 4) + ["---", "---"])
             + "|"]
    for r in table:
        lines.append("| " + " | ".join(esc(x) for x in r) + " |")
    return "\n".join(lines)


def chart(path: str, rows_: list[Row], summaries: dict[str, dict[str, dict[str, Any]]],
          systems: list[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [r for r in rows_ if r.chart and any(
        summaries.get(s, {}).get(r.key) for s in systems)]
    if not metrics:
        return
    colors = {"corral": "#1f77b4", "compat": "#17becf", "original": "#d62728",
              "supervisord": "#ff7f0e", "circus": "#2ca02c", "floor": "#7f7f7f"}
    fig, ax = plt.subplots(figsize=(11, 1.6 + 0.75 * len(metrics)))
    height = 0.8 / len(systems)
    top = 0.0
    for si, system in enumerate(systems):
        ys, vals, lo, hi = [], [], [], []
        for mi, row in enumerate(metrics):
            entry = summaries.get(system, {}).get(row.key)
            if not entry or "error" in entry:
                continue
            med = entry["median"] * row.scale
            ys.append(mi + (si - (len(systems) - 1) / 2) * height)
            vals.append(max(med, 1e-3))
            lo.append(max(med - entry["min"] * row.scale, 0))
            hi.append(max(entry["max"] * row.scale - med, 0))
            top = max(top, entry["max"] * row.scale)
        if ys:
            ax.barh(ys, vals, height=height, color=colors[system], label=HEADERS[system],
                    xerr=[lo, hi], capsize=2, error_kw={"elinewidth": 0.8})
            for y, v, up in zip(ys, vals, hi, strict=True):
                ax.text((v + up) * 1.1, y, fmt(v), va="center", fontsize=7)  # past the whisker
    ax.set_yticks(range(len(metrics)))
    ax.set_yticklabels([r.label.strip() for r in metrics], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(right=top * 4)  # room for the value labels
    ax.set_xlabel("milliseconds (log scale; bar = median, whiskers = min-max)")
    ax.set_title(title, fontsize=9, pad=28)
    ax.grid(axis="x", which="both", alpha=0.25)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(systems), fontsize=8,
              frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
