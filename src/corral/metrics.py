"""Prometheus metrics of corral's pools, collected from corral's own records at scrape time.

:class:`CorralCollector` is a custom ``prometheus_client`` collector: each scrape reads one view
of every pool (its workers, counters and budget: what its loop published at the end of its last
round that changed it, without waking the loop; a round trip to the loop only when that is not
current, or for per-worker series), so the workers
need no multiprocess mode, no files and no shared memory of Prometheus's, and no series is left
behind by a dead pid. Labels stay bounded:

- ``pool``: the pools you registered;
- ``state``: the 7 worker states; ``reason``: corral's StopReason names; ``cause``: signal
  names and a few exit codes (others fold into "exit other"); ``kind``: 7 task failure kinds;
- ``worker`` (the worker's index, never its pid) only with ``per_worker=True``: at most one
  series per worker slot per metric.

Without ``per_worker`` the per-worker gauges are pre-aggregated per pool with the operator a
dashboard would use (the oldest heartbeat: max; the youngest worker's uptime: min; RSS: sum),
so ``max by (pool) (corral_heartbeat_age_seconds)`` means the same in both modes.

A pool at rest (the same published facts, counters and pids as at the last scrape) changes
only its ages from one scrape to the next: :meth:`CorralCollector.quick` reads just those, from
a glance at each pool, and the endpoint reuses the rest of the last body (see
``corral._exposition``). Any change makes the next scrape a full collect again.

This module imports prometheus_client; ``import corral`` never imports it. :data:`METRICS`
lists every family (README's table is checked against it).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from corral._observe import PoolView, RssCache, Sources, is_ready
from corral._stats import LATENCY_BUCKETS
from corral._taskstats import FAILURE_KINDS, TASK_BUCKETS
from corral.events import StopReason

__all__ = ["METRICS", "CorralCollector", "MetricDoc"]

# The restart reasons of failures are exported at 0 from the start, so that increase() sees a
# pool's first restart; the others (decisions: recycling, restart requests) appear when they
# first happen. Every sample costs the scrape a few microseconds: a few, not every reason.
_ZERO_RESTARTS = dict.fromkeys(
    (r.name.lower() for r in (StopReason.EXITED, StopReason.KILLED, StopReason.SPAWN_FAILED,
                              StopReason.HUNG, StopReason.STARTUP_TIMEOUT,
                              StopReason.UNHEALTHY)), 0)
# The restart latency is kept in the finer LATENCY_BUCKETS; exported at these bounds (a subset:
# the cumulative counts stay exact), from a fork start (~1 ms) to a slow spawn (~0.25 s).
_LATENCY_EXPORTED = (0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 10.0)
_LATENCY_PICK = tuple(LATENCY_BUCKETS.index(b) for b in _LATENCY_EXPORTED)


@dataclass(frozen=True)
class MetricDoc:
    """One metric family as exposed (``name`` with its ``_total`` suffix for counters)."""

    name: str
    type: str
    labels: tuple[str, ...]
    help: str


def _m(name: str, type_: str, labels: str, help_: str) -> MetricDoc:
    return MetricDoc(name, type_, tuple(labels.split()), help_)


METRICS: tuple[MetricDoc, ...] = (
    _m("corral_workers", "gauge", "pool state", "Workers by state."),
    _m("corral_workers_ready", "gauge", "pool", "Workers RUNNING and ready."),
    _m("corral_ready", "gauge", "pool",
       "1 if the pool passes /readyz (at least min_ready workers ready), else 0."),
    _m("corral_monitor_responsive", "gauge", "pool",
       "1 if the pool's loop is not stuck (in one round for less than the endpoint's "
       "timeout), else 0."),
    _m("corral_worker_restarts_total", "counter", "pool reason",
       "Replacement processes started, by why the previous one ended (StopReason name)."),
    _m("corral_worker_exits_total", "counter", "pool cause",
       "Worker processes ended, by exit code or signal."),
    _m("corral_worker_uptime_seconds", "gauge", "pool [worker]",
       "Seconds the current process has run; per pool: the youngest live worker's."),
    _m("corral_heartbeat_age_seconds", "gauge", "pool [worker]",
       "Seconds since the last heartbeat; per pool: the oldest (max) of the live workers."),
    _m("corral_rss_bytes", "gauge", "pool [worker]",
       "Resident memory of the worker processes; per pool: the sum."),
    _m("corral_restart_latency_seconds", "histogram", "pool",
       "Death noticed -> replacement process started."),
    _m("corral_gave_up", "gauge", "pool", "1 once the pool used up its restart budget."),
    _m("corral_restart_budget_remaining", "gauge", "pool",
       "Restarts still allowed in the budget's window (absent: no limit)."),
    _m("corral_tasks_submitted_total", "counter", "pool", "ProcessPool tasks submitted."),
    _m("corral_tasks_completed_total", "counter", "pool",
       "ProcessPool tasks that returned a result."),
    _m("corral_tasks_failed_total", "counter", "pool kind",
       "ProcessPool tasks that failed, by kind: error (the task raised), worker_lost, "
       "timeout, memory, unpicklable, not_picklable, pool_broken."),
    _m("corral_tasks_cancelled_total", "counter", "pool", "ProcessPool tasks cancelled."),
    _m("corral_tasks_retried_total", "counter", "pool",
       "ProcessPool tasks run again after their worker died."),
    _m("corral_tasks_queued", "gauge", "pool", "ProcessPool tasks waiting for a worker."),
    _m("corral_tasks_running", "gauge", "pool", "ProcessPool tasks running in a worker."),
    _m("corral_task_duration_seconds", "histogram", "pool",
       "Seconds a ProcessPool task ran in its worker."),
)
_DOC = {d.name: d for d in METRICS}
# family name -> (label names without per_worker, with it)
_LABELS = {d.name: (tuple(x for x in d.labels if not x.startswith("[")),
                    tuple(x.strip("[]") for x in d.labels)) for d in METRICS}
_Row = tuple[tuple[str, ...], float]  # (label values, value)
_Rows = tuple[tuple[str, ...], list[_Row]]  # (label names, rows)
_POOL = ("pool",)


def _help(name: str) -> str:
    return _DOC[name].help


def _counter(name: str, labels: list[str]) -> CounterMetricFamily:
    base = name.removesuffix("_total")
    return CounterMetricFamily(base, _help(name), labels=labels)


def _gauge(name: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, _help(name), labels=labels)


def _histogram(name: str, bounds: tuple[float, ...]) -> tuple[HistogramMetricFamily,
                                                               list[str]]:
    """The family and its bucket bounds as labels (``+Inf`` last)."""
    return (HistogramMetricFamily(name, _help(name), labels=["pool"]),
            [_bound(b) for b in bounds] + ["+Inf"])


def _pids(views: list[PoolView]) -> dict[int, tuple[str, str]]:
    """pid -> (pool, worker index) of every live worker of the pools that answered."""
    return {pid: (view.name, str(index)) for view in views if view.summary is not None
            for index, pid in view.summary.pids}


_UPTIME, _AGE = 6, 7  # their places in _pool_metrics' list


def _static_key(views: list[PoolView]) -> tuple[Any, ...]:
    """Everything the pool families (per pool, without per-worker series) are made of, but the
    ages: equal keys, equal families. Compared by value; a pool at rest hands out the very same
    objects (its published facts, its stats snapshot), so the comparison is by identity."""
    key: list[Any] = []
    for view in views:
        summary = view.summary
        key.append((view.name, view.state, view.min_ready, view.stats,
                    None if summary is None else
                    (summary.counts, summary.pids, summary.ready, summary.wanted,
                     summary.budget_remaining, summary.stopping)))
    return tuple(key)


def _ages(views: list[PoolView]) -> tuple[list[_Row], list[_Row]]:
    """The uptime and heartbeat age rows per pool (what moves with the clock alone)."""
    uptime: list[_Row] = []
    age: list[_Row] = []
    for view in views:
        summary = view.summary
        if summary is None:
            continue
        if summary.youngest is not None:
            uptime.append(((view.name,), summary.youngest))
        if summary.oldest_beat_age is not None:
            age.append(((view.name,), summary.oldest_beat_age))
    return uptime, age


def _bound(b: float) -> str:
    return repr(float(b))


class CorralCollector:
    """A ``prometheus_client`` collector of corral pools (see the module docstring).

    Args:
        pools: what to collect: :class:`corral.Supervisor` objects, ``PoolSource`` objects
            (the CLI's programs), ``PoolTaskStats`` or pools that carry one (``task_stats``);
            or a ``Sources`` shared with an endpoint. More can be added later with :meth:`add`.
        per_worker: also export per-worker series (label ``worker``, the index) of uptime,
            heartbeat age and RSS, instead of one aggregate per pool.
        timeout: seconds each pool's loop gets to answer a scrape; a pool that does not answer
            is reported with ``corral_monitor_responsive 0`` and its counters only.
        rss_interval: RSS of a worker is re-read at most this often (seconds).

    Raises:
        TypeError, ValueError: a bad argument (the message names it).
    """

    def __init__(self, pools: Iterable[Any] | Sources = (), *, per_worker: bool = False,
                 timeout: float = 1.0, rss_interval: float = 10.0) -> None:
        from corral import _validate as v

        v.boolean("per_worker", per_worker)
        self.timeout = v.number("timeout", timeout, strict=True)
        v.number("rss_interval", rss_interval)
        self.per_worker = per_worker
        self.sources = pools if isinstance(pools, Sources) else Sources()
        if not isinstance(pools, Sources):
            for p in pools:
                self.sources.add(p)
        self._rss = RssCache(rss_interval)
        # family name -> (its samples as plain tuples, the family built from them)
        self._last: dict[str, tuple[tuple[Any, ...], Metric]] = {}
        # (what the families depend on but the clock, the pool families): see _static_key
        # (static key, families, the pools' glance stamps taken before their views)
        self._memo: tuple[tuple[Any, ...], list[Metric], tuple[Any, ...] | None] | None = None
        # pool -> (the pids tuple its last RSS sum was taken for, the sum)
        self._rss_memo: dict[str, tuple[tuple[tuple[int, int], ...], int]] = {}

    def add(self, pool: Any) -> None:
        """Collect ``pool`` too (see ``pools`` above).

        Raises:
            TypeError: not something corral can collect.
            ValueError: a pool of that name is collected already.
        """
        self.sources.add(pool)

    def remove(self, name: str) -> None:
        """Stop collecting the pool (or task stats) called ``name``.

        Raises:
            KeyError: nothing of that name is collected.
        """
        self.sources.remove(name)

    def describe(self) -> Iterator[Metric]:
        """The families (no samples): lets a registry check for clashing names."""
        for d in METRICS:
            labels = [x for x in d.labels if not x.startswith("[")]
            if d.type == "counter":
                yield _counter(d.name, labels)
            elif d.type == "gauge":
                yield _gauge(d.name, labels)
            else:
                yield HistogramMetricFamily(d.name, d.help, labels=labels)

    def collect(self) -> Iterator[Metric]:
        pools = self.sources.pools()
        # Glanced at before the views are read: a change in between makes the next quick()
        # miss (one more collect), never reuse families older than its stamp.
        stamps = None if self.per_worker else self._stamps(pools)
        views = [src.observe(self.timeout, self.per_worker) for src in pools]
        yield from self._pool_metrics(views, stamps)
        yield from self._task_metrics()

    def quick(self) -> tuple[tuple[Any, ...], dict[str, _Rows]] | None:
        """A scrape that reads only what moved with the clock, or None (collect() then).

        Returns ``(stamp, rows)`` when every pool family but the ages is what the last
        :meth:`collect` produced (``stamp``: the pools' glances then, :attr:`memo_stamp`):
        ``rows`` maps the two age families to their label names and samples now. None with
        per-worker series, task stats, RSS due for a re-read, a pool that cannot be glanced
        at (see ``SupervisorSource.glance``) or whose facts, counters or pids changed since.
        """
        memo = self._memo
        if (memo is None or memo[2] is None or self.per_worker or self._rss.due()
                or self.sources.has_tasks()):
            return None
        stamps = []
        uptime: list[_Row] = []
        age: list[_Row] = []
        for src in self.sources.pools():
            glance = getattr(src, "glance", None)
            got = None if glance is None else glance(self.timeout)
            if got is None:
                return None
            stamp, youngest, oldest = got
            stamps.append(stamp)
            if youngest is not None:
                uptime.append(((src.name,), youngest))
            if oldest is not None:
                age.append(((src.name,), oldest))
        if tuple(stamps) != memo[2]:
            return None
        return memo[2], {"corral_worker_uptime_seconds": (_POOL, uptime),
                         "corral_heartbeat_age_seconds": (_POOL, age)}

    @property
    def memo_stamp(self) -> tuple[Any, ...] | None:
        """The pools' glances taken just before the last :meth:`collect` read them (None:
        with per-worker series, or a pool that cannot be glanced at): see :meth:`quick`."""
        return None if self._memo is None else self._memo[2]

    def _stamps(self, pools: list[Any]) -> tuple[Any, ...] | None:
        stamps = []
        for src in pools:
            glance = getattr(src, "glance", None)
            got = None if glance is None else glance(self.timeout)
            if got is None:
                return None
            stamps.append(got[0])
        return tuple(stamps)

    # ------------------------------------------------------------------------ supervisors

    def _pool_metrics(self, views: list[PoolView], stamps: tuple[Any, ...] | None
                      ) -> Iterator[Metric]:
        if self.per_worker:
            yield from self._all_pool_metrics(views)
            return
        key = _static_key(views)
        memo = self._memo
        if memo is not None and memo[0] == key and not self._rss.due():
            # Nothing but the clock moved since the last scrape (the same facts, counters
            # and pids): last scrape's families, with the two that age rebuilt.
            uptime, age = _ages(views)
            families = list(memo[1])
            families[_UPTIME] = self._family("corral_worker_uptime_seconds", uptime)
            families[_AGE] = self._family("corral_heartbeat_age_seconds", age)
        else:
            families = self._all_pool_metrics(views)
        self._memo = (key, families, stamps)
        yield from families

    def _all_pool_metrics(self, views: list[PoolView]) -> list[Metric]:
        per_worker = self.per_worker
        workers: list[_Row] = []
        ready: list[_Row] = []
        ok: list[_Row] = []
        responsive: list[_Row] = []
        restarts: list[_Row] = []
        exits: list[_Row] = []
        rss: list[_Row] = []
        latency: list[tuple[str, tuple[int, ...], float]] = []
        gave_up: list[_Row] = []
        budget: list[_Row] = []
        if per_worker:
            uptime: list[_Row] = []
            age: list[_Row] = []
        else:
            uptime, age = _ages(views)
        for view in views:
            pool = view.name
            responsive.append(((pool,), 1.0 if view.responsive else 0.0))
            ok.append(((pool,), 1.0 if is_ready(view) else 0.0))
            stats = view.stats
            if stats is not None:
                restarts.extend(((pool, reason), n)
                                for reason, n in (_ZERO_RESTARTS | stats.restarts).items())
                exits.extend(((pool, cause), n) for cause, n in stats.exits.items())
                cumulative = stats.latency_buckets
                picked = (*(cumulative[i] for i in _LATENCY_PICK), cumulative[-1])
                latency.append((pool, picked, stats.latency_sum))
                gave_up.append(((pool,), 1.0 if stats.gave_up else 0.0))
            summary = view.summary
            if summary is None:
                continue
            if summary.budget_remaining is not None:
                budget.append(((pool,), summary.budget_remaining))
            workers.extend(((pool, state), n) for state, n in summary.counts.items())
            ready.append(((pool,), summary.ready))
            if per_worker and view.workers is not None:
                for w in view.workers:
                    if w.pid is not None and w.state.alive:
                        uptime.append(((pool, str(w.index)), w.uptime))
                        if w.heartbeat_age is not None:
                            age.append(((pool, str(w.index)), w.heartbeat_age))
        if per_worker:
            pids = _pids(views)
            rss.extend((pids[pid], value) for pid, value in self._rss.get(pids).items())
        else:
            rss.extend(self._pool_rss(views))
        family = self._family
        # The order of _FAMILIES (the fast path above replaces two by their index).
        return [family("corral_workers", workers),
                family("corral_workers_ready", ready),
                family("corral_ready", ok),
                family("corral_monitor_responsive", responsive),
                family("corral_worker_restarts_total", restarts),
                family("corral_worker_exits_total", exits),
                family("corral_worker_uptime_seconds", uptime),
                family("corral_heartbeat_age_seconds", age),
                family("corral_rss_bytes", rss),
                self._latency(latency),
                family("corral_gave_up", gave_up),
                family("corral_restart_budget_remaining", budget)]

    def _pool_rss(self, views: list[PoolView]) -> list[_Row]:
        """RSS per pool. Within ``rss_interval``, a pool whose live pids are the very tuple of
        last scrape (the facts its loop published did not change) reuses last scrape's sum."""
        memo = self._rss_memo
        summed = [(v.name, v.summary.pids) for v in views if v.summary is not None]
        if not self._rss.due() and all(
                (m := memo.get(name)) is not None and m[0] is live for name, live in summed):
            return [((name,), memo[name][1]) for name, _ in summed]
        per_pool: dict[str, int] = {}
        pids = _pids(views)
        for pid, value in self._rss.get(pids).items():
            pool = pids[pid][0]
            per_pool[pool] = per_pool.get(pool, 0) + value
        self._rss_memo = {name: (live, per_pool.get(name, 0)) for name, live in summed}
        return [((name,), per_pool.get(name, 0)) for name, _ in summed]

    def _family(self, name: str, rows: list[_Row]) -> Metric:
        """The family ``name`` of these samples: last scrape's object if they are the same
        (the renderer then reuses its bytes without comparing samples)."""
        key = tuple(rows)
        hit = self._last.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        labels = list(_LABELS[name][self.per_worker])
        metric = (_counter(name, labels) if _DOC[name].type == "counter"
                  else _gauge(name, labels))
        for values, value in rows:
            metric.add_metric(list(values), value)
        self._last[name] = (key, metric)
        return metric

    def _latency(self, rows: list[tuple[str, tuple[int, ...], float]]) -> Metric:
        name = "corral_restart_latency_seconds"
        key = tuple(rows)
        hit = self._last.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        metric, bounds = _histogram(name, _LATENCY_EXPORTED)
        for pool, counts, total in rows:
            metric.add_metric([pool], list(zip(bounds, counts, strict=True)), total)
        self._last[name] = (key, metric)
        return metric

    # -------------------------------------------------------------------------- task pools

    def _task_metrics(self) -> Iterator[Metric]:
        all_stats = [t.snapshot() for t in self.sources.tasks()]
        if not all_stats:
            return
        submitted = _counter("corral_tasks_submitted_total", ["pool"])
        completed = _counter("corral_tasks_completed_total", ["pool"])
        failed = _counter("corral_tasks_failed_total", ["pool", "kind"])
        cancelled = _counter("corral_tasks_cancelled_total", ["pool"])
        retried = _counter("corral_tasks_retried_total", ["pool"])
        queued = _gauge("corral_tasks_queued", ["pool"])
        running = _gauge("corral_tasks_running", ["pool"])
        duration, bounds = _histogram("corral_task_duration_seconds", TASK_BUCKETS)
        for s in all_stats:
            pool = s.pool
            submitted.add_metric([pool], s.submitted)
            completed.add_metric([pool], s.outcomes["ok"])
            for kind in FAILURE_KINDS:
                failed.add_metric([pool, kind], s.outcomes[kind])
            cancelled.add_metric([pool], s.outcomes["cancelled"])
            retried.add_metric([pool], s.retried)
            queued.add_metric([pool], s.queued)
            running.add_metric([pool], s.running)
            duration.add_metric([pool], list(zip(bounds, s.duration_buckets, strict=True)),
                                s.duration_sum)
        yield from (submitted, completed, failed, cancelled, retried, queued, running,
                    duration)
