"""A running pool: backoff and the restart budget, scale, restart, rolling restart, events,
process titles, and what cannot be pickled."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

import psutil
import pytest
import workers
from _helpers import pool, running_with_new_pid, status_of, wait_gone

import corral
from corral import EventKind, StopReason, WorkerState
from support import START_METHODS, descendants, pid_alive, wait_for

# ------------------------------------------------------------------------ backoff and budget


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", START_METHODS)
def test_backoff_grows_then_budget_gives_up(method: str, no_leaks: set[int]) -> None:
    backoff = corral.Backoff(initial=0.05, multiplier=2.0, cap=1.0, jitter=0.0, reset_after=10.0)
    budget = corral.RestartBudget(max_restarts=5, window=60.0)
    with pool(no_leaks, workers.crash_if, workers=3, start_method=method, backoff=backoff,
              budget=budget, stop_timeout=5.0) as (sup, log):
        with pytest.raises(corral.GaveUp) as info:
            sup.wait(timeout=30)
        statuses = sup.status()

    # The delays double from `initial`, one per failure in a row.
    delays = [e.delay for e in log.of(EventKind.RESTARTING, 0)]
    assert delays == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8])
    # ... and the restarts really waited that long (wall clock, generous: only a lower bound).
    exits = log.of(EventKind.EXITED, 0)
    spawns = log.of(EventKind.SPAWNED, 0)
    assert len(spawns) == 6 and len(exits) == 6
    gaps = [spawns[k + 1].at - exits[k].at for k in range(5)]
    for gap, delay in zip(gaps, delays, strict=True):
        assert delay is not None and gap >= delay * 0.9, (gaps, delays)
    assert gaps[-1] > gaps[0]

    # The sixth failure is over the budget: the pool gave up, and says why.
    gave_up = info.value
    assert len(gave_up.history) == 6
    for record in gave_up.history:
        assert record.index == 0 and record.reason is StopReason.EXITED
        assert record.exit is not None and record.exit.code == 1
    assert "gave up" in str(gave_up)
    assert len(log.of(EventKind.GAVE_UP)) == 1

    # Every worker was stopped, the healthy ones because the pool gave up; nothing is left.
    assert all(s.state in (WorkerState.STOPPED, WorkerState.EXITED) for s in statuses)
    for index in (1, 2):
        last = status_of(sup, index).last_exit
        assert last is not None and last.reason is StopReason.GAVE_UP
    assert not sup.running
    assert not any(pid_alive(p) for p in log.pids())


@pytest.mark.timeout(30)
def test_backoff_resets_after_stable_uptime(no_leaks: set[int]) -> None:
    """A worker that ran longer than reset_after is restarted at once (delay 0)."""
    backoff = corral.Backoff(initial=5.0, cap=5.0, jitter=0.0, reset_after=0.2)
    with pool(no_leaks, workers.sleeper, workers=1, start_method="fork",
              backoff=backoff) as (sup, log):
        sup.wait_ready(timeout=10)
        pid = sup.pids()[0]
        wait_for(lambda: status_of(sup, 0).uptime > 0.3, 10, "a stable uptime")
        os.kill(pid, signal.SIGKILL)
        running_with_new_pid(sup, 0, pid, timeout=4.0)  # well before the 5 s backoff
        log.wait(lambda evs: any(e.kind is EventKind.RESTARTING for e in evs), 10, "RESTARTING")
        assert log.of(EventKind.RESTARTING)[0].delay == 0.0


# -------------------------------------------------------------------------------- scale


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", START_METHODS)
def test_scale_up_and_down(method: str, no_leaks: set[int]) -> None:
    with pool(no_leaks, workers.graceful, workers=2, start_method=method,
              ready_when="ready") as (sup, log):
        sup.wait_ready(timeout=20)
        before = {s.index: s.pid for s in sup.status()}

        sup.scale(4)
        assert sup.wait_ready(timeout=20) == 4
        up = {s.index: s.pid for s in sup.status()}
        assert sorted(up) == [0, 1, 2, 3]
        assert len(set(up.values())) == 4
        assert up[0] == before[0] and up[1] == before[1]

        sup.scale(1)
        wait_for(lambda: [s.index for s in sup.status()] == [0], 15, "the pool to shrink to 1")
        removed = {pid for i, pid in up.items() if i > 0 and pid is not None}
        assert len(removed) == 3
        wait_gone(removed, 10)
        assert status_of(sup, 0).pid == up[0]
        assert status_of(sup, 0).restarts == 0
        log.wait(lambda evs: {e.index for e in evs if e.kind is EventKind.EXITED} >= {1, 2, 3},
                 10, "EXITED events of the removed workers")
        for event in log.of(EventKind.EXITED):
            assert event.exit is not None
            assert event.exit.reason is StopReason.SCALED_DOWN
            # Gracefully: the stop signal, which these workers answer with exit 0.
            assert event.exit.exit is not None and event.exit.exit.code == 0
        assert log.of(EventKind.RESTARTING) == []

        sup.scale(3)
        assert sup.wait_ready(timeout=20) == 3
        again = {s.index: s.pid for s in sup.status()}
        assert again[0] == up[0]
        assert not ({again[1], again[2]} & removed)



@pytest.mark.timeout(30)
def test_scale_from_zero_and_back(no_leaks: set[int]) -> None:
    with pool(no_leaks, workers.sleeper, workers=0, start_method="fork") as (sup, _log):
        assert sup.status() == ()
        assert sup.wait_ready(timeout=5) == 0
        sup.scale(2)
        assert sup.wait_ready(timeout=10) == 2
        pids = sup.pids()
        sup.scale(0)
        wait_for(lambda: sup.status() == (), 10, "an empty pool")
        wait_gone(pids, 10)
        assert sup.running  # an empty pool is not a finished one
        sup.scale(1)
        assert sup.wait_ready(timeout=10) == 1



@pytest.mark.timeout(30)
def test_wait_ready_for_more_than_the_pool_runs_is_an_error_not_a_hang(
        no_leaks: set[int]) -> None:
    with pool(no_leaks, workers.sleeper, workers=2, start_method="fork") as (sup, _log):
        assert sup.wait_ready(timeout=10) == 2
        # No timeout given: before, this waited forever for workers the pool never runs.
        with pytest.raises(ValueError, match=r"n must be at most the 2 worker.*got n=3"):
            sup.wait_ready(3)
        # Waiting already when a scale-down makes the count unreachable: answered then.
        result: list[BaseException | int] = []

        def waiter() -> None:
            try:
                result.append(sup.wait_ready(4, timeout=20))
            except BaseException as exc:  # handed to the test's thread
                result.append(exc)

        sup.scale(4)
        t = threading.Thread(target=waiter)
        t.start()
        sup.scale(1)
        t.join(20)
        assert not t.is_alive()
        assert len(result) == 1
        if isinstance(result[0], int):  # all 4 were ready before the scale-down reached it
            assert result[0] == 4
        else:
            assert isinstance(result[0], ValueError), result
            assert "got n=4" in str(result[0])
        assert sup.wait_ready(timeout=10) == 1

# ------------------------------------------------------------------------------ restart


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", START_METHODS)
def test_restart_one_is_not_a_failure(method: str, no_leaks: set[int]) -> None:
    # A budget of zero: a single failure restart would make the pool give up.
    with pool(no_leaks, workers.graceful, workers=2, start_method=method, ready_when="ready",
              budget=corral.RestartBudget(max_restarts=0)) as (sup, log):
        sup.wait_ready(timeout=20)
        other = status_of(sup, 1).pid
        seen = {status_of(sup, 0).pid}
        for n in (1, 2, 3):
            old = status_of(sup, 0).pid
            assert old is not None
            sup.restart(0)
            now = running_with_new_pid(sup, 0, old)
            assert now.pid not in seen
            seen.add(now.pid)
            assert now.restarts == n
            assert now.last_exit is not None and now.last_exit.pid == old
            assert now.last_exit.reason is StopReason.RESTARTED
            assert now.last_exit.exit is not None and now.last_exit.exit.code == 0
            assert not pid_alive(old)
        assert sup.running
        assert status_of(sup, 1).pid == other and status_of(sup, 1).restarts == 0
        log.wait(lambda evs: sum(e.kind is EventKind.RESTARTING for e in evs) == 3, 10,
                 "RESTARTING events")
        assert [e.delay for e in log.of(EventKind.RESTARTING)] == [0.0, 0.0, 0.0]
        assert log.of(EventKind.GAVE_UP) == []
        with pytest.raises(IndexError):
            sup.restart(7)



@pytest.mark.timeout(30)
def test_restart_skips_the_rest_of_a_backoff(no_leaks: set[int]) -> None:
    backoff = corral.Backoff(initial=30.0, cap=30.0, jitter=0.0, reset_after=60.0)
    with pool(no_leaks, workers.crash_if, workers=1, start_method="fork",
              backoff=backoff) as (sup, log):
        wait_for(lambda: status_of(sup, 0).state is WorkerState.BACKOFF, 10, "BACKOFF")
        assert (status_of(sup, 0).next_restart_in or 0) > 20
        sup.restart(0)
        log.wait(lambda evs: sum(e.kind is EventKind.SPAWNED for e in evs) == 2, 5,
                 "a start well before the 30 s backoff is over")

@pytest.mark.timeout(30)
def test_restart_kills_a_worker_that_ignores_sigterm(no_leaks: set[int]) -> None:
    with pool(no_leaks, workers.ignore_sigterm, workers=1, start_method="fork",
              ready_when="ready", stop_timeout=0.5) as (sup, _log):
        sup.wait_ready(timeout=10)
        old = sup.pids()[0]
        sup.restart(0)
        now = running_with_new_pid(sup, 0, old, timeout=10)
        assert now.last_exit is not None and now.last_exit.reason is StopReason.RESTARTED
        assert now.last_exit.exit is not None
        assert now.last_exit.exit.signal == signal.SIGKILL


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", START_METHODS)
def test_restart_all_is_rolling(method: str, no_leaks: set[int]) -> None:
    n = 3
    with pool(no_leaks, workers.slow_ready, workers=n, start_method=method,
              ready_when="ready", args=lambda i: (0.1,)) as (sup, log):
        sup.wait_ready(timeout=20)
        old = {s.index: s.pid for s in sup.status()}
        # Events arrive asynchronously: mark the log once the first lives' READY are in.
        log.wait(lambda evs: sum(e.kind is EventKind.READY for e in evs) == n, 10, "READY")
        mark = len(log.events)
        sup.restart_all(timeout=30)
        new = {s.index: s.pid for s in sup.status()}
        assert all(s.state is WorkerState.RUNNING for s in sup.status())
        assert set(new) == set(old)
        assert not set(new.values()) & set(old.values()), (old, new)
        for s in sup.status():
            assert s.last_exit is not None and s.last_exit.reason is StopReason.RESTARTED
            assert s.restarts == 1

        # From the events, in the monitor's order: a worker goes down only once the previous
        # one's replacement is ready, so never two at once.
        log.wait(lambda evs: sum(e.kind is EventKind.READY for e in evs[mark:]) == n, 10,
                 "READY of every replacement")
        assert len(log.events) - mark == 4 * n  # EXITED, RESTARTING, SPAWNED, READY each
        down: set[int] = set()
        order = []
        for e in log.events[mark:]:
            if e.kind is EventKind.EXITED:
                assert not down, f"worker {e.index} went down while {down} was down"
                assert e.index is not None
                down.add(e.index)
                order.append(e.index)
            elif e.kind is EventKind.READY and e.index in down:
                down.discard(e.index)
        assert not down
        assert order == list(range(n))


# ---------------------------------------------------------------------------------- events


@pytest.mark.timeout(30)
def test_subscribers_get_events_and_a_slow_one_delays_nothing(no_leaks: set[int]) -> None:
    blocked, release = threading.Event(), threading.Event()

    def slow(event: corral.Event) -> None:
        # A subscriber stuck in its callback (bounded, so a failing test still ends).
        if not blocked.is_set():
            blocked.set()
            release.wait(10)

    def broken(event: corral.Event) -> None:
        raise RuntimeError("a subscriber that fails must not stop the others")

    with pool(no_leaks, workers.sleeper, workers=1, start_method="fork", start=False,
              backoff=corral.Backoff(initial=0.01, cap=0.01, jitter=0.0)) as (sup, log):
        sup.subscribe(slow)
        sup.subscribe(broken)
        sup.start()
        sup.wait_ready(timeout=10)
        assert blocked.wait(10)
        first = sup.pids()[0]
        try:
            os.kill(first, signal.SIGKILL)
            # The restart happens while the subscriber is still stuck.
            second = running_with_new_pid(sup, 0, first, timeout=5).pid
            assert not release.is_set()
        finally:
            release.set()
        kinds = [EventKind.SPAWNED, EventKind.READY, EventKind.EXITED, EventKind.RESTARTING,
                 EventKind.SPAWNED, EventKind.READY]
        log.wait(lambda evs: len(evs) >= len(kinds), 15, "every event")
        events = log.events
        assert [e.kind for e in events[:len(kinds)]] == kinds
        assert events[0].pid == first and events[4].pid == second
        exited = events[2]
        assert exited.pid == first and exited.exit is not None
        assert exited.exit.reason is StopReason.KILLED
        assert exited.exit.exit is not None and exited.exit.exit.signal == signal.SIGKILL
        assert events[3].delay is not None and events[3].delay >= 0
        assert all(e.pool == sup.spec.name and e.index == 0 for e in events[:len(kinds)])
    assert log.events[-1].kind is EventKind.STOPPED



@pytest.mark.timeout(30)
def test_stop_from_a_subscriber(no_leaks: set[int]) -> None:
    """A subscriber may stop the pool (e.g. on the first crash) without an error."""
    outcome: list[BaseException | None] = []

    with pool(no_leaks, workers.sleeper, workers=2, start_method="fork", start=False
              ) as (sup, _log):
        def stop_on_crash(event: corral.Event) -> None:
            if event.kind is EventKind.EXITED and not outcome:
                try:
                    sup.stop()
                    outcome.append(None)
                except BaseException as exc:
                    outcome.append(exc)

        sup.subscribe(stop_on_crash)
        sup.start()
        sup.wait_ready(timeout=10)
        os.kill(sup.pids()[0], signal.SIGKILL)
        assert sup.wait(10)
        wait_for(lambda: outcome, 10, "the subscriber's stop() to return")
    assert outcome == [None], f"stop() in a subscriber raised {outcome[0]!r}"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("policy", ["never", "on-failure"])
def test_pool_whose_workers_all_finish_ends(policy: str, no_leaks: set[int]) -> None:
    """Nothing left to restart: the pool ends by itself, and wait() says so (no GaveUp)."""
    code = 0 if policy == "on-failure" else 3
    with pool(no_leaks, workers.crash_at_once, workers=3, start_method="fork",
              restart=policy, args=lambda i: (code,)) as (sup, log):
        assert sup.wait(timeout=15) is True
        assert not sup.running
        for s in sup.status():
            # (EXITED becomes STOPPED when the pool ends; last_exit keeps the reason.)
            assert s.state.final and s.restarts == 0
            assert s.last_exit is not None and s.last_exit.reason is StopReason.EXITED
            assert s.last_exit is not None and s.last_exit.exit is not None
            assert s.last_exit.exit.code == code
    assert log.of(EventKind.RESTARTING) == [] and log.of(EventKind.GAVE_UP) == []
    assert log.events[-1].kind is EventKind.STOPPED

# ---------------------------------------------------------------------------- process titles


@pytest.mark.timeout(30)
@pytest.mark.parametrize("method", START_METHODS)
def test_process_titles(method: str, no_leaks: set[int]) -> None:
    with pool(no_leaks, workers.sleeper, workers=2, start_method=method,
              name="titled") as (sup, _log):
        sup.wait_ready(timeout=15)
        for s in sup.status():
            assert s.pid is not None
            title = f"corral: titled worker {s.index}"

            def shows(pid: int = s.pid, title: str = title) -> bool:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    cmdline = fh.read().replace(b"\0", b" ").decode().strip()
                return cmdline == title and " ".join(psutil.Process(pid).cmdline()).strip() == title

            wait_for(shows, 15, f"the title {title!r}")


# ------------------------------------------------------------------------ what cannot pickle


def _nested_target() -> Callable[[int], None]:
    def target(index: int) -> None:
        pass
    return target


@pytest.mark.timeout(30)
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_unpicklable_target_is_refused_at_construction(method: str, no_leaks: set[int]) -> None:
    threads = threading.active_count()
    for target in (lambda index: None, _nested_target()):
        with pytest.raises(corral.NotPicklable) as info:
            corral.Supervisor(target, workers=2, start_method=method)
        message = str(info.value)
        assert "module-level" in message and "fork" in message and method in message
    assert not [p for p in descendants() if pid_alive(p)]
    assert threading.active_count() == threads


@pytest.mark.timeout(30)
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_unpicklable_args_are_refused_at_start(method: str, no_leaks: set[int]) -> None:
    threads = threading.active_count()
    lock = threading.Lock()
    sup = corral.Supervisor(workers.sleeper, workers=2, start_method=method,
                            args=lambda i: (lock,))
    with pytest.raises(corral.NotPicklable) as info:
        sup.start()
    assert "args(0)" in str(info.value)
    assert not sup.running
    assert not [p for p in descendants() if pid_alive(p)]
    assert threading.active_count() == threads
    sup.stop()  # harmless


@pytest.mark.timeout(30)
def test_fork_runs_what_cannot_be_pickled(no_leaks: set[int]) -> None:
    """Under fork nothing is pickled: a lambda target with a lock argument runs."""
    lock = threading.Lock()
    with pool(no_leaks, lambda index, lock: time.sleep(60), workers=1, start_method="fork",
              args=lambda i: (lock,)) as (sup, _log):
        sup.wait_ready(timeout=10)
        assert len(sup.pids()) == 1
