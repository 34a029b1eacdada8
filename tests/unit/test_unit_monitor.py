"""The monitor's transitions with a fake clock and fake processes: no process is started.

The test drives the loop itself (``Monitor.step``) on its own thread; the spawner thread hands
fake processes back through the reactor as it would real ones.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import fakes
import pytest

import corral
from corral._monitor import Monitor
from corral._slots import Deadline
from corral.events import Event, EventKind, StopReason
from corral.states import WorkerState

S = WorkerState
NO_JITTER = corral.Backoff(initial=1.0, multiplier=2.0, cap=8.0, jitter=0.0, reset_after=60.0)


def target(index: int) -> None:  # never runs: the processes are fakes
    raise AssertionError("a fake pool ran its target")


class Harness:
    def __init__(self, workers: int = 1, *, ignore_term: bool = False,
                 fail_next: tuple[BaseException, ...] = (), **options: Any) -> None:
        options.setdefault("backoff", NO_JITTER)
        options.setdefault("start_method", "fork")
        self.clock = fakes.FakeClock()
        self.starter = fakes.FakeStarter(self.clock)
        # Before begin(): the spawner thread starts the first processes at once.
        self.starter.ignore_term = ignore_term
        self.starter.fail_next += fail_next
        self.events: list[Event] = []
        self.spec = corral.PoolSpec(target, workers=workers, name="fake", **options)
        self.mon = Monitor(self.spec, self.events.append, clock=self.clock,
                           start_process=self.starter)
        self.mon.begin([(f"fake-{i}", ()) for i in range(workers)])

    def until(self, cond: Callable[[], bool], what: str = "condition", timeout: float = 20.0,
              ) -> None:
        """Run rounds (each waits at most 0.1 s of real time) until ``cond()`` holds, for at
        most ``timeout`` real seconds. Bounded by time, not by a number of rounds: a round
        whose fake-clock deadline is due returns at once, and a burst of those could end
        before the spawner thread has handed over its first start."""
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, (
                f"{what} never held; events: {[e.kind.value for e in self.events]}")
            self.mon.step(0.1)

    def state(self, index: int) -> WorkerState:
        return self.mon._slots[index].state

    def states(self) -> list[WorkerState]:
        return [self.mon._slots[i].state for i in sorted(self.mon._slots)]

    def kinds(self, index: int | None = None) -> list[EventKind]:
        return [e.kind for e in self.events if index is None or e.index == index]

    def stop(self, grace: float = 1.0) -> None:
        self.mon.request_stop(grace, signal.SIGTERM)
        self.until(self.mon.finished.is_set, what="the pool finished")

    def close(self) -> None:
        if not self.mon.finished.is_set():
            for p in self.starter.started:
                p.die(sig=signal.SIGKILL)
            self.stop(0.0)
        self.starter.close_all()


@pytest.fixture
def harness_factory() -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(workers: int = 1, **options: Any) -> Harness:
        h = Harness(workers, **options)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def test_start_ready_crash_backoff_restart(harness_factory: Callable[..., Harness]) -> None:
    h = harness_factory(1)
    h.until(lambda: h.state(0) is S.RUNNING, what="RUNNING")
    assert h.kinds(0) == [EventKind.SPAWNED, EventKind.READY]
    first = h.starter.current(0)
    h.clock.advance(0.5)
    first.die(code=1)
    h.until(lambda: h.state(0) is S.BACKOFF, what="BACKOFF")
    record = h.mon._slots[0].last_exit
    assert record is not None and record.reason is StopReason.EXITED
    assert record.exit is not None and record.exit.code == 1
    assert h.mon._dl.get((0, Deadline.BACKOFF)) == h.clock() + 1.0
    # Nothing happens until the backoff is over...
    h.mon.step(0.05)
    assert h.state(0) is S.BACKOFF and len(h.starter.started) == 1
    # ...then it is started again.
    h.clock.advance(1.0)
    h.until(lambda: h.state(0) is S.RUNNING and len(h.starter.started) == 2, what="restart")
    assert h.mon._slots[0].restarts == 1
    assert first.closed


def test_ready_when_ready_waits_for_the_flag(harness_factory: Callable[..., Harness]) -> None:
    h = harness_factory(1, ready_when="ready")
    h.until(lambda: h.state(0) is S.STARTING, what="STARTING")
    h.mon.step(0.05)
    assert h.state(0) is S.STARTING
    # The worker's ready(): a stamp in its slot and a byte to the wake pipe.
    h.mon._hb.view[0 * 32 + 1] = h.clock()
    import os

    os.write(h.mon._reactor.wake_fd, b"r")
    h.until(lambda: h.state(0) is S.RUNNING, what="RUNNING after ready()")


def test_stop_while_spawning_starts_nothing_that_survives(
        harness_factory: Callable[..., Harness]) -> None:
    h = harness_factory(2)
    h.mon.step(0.0)  # queues both starts
    h.mon.request_stop(1.0, signal.SIGTERM)
    h.until(h.mon.finished.is_set, what="finished")
    assert all(not p.alive for p in h.starter.started)
    assert all(s is S.STOPPED for s in h.states())
    assert h.kinds()[-1] is EventKind.STOPPED


def test_give_up_past_the_budget(harness_factory: Callable[..., Harness]) -> None:
    h = harness_factory(1, budget=corral.RestartBudget(max_restarts=2, window=60),
                        backoff=corral.Backoff(initial=0, cap=0))
    for n in range(3):
        h.until(lambda n=n: len(h.starter.started) == n + 1 and h.state(0) is S.RUNNING,
                what=f"start {n + 1}")
        h.starter.current(0).die(code=3)
    h.until(h.mon.finished.is_set, what="gave up")
    assert EventKind.GAVE_UP in h.kinds()
    assert isinstance(h.mon.gave_up, corral.GaveUp)
    assert len(h.mon.gave_up.history) == 3


def test_hung_worker_is_stopped_and_restarted(harness_factory: Callable[..., Harness]) -> None:
    h = harness_factory(1, heartbeat_timeout=5.0, backoff=corral.Backoff(initial=0, cap=0))
    h.until(lambda: h.state(0) is S.RUNNING, what="RUNNING")
    h.mon._hb.view[0] = h.clock()  # one beat
    h.clock.advance(4.0)
    h.mon.step(0.0)
    assert h.state(0) is S.RUNNING
    h.clock.advance(1.5)  # past last beat + 5 s
    h.until(lambda: h.mon._slots[0].last_exit is not None, what="the hung worker's exit")
    record = h.mon._slots[0].last_exit
    assert record is not None and record.reason is StopReason.HUNG
    assert "no heartbeat for" in (record.detail or "")
    assert signal.SIGTERM in h.starter.started[0].signals
    h.until(lambda: len(h.starter.started) == 2, what="the replacement")
    assert EventKind.UNHEALTHY in h.kinds(0)


def test_stop_deadline_kills_stragglers(harness_factory: Callable[..., Harness]) -> None:
    h = harness_factory(2, ignore_term=True)
    h.until(lambda: h.states() == [S.RUNNING, S.RUNNING], what="RUNNING")
    h.mon.request_stop(2.0, signal.SIGTERM)
    h.mon.step(0.0)
    assert all(p.signals[-1] == signal.SIGTERM and p.alive for p in h.starter.started)
    h.clock.advance(2.5)
    h.until(h.mon.finished.is_set, what="finished")
    assert all(p.signals[-1] == signal.SIGKILL for p in h.starter.started)


def test_a_failed_start_goes_through_the_policy(harness_factory: Callable[..., Harness]) -> None:
    h = harness_factory(1, fail_next=(OSError(24, "Too many open files"),))
    h.until(lambda: h.state(0) is S.BACKOFF, what="BACKOFF after a failed start")
    record = h.mon._slots[0].last_exit
    assert record is not None and record.reason is StopReason.SPAWN_FAILED
    assert "RLIMIT_NOFILE" in (record.detail or "")  # the limit that was hit is named
    h.clock.advance(1.0)
    h.until(lambda: h.state(0) is S.RUNNING, what="started on the second try")


def test_a_failed_start_without_backoff_retries_on_the_next_round(
        harness_factory: Callable[..., Harness]) -> None:
    # reset_after=0 makes the delay 0: the failed start must still leave PENDING through
    # BACKOFF (before the fix the monitor raised IllegalTransition and stopped every worker).
    h = harness_factory(1, backoff=corral.Backoff(reset_after=0.0, jitter=0.0),
                        fail_next=(OSError(24, "Too many open files"),) * 3)
    h.until(lambda: h.state(0) is S.RUNNING, what="started after three failed starts")
    assert len(h.starter.started) == 1
    assert h.kinds(0).count(EventKind.RESTARTING) == 3
    assert not h.mon.finished.is_set()


def test_one_for_all_restarts_everyone_once(harness_factory: Callable[..., Harness]) -> None:
    h = harness_factory(3, strategy="one_for_all", backoff=corral.Backoff(initial=0, cap=0),
                        budget=corral.RestartBudget(max_restarts=1, window=60))
    h.until(lambda: h.states() == [S.RUNNING] * 3, what="RUNNING")
    h.starter.current(1).die(sig=signal.SIGKILL)
    h.until(lambda: len(h.starter.started) == 6 and h.states() == [S.RUNNING] * 3,
            what="all three restarted")
    for i in (0, 2):
        record = h.mon._slots[i].last_exit
        assert record is not None and record.reason is StopReason.GROUP_RESTART
        assert record.detail == "restarted with worker 1"
        assert "restarted with worker 1" in record.describe()
    # Charged once: a budget of 1 restart was enough for the whole group.
    assert h.mon.gave_up is None
    assert [len(h.mon._budget.times)] == [1]


def test_rest_for_one_restarts_the_higher_indexes(harness_factory: Callable[..., Harness]) -> None:
    h = harness_factory(3, strategy="rest_for_one", backoff=corral.Backoff(initial=0, cap=0))
    h.until(lambda: h.states() == [S.RUNNING] * 3, what="RUNNING")
    first0 = h.starter.current(0)
    h.starter.current(1).die(code=1)
    h.until(lambda: len(h.starter.started) == 5 and h.states() == [S.RUNNING] * 3,
            what="1 and 2 restarted")
    assert h.starter.current(0) is first0 and first0.alive
    assert h.mon._slots[2].last_exit is not None
    assert h.mon._slots[2].last_exit.reason is StopReason.GROUP_RESTART


def test_scale_down_then_wait_ready(harness_factory: Callable[..., Harness]) -> None:
    from corral._reply import Reply

    h = harness_factory(4)
    h.until(lambda: h.states() == [S.RUNNING] * 4, what="RUNNING")
    scaled = h.mon.submit(h.mon.do_scale, 2, {})
    h.until(scaled.done.is_set, what="scaled")
    waiter: Reply = h.mon.submit(h.mon.do_wait_ready, None)
    h.until(waiter.done.is_set, what="wait_ready answered")
    assert waiter.result == 2
    h.until(lambda: len(h.mon._slots) == 2, what="two slots left")


def test_scaled_back_up_before_its_start_arrived(
        harness_factory: Callable[..., Harness]) -> None:
    """Scale down then up again while a new worker's start is still under way (corral serve's
    recycling does so): the start is kept, not stopped as it arrives and started again."""
    import threading

    h = harness_factory(1)
    h.until(lambda: h.states() == [S.RUNNING], what="RUNNING")
    h.starter.hold = hold = threading.Event()
    prepared = {0: ("fake-0", ()), 1: ("fake-1", ())}
    try:
        for n in (2, 1, 2):
            reply = h.mon.submit(h.mon.do_scale, n, prepared)
            h.until(reply.done.is_set, what=f"scaled to {n}")
            assert h.state(1) is S.PENDING
    finally:
        hold.set()
    h.until(lambda: h.states() == [S.RUNNING, S.RUNNING], what="both RUNNING")
    extra = h.starter.current(1)
    assert extra.signals == [] and len(h.starter.started) == 2
    assert h.kinds(1) == [EventKind.SPAWNED, EventKind.READY]


def test_two_pools_hosted_on_one_reactor() -> None:
    """The corral command runs every program's pool on one reactor thread (its own)."""
    from corral._reactor import Reactor

    clock = fakes.FakeClock()
    reactor: Reactor[Any] = Reactor("host", clock=clock)
    starters = [fakes.FakeStarter(clock), fakes.FakeStarter(clock)]
    events: list[Event] = []
    mons = [Monitor(corral.PoolSpec(target, workers=2, name=f"p{i}", start_method="fork",
                                    backoff=corral.Backoff(initial=0, cap=0)),
                    events.append, clock=clock, start_process=starters[i], host=reactor)
            for i in range(2)]
    try:
        for i, mon in enumerate(mons):
            mon.start([(f"p{i}-{j}", ()) for j in range(2)])

        def until(cond: Callable[[], bool], what: str) -> None:
            deadline = time.monotonic() + 20.0  # real time (see Harness.until)
            while not cond():
                assert time.monotonic() < deadline, what
                reactor.run_once(extra=clock() + 0.1)

        until(lambda: all(m._counts[S.RUNNING] == 2 for m in mons), "both pools RUNNING")
        starters[0].current(1).die(code=1)  # a crash in pool 0 alone
        until(lambda: len(starters[0].started) == 3 and mons[0]._counts[S.RUNNING] == 2,
              "pool 0 restarted its worker")
        assert len(starters[1].started) == 2
        mons[0].request_stop(1.0, signal.SIGTERM)
        until(mons[0].finished.is_set, "pool 0 stopped")
        assert not mons[1].finished.is_set()
        mons[1].request_stop(1.0, signal.SIGTERM)
        until(mons[1].finished.is_set, "pool 1 stopped")
        assert not reactor.closed  # the host's reactor is the host's to close
    finally:
        for st in starters:
            st.close_all()
        reactor.close()
