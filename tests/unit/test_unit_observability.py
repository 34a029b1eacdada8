"""Pure parts of the observability layer: task counters with a fake pool manager, the collector
over fake pools (parsed back with prometheus_client's parser), the /readyz rule, addresses,
the RSS cache with a fake clock, the monitor's summary with fake processes, and the event JSON.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeClock
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families
from test_unit_monitor import Harness

import corral
from corral._observe import PoolSummary, PoolView, RssCache, parse_address, read_rss, readiness
from corral._stats import PoolStats
from corral._taskstats import FAILURE_KINDS, TASK_BUCKETS, PoolTaskStats, outcome_of
from corral.events import Event, EventKind, ExitRecord, StopReason
from corral.exitstatus import ExitStatus
from corral.metrics import METRICS, CorralCollector
from corral.pool import (
    MemoryLimitExceeded,
    PoolBroken,
    TaskTimeout,
    UnpicklingFailed,
    WorkerLost,
)
from corral.states import WorkerState
from corral.status import WorkerStatus

ROOT = Path(__file__).resolve().parents[2]
S = WorkerState

# ------------------------------------------------------------------------ task counters


class FakePoolManager:
    """Makes the calls a ProcessPool's manager makes (see corral._taskstats), no process."""

    def __init__(self, stats: PoolTaskStats, clock: FakeClock) -> None:
        self.stats, self.clock = stats, clock
        self.queue: list[int] = []
        self.running: dict[int, float] = {}
        self.next = 0

    def submit(self) -> int:
        self.next += 1
        self.queue.append(self.next)
        self.stats.submitted()
        return self.next

    def dispatch(self) -> int:
        task = self.queue.pop(0)
        self.running[task] = self.clock()
        self.stats.started()
        return task

    def worker_died_retry(self, task: int) -> None:
        del self.running[task]
        self.queue.insert(0, task)
        self.stats.requeued()

    def end(self, task: int, outcome: Future[Any] | BaseException | None) -> None:
        started = self.running.pop(task, None)
        if started is None:
            self.queue.remove(task)
        self.stats.finished(outcome_of(outcome),
                            None if started is None else self.clock() - started)


def test_task_stats_follow_a_fake_manager() -> None:
    clock = FakeClock()
    stats = PoolTaskStats("jobs")
    mgr = FakePoolManager(stats, clock)
    a, b, c, d, e = (mgr.submit() for _ in range(5))
    snap = stats.snapshot()
    assert (snap.submitted, snap.queued, snap.running) == (5, 5, 0)
    mgr.dispatch()
    mgr.dispatch()
    clock.advance(0.003)
    mgr.end(a, None)  # a result after 3 ms
    mgr.worker_died_retry(b)  # b's worker died: back to the queue
    assert stats.snapshot().retried == 1
    mgr.dispatch()  # b again
    clock.advance(2.0)
    mgr.end(b, WorkerLost("gone", pid=1))  # died again, no retry left
    cancelled: Future[int] = Future()
    cancelled.cancel()
    mgr.end(e, cancelled)  # cancelled while queued
    mgr.dispatch()  # c
    mgr.end(c, ValueError("the task raised"))
    snap = stats.snapshot()
    assert snap.outcomes["ok"] == 1 and snap.outcomes["worker_lost"] == 1
    assert snap.outcomes["cancelled"] == 1 and snap.outcomes["error"] == 1
    assert (snap.queued, snap.running) == (1, 0)  # d waits
    assert snap.duration_count == 3 and snap.duration_sum == pytest.approx(2.003)
    # 3 ms falls in the 0.005 bucket; 2 s in 2.5; cumulative, +Inf last.
    b5 = TASK_BUCKETS.index(0.005)
    assert snap.duration_buckets[b5 - 1] == 1 and snap.duration_buckets[b5] == 2  # c: 0 s
    assert snap.duration_buckets[TASK_BUCKETS.index(2.5)] == 3
    assert snap.duration_buckets[-1] == 3
    with pytest.raises(ValueError, match="outcome must be one of"):
        stats.finished("weird", None)
    with pytest.raises(TypeError, match="pool must be a non-empty str"):
        PoolTaskStats("")
    assert d


@pytest.mark.parametrize(("error", "kind"), [
    (None, "ok"),
    (ValueError("x"), "error"),
    (WorkerLost("x"), "worker_lost"),
    (MemoryLimitExceeded("x"), "memory"),
    (TaskTimeout("x"), "timeout"),
    (UnpicklingFailed("x"), "unpicklable"),
    (corral.NotPicklable("x"), "not_picklable"),
    (PoolBroken("x", []), "pool_broken"),
    (TimeoutError("not corral's"), "error"),
])
def test_outcome_of_each_failure(error: BaseException | None, kind: str) -> None:
    assert outcome_of(error) == kind
    fut: Future[None] = Future()
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)
    assert outcome_of(fut) == kind
    assert kind == "ok" or kind in FAILURE_KINDS


# ------------------------------------------------------------------------ the collector


class FakeSource:
    """A PoolSource with a view the test sets."""

    def __init__(self, name: str, workers: list[WorkerStatus], *, stats: PoolStats | None = None,
                 min_ready: int | None = None, state: str = "running",
                 responsive: bool = True) -> None:
        self._name = name
        self.workers = workers
        self.stats = stats or PoolStats()
        self.min_ready = min_ready
        self.state = state
        self.responsive = responsive
        self.pinged = 0

    @property
    def name(self) -> str:
        return self._name

    def observe(self, timeout: float, detail: bool = False) -> PoolView:
        summary = PoolSummary.of(self.workers, budget_remaining=7) if self.responsive else None
        return PoolView(self._name, "target", self.state, summary,
                        tuple(self.workers) if detail and self.responsive else None,
                        self.stats.snapshot(), self.min_ready, time.time(), timeout)

    def ping(self, timeout: float) -> bool:
        self.pinged += 1
        return self.responsive


def worker(index: int, state: WorkerState = S.RUNNING, *, pid: int | None = None,
           ready: bool = True, uptime: float = 10.0,
           beat: float | None = None) -> WorkerStatus:
    alive = state.alive
    return WorkerStatus(index, f"w-{index}", (pid or os.getpid()) if alive else None, state,
                        ready and state is S.RUNNING, 0, time.time() if alive else None,
                        uptime if alive else 0.0, beat, "", None, None)


def collect(collector: CorralCollector) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    text = generate_latest(registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def record(reason: StopReason, sig: int | None = None, code: int | None = None) -> ExitRecord:
    status = ExitStatus(code=code, signal=sig) if (sig or code is not None) else None
    return ExitRecord(0, "w-0", 1, status, reason, time.time(), 1.0)


def test_collector_pool_aggregates() -> None:
    stats = PoolStats()
    stats.exited(record(StopReason.KILLED, sig=9))
    stats.restarted("killed", 0.004)
    stats.exited(record(StopReason.HUNG, sig=9))
    stats.restarted("hung", 0.3)
    stats.exited(record(StopReason.RECYCLED_AGE, code=0))
    stats.restarted("recycled_age", 0.02)
    me, parent = os.getpid(), os.getppid()  # real pids, so that RSS is real
    web = FakeSource("web", [worker(0, uptime=100.0, beat=0.2, pid=me),
                             worker(1, uptime=3.0, beat=4.5, pid=parent),
                             worker(2, S.BACKOFF), worker(3, S.STARTING, ready=False,
                                                          uptime=0.5, pid=me)], stats=stats)
    got = collect(CorralCollector([web]))

    def v(name: str, **labels: str) -> float | None:
        return got.get((name, frozenset({"pool": "web", **labels}.items())))

    assert v("corral_workers", state="running") == 2
    assert v("corral_workers", state="backoff") == 1
    assert v("corral_workers", state="stopped") == 0  # every state, zeros included
    assert v("corral_workers_ready") == 2
    assert v("corral_ready") == 0  # needs all 4 (the default)
    assert v("corral_monitor_responsive") == 1
    assert v("corral_worker_uptime_seconds") == 0.5  # the youngest live one
    assert v("corral_heartbeat_age_seconds") == 4.5  # the oldest beat
    assert v("corral_worker_restarts_total", reason="killed") == 1
    assert v("corral_worker_restarts_total", reason="hung") == 1
    assert v("corral_worker_restarts_total", reason="recycled_age") == 1
    assert v("corral_worker_restarts_total", reason="unhealthy") == 0  # pre-populated
    assert v("corral_worker_exits_total", cause="SIGKILL") == 2
    assert v("corral_worker_exits_total", cause="exit 0") == 1
    assert v("corral_restart_latency_seconds_count") == 3
    assert v("corral_restart_latency_seconds_bucket", le="0.005") == 1
    assert v("corral_restart_latency_seconds_bucket", le="0.025") == 2
    assert v("corral_restart_latency_seconds_bucket", le="+Inf") == 3
    assert v("corral_restart_latency_seconds_sum") == pytest.approx(0.324)
    assert v("corral_restart_budget_remaining") == 7
    assert v("corral_gave_up") == 0
    rss = v("corral_rss_bytes")
    assert rss is not None and rss >= (read_rss(me) or 0)  # the sum of the live pids
    # No worker label, and the label values come from closed sets.
    labels = {k for _, ls in got for k, _ in ls}
    assert labels <= {"pool", "state", "reason", "cause", "le"}


def test_collector_per_worker_and_unresponsive_pool() -> None:
    web = FakeSource("web", [worker(0, beat=0.5), worker(1, S.STOPPING, beat=2.0,
                                                         pid=os.getppid()),
                             worker(2, S.EXITED)])
    stuck = FakeSource("stuck", [worker(0)], responsive=False)
    got = collect(CorralCollector([web, stuck], per_worker=True))
    key = lambda name, **lb: (name, frozenset(lb.items()))  # noqa: E731
    assert got[key("corral_heartbeat_age_seconds", pool="web", worker="0")] == 0.5
    assert got[key("corral_heartbeat_age_seconds", pool="web", worker="1")] == 2.0
    assert key("corral_worker_uptime_seconds", pool="web", worker="2") not in got  # no process
    assert got[key("corral_rss_bytes", pool="web", worker="0")] > 0
    assert key("corral_heartbeat_age_seconds", pool="web") not in got  # no aggregate then
    # A pool whose loop does not answer: marked, its counters only, nothing else.
    assert got[key("corral_monitor_responsive", pool="stuck")] == 0
    assert got[key("corral_ready", pool="stuck")] == 0
    assert key("corral_workers", pool="stuck", state="running") not in got
    assert got[key("corral_worker_restarts_total", pool="stuck", reason="killed")] == 0


def test_collector_task_metrics_and_openmetrics() -> None:
    stats = PoolTaskStats("jobs")
    mgr = FakePoolManager(stats, FakeClock())
    t = mgr.submit()
    mgr.dispatch()
    mgr.end(t, TaskTimeout("late"))
    mgr.submit()

    class Pool:  # a ProcessPool once wired: it carries its counters as task_stats
        task_stats = stats

    collector = CorralCollector([Pool()])
    got = collect(collector)
    key = lambda name, **lb: (name, frozenset({"pool": "jobs", **lb}.items()))  # noqa: E731
    assert got[key("corral_tasks_submitted_total")] == 2
    assert got[key("corral_tasks_failed_total", kind="timeout")] == 1
    assert got[key("corral_tasks_failed_total", kind="worker_lost")] == 0
    assert got[key("corral_tasks_completed_total")] == 0
    assert got[key("corral_tasks_queued")] == 1 and got[key("corral_tasks_running")] == 0
    assert got[key("corral_task_duration_seconds_count")] == 1
    # OpenMetrics too, as prometheus_client renders it.
    from prometheus_client.openmetrics.exposition import generate_latest as om_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    names = {f.name for f in parse_openmetrics(om_latest(registry).decode())}
    assert {"corral_tasks_submitted", "corral_task_duration_seconds"} <= names
    with pytest.raises(ValueError, match="served already"):
        collector.add(stats)
    collector.remove("jobs")
    with pytest.raises(KeyError):
        collector.remove("jobs")
    with pytest.raises(TypeError, match=r"expected a corral\.Supervisor"):
        collector.add(object())


def test_metrics_table_matches_what_is_exposed() -> None:
    pool_stats = PoolStats()
    pool_stats.exited(record(StopReason.KILLED, sig=9))
    web = FakeSource("web", [worker(0, beat=0.1)], stats=pool_stats)
    stats = PoolTaskStats("jobs")
    stats.submitted()
    stats.started()
    stats.finished("ok", 0.1)
    got = collect(CorralCollector([web, stats]))
    exposed = {name.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
               for name, _ in got}
    documented = {d.name for d in METRICS}
    assert exposed == documented
    # A registry can check for clashes (describe), and every name is a valid one.
    registry = CollectorRegistry()
    registry.register(CorralCollector())
    # README's Grafana table lists every metric, with its type.
    readme = (ROOT / "README.md").read_text()
    for d in METRICS:
        assert f"| `{d.name}` | {d.type} |" in readme, d.name


# ------------------------------------------------------------------------ the /readyz rule


def view(workers: list[WorkerStatus], *, state: str = "running", min_ready: int | None = None,
         responsive: bool = True) -> PoolView:
    return PoolView("web", "target", state, PoolSummary.of(workers) if responsive else None,
                    None, None, min_ready, None, 1.0)


def test_readiness_rule() -> None:
    up = [worker(0), worker(1), worker(2)]
    assert readiness(view(up)) == (True, "pool 'web': 3/3 workers ready, needs 3")
    one_down = [worker(0), worker(1), worker(2, S.BACKOFF)]
    ok, why = readiness(view(one_down))
    assert not ok and why == "pool 'web': 2/3 workers ready, needs 3; not ready: 1 backoff"
    assert readiness(view(one_down, min_ready=2))[0]
    # Workers finished for good (restart policy) are not waited for by default.
    assert readiness(view([worker(0), worker(1, S.EXITED)]))[0]
    starting = [worker(0, S.STARTING, ready=False)]
    assert not readiness(view(starting))[0]
    assert readiness(view(up, state="stopping")) == (False, "pool 'web': stopping")
    assert readiness(view(up, state="gave up"))[1].endswith("gave up (restart budget used up)")
    assert readiness(view([], state="new")) == (False, "pool 'web': not started")
    assert "did not answer within 1s" in readiness(view(up, responsive=False))[1]
    # min_ready=0: ready as long as the pool runs.
    assert readiness(view([worker(0, S.BACKOFF)], min_ready=0))[0]


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:9100", ("127.0.0.1", 9100)),
    ("0.0.0.0:0", ("0.0.0.0", 0)),
    ("9100", ("127.0.0.1", 9100)),
    ("localhost:80", ("localhost", 80)),
    ("[::1]:9100", ("::1", 9100)),
])
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(("text", "error", "match"), [
    (":9100", ValueError, "needs a host"),
    ("127.0.0.1:99999", ValueError, "port number 0..65535"),
    ("::1:9100", ValueError, "in brackets"),
    ("[::1]9100", ValueError, r"\[IPv6\]:PORT"),
    ("host:", ValueError, "port number"),
    (9100, TypeError, "must be a str"),
])
def test_parse_address_refuses(text: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        parse_address(text)


def test_rss_cache_rereads_at_its_interval() -> None:
    clock = FakeClock()
    cache = RssCache(5.0, clock=clock)
    me = os.getpid()
    first = cache.get([me, 4_000_001])  # a pid that does not exist is left out
    assert set(first) == {me} and first[me] > 0
    cache._values[me] = 1  # what the next reads return, unless they read /proc again
    assert cache.get([me])[me] == 1
    clock.advance(5.0)
    assert cache.get([me])[me] > 1


# ------------------------------------------------------------------- the monitor's summary


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness(3, heartbeat_timeout=100.0,
                budget=corral.RestartBudget(max_restarts=5, window=10.0))
    yield h
    h.close()


def test_monitor_summary_with_fake_processes(harness: Harness) -> None:
    h = harness
    h.until(lambda: h.states() == [S.RUNNING] * 3, what="all RUNNING")
    from corral._reply import Reply

    def observe(detail: bool = False) -> tuple[PoolSummary, Any]:
        reply = Reply()
        h.mon.do_observe(reply, detail)
        return reply.result  # type: ignore[no-any-return]

    h.clock.advance(2.0)
    summary, statuses = observe()
    assert statuses is None
    assert summary.counts["running"] == 3 and summary.ready == 3 and summary.wanted == 3
    assert summary.youngest == pytest.approx(2.0)
    assert summary.oldest_beat_age is None  # nobody beat yet
    assert summary.budget_remaining == 5 and not summary.stopping
    assert sorted(i for i, _ in summary.pids) == [0, 1, 2]
    h.starter.current(1).die(code=1)
    h.until(lambda: h.state(1) is S.BACKOFF, what="BACKOFF")
    summary, statuses = observe(detail=True)
    assert summary.counts["backoff"] == 1 and summary.ready == 2 and summary.wanted == 3
    assert summary.budget_remaining == 4
    assert [s.state for s in statuses] == [S.RUNNING, S.BACKOFF, S.RUNNING]
    # The budget's window slides: computed at each look, not when the last restart happened.
    h.clock.advance(11.0)
    assert observe()[0].budget_remaining == 5


# ------------------------------------------------------------------------------ event JSON


def test_event_json_carries_the_dump_of_a_hang() -> None:
    rec = ExitRecord(2, "web-2", 4242, ExitStatus(signal=9), StopReason.HUNG, 1.7e9, 12.5,
                     "no heartbeat for 5.0s\nThread 0x1 (most recent call first):\n  File x")
    ev = Event(EventKind.EXITED, "web", 2, "web-2", 4242, 1.7e9 + 0.25, rec)
    doc = ev.to_json()
    assert doc["schema"] == "corral.event/1"
    assert doc["kind"] == "exited" and doc["reason"] == "hung" and doc["index"] == 2
    assert doc["time"] == "2023-11-14T22:13:20.250000Z"
    assert doc["dump"] == rec.detail and doc["exit"]["signal"] == "SIGKILL"
    killed = Event(EventKind.EXITED, "web", 0, "web-0", 1, 1.7e9,
                   ExitRecord(0, "web-0", 1, ExitStatus(signal=9), StopReason.KILLED, 1.7e9,
                              1.0, "evidence"))
    assert killed.to_json()["dump"] is None  # only hangs carry a dump


def test_import_corral_stays_light() -> None:
    code = ("import sys, corral\n"
            "heavy = [m for m in ('prometheus_client', 'asyncio', 'corral.metrics', "
            "'corral.endpoint', 'corral.aio', 'http.server', 'click', 'rich', "
            "'corral._template', 'corral._deathwatch', 'corral.serve', 'corral.cli') "
            "if m in sys.modules]\n"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "", out.stdout


def test_renderer_is_byte_for_byte_the_encoders_output() -> None:
    """Families rendered one by one, unchanged ones from the cache: the same bytes as the
    encoder writes for the whole registry, in both formats, as the figures move."""
    from prometheus_client.exposition import choose_encoder

    from corral._exposition import Renderer

    clock_age = [0.5]
    web = FakeSource("web", [worker(0, beat=0.5), worker(1, beat=0.1)])
    stats = PoolTaskStats("jobs")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CorralCollector([web, stats], rss_interval=3600))
    renderer = Renderer()
    for accept in ("", "application/openmetrics-text; version=1.0.0", "text/plain"):
        for step in range(3):
            clock_age[0] += 1
            web.workers = [worker(0, beat=clock_age[0]), worker(1, beat=0.1)]
            if step == 1:
                stats.submitted()
                web.workers.append(worker(2, S.BACKOFF))
            encoder, ctype = choose_encoder(accept)
            body, got_type = renderer.render(registry, accept)
            assert got_type == ctype
            assert body == encoder(registry), (accept, step)


def test_task_marks_count_each_task_once_whatever_the_race() -> None:
    # A ProcessPool's tasks end on several threads: the steps keyed by a task's mark keep the
    # queued/running figures exact when they cross (see corral._taskstats).
    from corral._taskstats import TaskMark

    stats = PoolTaskStats("jobs")
    a, b, c = TaskMark(), TaskMark(), TaskMark()
    stats.submitted(3)
    stats.task_started(a, 10.0)
    stats.task_started(b, 10.0)
    stats.task_ended(b, "cancelled", 10.5)  # the owner cancels b while its worker dies...
    stats.task_requeued(b)  # ...and the manager would put it back: nothing moves
    stats.task_ended(b, "worker_lost", 11.0)  # a second end is not counted
    stats.task_requeued(a)  # a's worker died: back to the queue, once
    stats.task_started(a, 12.0)
    stats.task_ended(a, "ok", 12.25)
    stats.task_ended(c, "cancelled", 13.0)  # never ran
    stats.task_started(c, 13.5)  # a start after its end does not count
    snap = stats.snapshot()
    assert snap.submitted == 3 and snap.retried == 1
    assert snap.outcomes["ok"] == 1 and snap.outcomes["cancelled"] == 2
    assert snap.outcomes["worker_lost"] == 0
    assert (snap.queued, snap.running) == (0, 0)
    assert snap.duration_count == 2 and snap.duration_sum == pytest.approx(0.75)
    with pytest.raises(ValueError, match="outcome must be one of"):
        stats.task_ended(TaskMark(), "weird", 0.0)
