"""The HTTP endpoint of a real pool: /metrics scraped with prometheus_client's own parser,
/readyz and /livez flipping, /status, hung workers, several pools on one endpoint, and the
structured log records."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import obs_workers
import pytest
from _helpers import EventLog, running_with_new_pid, status_of

import corral
from corral import EventKind, WorkerState
from corral._json import STATUS_SCHEMA, worker_to_json
from corral.endpoint import Endpoint
from obs_support import get, scrape, value
from support import wait_for

FAST = corral.Backoff(initial=0.01, multiplier=2.0, cap=0.05, jitter=0.0, reset_after=0)


def _sup(started: set[int], target: Any, **options: Any) -> corral.Supervisor:
    options.setdefault("backoff", FAST)
    options.setdefault("stop_timeout", 2.0)
    options.setdefault("http", "127.0.0.1:0")
    sup = corral.Supervisor(target, **options)
    log = EventLog()
    sup.subscribe(log)
    sup.subscribe(lambda e: started.add(e.pid) if e.pid else None)
    return sup


@pytest.mark.timeout(60)
def test_killed_worker_counts_one_restart(no_leaks: set[int]) -> None:
    sup = _sup(no_leaks, obs_workers.graceful, workers=3, start_method="fork",
               ready_when="ready")
    with sup:
        sup.wait_ready(timeout=20)
        addr = sup.http_address
        assert addr is not None and addr[1] > 0
        before = scrape(addr)
        assert value(before, "corral_worker_restarts_total", pool="graceful",
                     reason="killed") == 0
        assert value(before, "corral_workers", pool="graceful", state="running") == 3
        assert value(before, "corral_workers_ready", pool="graceful") == 3
        assert value(before, "corral_ready", pool="graceful") == 1
        count0 = value(before, "corral_restart_latency_seconds_count", pool="graceful")

        victim = status_of(sup, 1).pid
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        running_with_new_pid(sup, 1, victim)

        after = scrape(addr)
        assert value(after, "corral_worker_restarts_total", pool="graceful",
                     reason="killed") == 1
        assert value(after, "corral_worker_exits_total", pool="graceful", cause="SIGKILL") == 1
        assert value(after, "corral_restart_latency_seconds_count",
                     pool="graceful") == (count0 or 0) + 1
        # Every other reason stayed where it was.
        for (name, labels), v in after.items():
            if name == "corral_worker_restarts_total" and ("reason", "killed") not in labels:
                assert v == 0, (name, labels, v)
        rss = value(after, "corral_rss_bytes", pool="graceful")
        assert rss is not None and rss > 3 * 1024 * 1024  # three live Pythons
        assert value(after, "corral_restart_budget_remaining", pool="graceful") == 19
        assert value(after, "corral_gave_up", pool="graceful") == 0
        # Bounded labels: no per-worker series by default.
        assert not any("worker" in dict(labels) for _, labels in after)


@pytest.mark.timeout(60)
def test_readyz_flips_below_min_ready_and_back(no_leaks: set[int]) -> None:
    slow = corral.Backoff(initial=1.5, multiplier=1.0, cap=1.5, jitter=0.0, reset_after=3600)
    sup = _sup(no_leaks, obs_workers.graceful, workers=3, start_method="fork",
               ready_when="ready", backoff=slow, min_ready=3)
    with sup:
        sup.wait_ready(timeout=20)
        addr = sup.http_address
        assert addr is not None
        r = get(addr, "/readyz")
        assert r.status == 200, r.text
        assert "3/3 workers ready, needs 3" in r.text

        victim = status_of(sup, 2).pid
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        # Its replacement waits 1.5 s (backoff): the pool is below min_ready meanwhile.
        r = wait_for(lambda: (x := get(addr, "/readyz")).status == 503 and x, 10,
                     "/readyz to answer 503")
        assert "workers ready, needs 3; not ready: graceful-2 " in r.text, r.text
        assert value(scrape(addr), "corral_ready", pool="graceful") == 0
        wait_for(lambda: get(addr, "/readyz").status == 200, 15, "/readyz back to 200")
        assert value(scrape(addr), "corral_ready", pool="graceful") == 1

        # min_ready below the pool's size: one worker down does not take it out of service.
    sup2 = _sup(no_leaks, obs_workers.graceful, workers=2, start_method="fork",
                ready_when="ready", backoff=slow, min_ready=1, name="lenient")
    with sup2:
        sup2.wait_ready(timeout=20)
        addr = sup2.http_address
        assert addr is not None
        victim = status_of(sup2, 0).pid
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: status_of(sup2, 0).state is WorkerState.BACKOFF, 10, "backoff")
        r = get(addr, "/readyz")
        assert r.status == 200 and "1/2 workers ready, needs 1" in r.text, r.text


@pytest.mark.timeout(60)
def test_hung_worker_heartbeat_age_grows_then_restart_hung(tmp_path: Path,
                                                          no_leaks: set[int]) -> None:
    records: list[logging.LogRecord] = []
    handler = _Capture(records)
    logger = logging.getLogger("corral.pool.hangs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    sup = _sup(no_leaks, obs_workers.beat_then_hang, workers=2, start_method="fork",
               heartbeat_timeout=2.0, kill_grace=0.5, name="hangs",
               args=lambda i: (str(tmp_path),))
    try:
        with sup:
            sup.wait_ready(timeout=20)
            addr = sup.http_address
            assert addr is not None
            # Worker 0 beats four times, then hangs: the pool's oldest heartbeat ages.
            ages = []

            def older() -> bool:
                ages.append(value(scrape(addr), "corral_heartbeat_age_seconds", pool="hangs"))
                return len(ages) >= 2 and ages[-1] is not None and ages[-1] > 1.0
            wait_for(older, 15, "the heartbeat age to pass 1 s")
            grown = [a for a in ages if a is not None]
            assert grown[-1] > grown[0] or grown[0] > 1.0, ages

            wait_for(lambda: value(scrape(addr), "corral_worker_restarts_total", pool="hangs",
                                   reason="hung") == 1, 20, "a restart with reason hung")
            after = scrape(addr)
            assert value(after, "corral_heartbeat_age_seconds", pool="hangs") < 1.0
            assert value(after, "corral_worker_restarts_total", pool="hangs",
                         reason="killed") == 0
    finally:
        logger.removeHandler(handler)
    # The log record of the exit carries the event's JSON, stack dump included.
    exits = [r for r in records if getattr(r, "corral", {}).get("kind") == "exited"
             and r.corral["index"] == 0]
    assert exits, [r.getMessage() for r in records]
    doc = exits[0].corral
    assert doc["reason"] == "hung" and doc["pool"] == "hangs"
    assert doc["dump"] and "beat_then_hang" in doc["dump"], doc["dump"]
    assert doc["exit"]["reason"] == "hung"


class _Capture(logging.Handler):
    def __init__(self, into: list[logging.LogRecord]) -> None:
        super().__init__(logging.DEBUG)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record)


@pytest.mark.timeout(60)
def test_log_records_carry_the_event_json(no_leaks: set[int]) -> None:
    records: list[logging.LogRecord] = []
    handler = _Capture(records)
    logger = logging.getLogger("corral.pool.logged")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    events = EventLog()
    sup = _sup(no_leaks, obs_workers.graceful, workers=1, start_method="fork",
               ready_when="ready", name="logged", http=None)
    sup.subscribe(events)
    try:
        with sup:
            sup.wait_ready(timeout=20)
            pid = status_of(sup, 0).pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            running_with_new_pid(sup, 0, pid)
    finally:
        logger.removeHandler(handler)
    docs = [r.corral for r in records if hasattr(r, "corral")]
    kinds = {d["kind"] for d in docs}
    assert {"spawned", "ready", "exited", "stopped"} <= kinds, kinds
    exited = next(d for d in docs if d["kind"] == "exited" and d["pid"] == pid)
    assert exited["reason"] == "killed by signal"
    assert exited["exit"]["signal"] == "SIGKILL"
    # The same document as the subscriber's event.
    ev = next(e for e in events.of(EventKind.EXITED) if e.pid == pid)
    assert ev.to_json() == exited
    assert set(exited) >= {"schema", "kind", "pool", "index", "pid", "at", "time", "reason",
                           "exit", "message", "dump"}
    json.dumps(docs)  # JSON-ready


@pytest.mark.timeout(60)
def test_livez_503_while_the_monitor_is_wedged(no_leaks: set[int]) -> None:
    sup = _sup(no_leaks, obs_workers.graceful, workers=1, start_method="fork")
    with sup:
        sup.wait_ready(timeout=20)
        addr = sup.http_address
        assert addr is not None
        assert get(addr, "/livez").status == 200
        # Wedge the monitor thread for real: a command that blocks it (up to 8 s).
        release = threading.Event()
        monitor = sup._monitor
        assert monitor is not None
        monitor.call(lambda reply: (release.wait(8), reply.finish()), wait=False)
        r = get(addr, "/livez")
        assert r.status == 503 and "did not answer" in r.text, r.text
        r = get(addr, "/readyz")
        assert r.status == 503 and "did not answer" in r.text, r.text
        samples = scrape(addr)  # still answers: counters only, and the loop marked out
        assert value(samples, "corral_monitor_responsive", pool="graceful") == 0
        assert value(samples, "corral_workers", pool="graceful", state="running") is None
        release.set()
        wait_for(lambda: get(addr, "/livez").status == 200, 10, "/livez back to 200")


@pytest.mark.timeout(60)
def test_status_is_the_cli_json(no_leaks: set[int]) -> None:
    sup = _sup(no_leaks, obs_workers.graceful, workers=2, start_method="fork",
               ready_when="ready", name="web")
    with sup:
        sup.wait_ready(timeout=20)
        addr = sup.http_address
        assert addr is not None
        r = get(addr, "/status")
        assert r.status == 200 and r.headers["content-type"] == "application/json"
        doc = json.loads(r.body)
        assert doc["schema"] == STATUS_SCHEMA
        assert doc["corral"]["pid"] == os.getpid()
        (prog,) = doc["programs"]
        assert prog["name"] == "web" and prog["kind"] == "target"
        assert prog["state"] == "running" and prog["numprocs"] == 2
        expected = [worker_to_json(w) for w in sup.status()]
        assert [set(w) for w in prog["workers"]] == [set(w) for w in expected]
        assert [(w["index"], w["pid"], w["state"]) for w in prog["workers"]] == [
            (w["index"], w["pid"], w["state"]) for w in expected]
        assert get(addr, "/readyz/web").status == 200
        assert get(addr, "/readyz/other").status == 404
    # Stopped: the endpoint is gone with the pool.
    with pytest.raises(OSError):
        socket.create_connection(addr, timeout=2).close()
    assert sup.http_address is None


@pytest.mark.timeout(90)
def test_one_endpoint_for_several_pools_per_worker(no_leaks: set[int]) -> None:
    web = _sup(no_leaks, obs_workers.graceful, workers=2, start_method="fork",
               ready_when="ready", name="web", http=None)
    jobs = _sup(no_leaks, obs_workers.beater, workers=3, start_method="fork",
                heartbeat_timeout=5.0, ready_when="beat", name="jobs", http=None)
    with web, jobs, Endpoint("127.0.0.1:0", pools=[web], per_worker=True) as ep:
        ep.add(jobs)
        with pytest.raises(ValueError, match="served already"):
            ep.add(web)
        web.wait_ready(timeout=20)
        jobs.wait_ready(timeout=20)
        samples = scrape(ep.address)
        for pool, n in (("web", 2), ("jobs", 3)):
            assert value(samples, "corral_workers", pool=pool, state="running") == n
            for i in range(n):
                assert value(samples, "corral_worker_uptime_seconds", pool=pool,
                             worker=str(i)) is not None
                assert value(samples, "corral_rss_bytes", pool=pool, worker=str(i)) > 0
        for i in range(3):
            assert value(samples, "corral_heartbeat_age_seconds", pool="jobs",
                         worker=str(i)) is not None
        r = get(ep.address, "/readyz")
        assert r.status == 200 and "pool 'web'" in r.text and "pool 'jobs'" in r.text
        ep.remove("jobs")
        assert value(scrape(ep.address), "corral_workers", pool="jobs",
                     state="running") is None


@pytest.mark.timeout(60)
def test_address_in_use_fails_start_before_any_worker(no_leaks: set[int]) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        port = taken.getsockname()[1]
        sup = corral.Supervisor(obs_workers.graceful, workers=2, start_method="fork",
                                http=f"127.0.0.1:{port}")
        with pytest.raises(OSError, match="another process listens there"):
            sup.start()
        assert not sup.running and sup.status() == ()
    finally:
        taken.close()


def test_bad_http_and_min_ready_are_refused() -> None:
    with pytest.raises(ValueError, match="needs a host"):
        corral.Supervisor(obs_workers.graceful, http=":9100")
    with pytest.raises(TypeError, match="http must be a str"):
        corral.Supervisor(obs_workers.graceful, http=9100)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_ready must be >= 0"):
        corral.Supervisor(obs_workers.graceful, min_ready=-1)
    with pytest.raises(ValueError, match=r"min_ready must be <= workers \(2\), got 3"):
        corral.Supervisor(obs_workers.graceful, workers=2, min_ready=3)


@pytest.mark.timeout(60)
def test_published_facts_match_the_loop_and_follow_changes(no_leaks: set[int]) -> None:
    """A scrape reads what the loop published (no round trip): the same figures as the loop's
    own answer, before and after a kill, and never stale once the loop has settled."""
    sup = _sup(no_leaks, obs_workers.beater, workers=3, start_method="fork",
               heartbeat_timeout=5.0, budget=corral.RestartBudget(max_restarts=20, window=60))
    with sup:
        sup.wait_ready(timeout=20)
        monitor = sup._monitor
        assert monitor is not None

        def same() -> bool:
            fast = monitor.observed(5.0)
            slow, _ = monitor.call(monitor.do_observe, False, timeout=5.0)
            if fast is None:
                return False
            assert fast.counts == slow.counts and fast.ready == slow.ready
            assert fast.wanted == slow.wanted and fast.pids == slow.pids
            assert fast.budget_remaining == slow.budget_remaining
            assert fast.stopping == slow.stopping
            assert fast.youngest is not None and slow.youngest is not None
            assert abs(fast.youngest - slow.youngest) < 5.0
            return True

        wait_for(same, 10, "published facts")
        pids = dict(monitor.observed(5.0).pids)  # type: ignore[union-attr]
        os.kill(pids[1], signal.SIGKILL)
        running_with_new_pid(sup, 1, pids[1])
        wait_for(lambda: same() and dict(monitor.observed(5.0).pids)[1] != pids[1],  # type: ignore[union-attr]
                 10, "facts with the new pid")
        assert monitor.observed(5.0).budget_remaining == 19  # type: ignore[union-attr]
        samples = scrape(sup.http_address)  # type: ignore[arg-type]
        assert value(samples, "corral_workers", pool="beater", state="running") == 3
        assert value(samples, "corral_monitor_responsive", pool="beater") == 1


@pytest.mark.timeout(60)
def test_quick_scrapes_of_a_pool_at_rest_then_a_kill(no_leaks: set[int]) -> None:
    """Scrapes of a pool at rest take the quick way (the last body, the ages written anew):
    the ages move, nothing else does, and a kill shows in the first scrape after the loop has
    settled: one restart, the new pid's RSS, the counts."""
    sup = _sup(no_leaks, obs_workers.beater, workers=3, start_method="fork",
               heartbeat_timeout=5.0)
    with sup:
        sup.wait_ready(timeout=20)
        addr = sup.http_address
        endpoint = sup._endpoint
        assert addr is not None and endpoint is not None and endpoint._renderer is not None
        renderer = endpoint._renderer
        quick = []
        real_quick = renderer.quick

        def spy(*args: Any) -> Any:
            out = real_quick(*args)
            quick.append(out is not None)
            return out
        renderer.quick = spy  # type: ignore[method-assign]
        first = scrape(addr)
        wait_for(lambda: value(scrape(addr), "corral_heartbeat_age_seconds",
                               pool="beater") is not None, 10, "a heartbeat")
        samples = [scrape(addr) for _ in range(4)]
        assert sum(quick[-4:]) >= 3, quick  # at rest (a beat landing mid-round may miss one)
        steady = {k: v for k, v in first.items()
                  if k[0] not in ("corral_worker_uptime_seconds", "corral_heartbeat_age_seconds")}
        for s in samples:
            assert {k: s[k] for k in steady} == steady
        uptimes = [value(s, "corral_worker_uptime_seconds", pool="beater") for s in samples]
        assert uptimes == sorted(uptimes) and uptimes[0] != uptimes[-1], uptimes

        victim = status_of(sup, 2).pid
        assert victim is not None
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        running_with_new_pid(sup, 2, victim)
        after = scrape(addr)
        since_kill = time.monotonic() - killed_at
        assert value(after, "corral_worker_restarts_total", pool="beater", reason="killed") == 1
        assert value(after, "corral_worker_exits_total", pool="beater", cause="SIGKILL") == 1
        assert value(after, "corral_workers", pool="beater", state="running") == 3
        young = value(after, "corral_worker_uptime_seconds", pool="beater")
        # The replacement's: it started after the kill, every other worker before it. (Not
        # compared with the uptimes above: on a fast start those were a few ms too.)
        assert young is not None and young < since_kill, (young, since_kill)
        # And the quick way resumes once at rest again.
        n = len(quick)
        wait_for(lambda: scrape(addr) is not None and any(quick[n:]), 10, "a quick scrape")
