"""The Ray pool's manager without Ray: fake actors, a fake clock, the races decided in order.

Ray is faked where it cannot be made to race on demand: an actor is an object whose method
calls return futures the test completes (``ray.kill`` is replaced by a recorder that fails the
actor's pending calls, as Ray does). The manager's hand-overs (``post``) queue up and the test
runs them, as the manager thread would. No cluster is used.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import pytest
from ray import exceptions as rx

from corral._reactor import Reactor
from corral.policy import Backoff, RestartBudget
from corral.pool._future import PoolFuture
from corral.pool._records import PoolConfig, Task
from corral.pool._shared import PoolShared
from corral.pool.errors import TaskTimeout, WorkerLost
from corral.ray import _pool, _pool_actor


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Killed(rx.ActorDiedError):
    def __str__(self) -> str:
        return "The actor is dead because it was killed by `ray.kill`."


class FakeActor:
    """Records each method call with the future the test completes."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.calls: list[tuple[str, tuple[Any, ...], Future[Any]]] = []
        self.killed = False
        for name in ("boot", "run", "watch", "stacks"):
            setattr(self, name, _Method(self, name))

    def pending(self, name: str) -> list[Future[Any]]:
        return [f for n, _, f in self.calls if n == name and not f.done()]

    def reply(self, name: str, value: Any) -> None:
        self.pending(name)[0].set_result(value)

    def die(self, exc: BaseException) -> None:
        for _, _, fut in self.calls:
            if not fut.done():
                fut.set_exception(exc)


class _Method:
    def __init__(self, actor: FakeActor, name: str) -> None:
        self.actor, self.name = actor, name

    def remote(self, *args: Any) -> Any:
        fut: Future[Any] = Future()
        self.actor.calls.append((self.name, args, fut))

        class Ref:
            def future(self) -> Future[Any]:
                return fut

        return Ref()


def result_frame(value: Any) -> bytes:
    return pickle.dumps(("r", value))


class Harness:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, **overrides: Any) -> None:
        settings: dict[str, Any] = dict(
            name="t", max_workers=1, spare_workers=0, start_method="forkserver",
            initializer=None, initargs=(), task_timeout=None, retries=0,
            max_tasks_per_worker=None, max_memory_per_worker=None, memory_check_interval=1.0,
            startup_timeout=None, backoff=Backoff(initial=0.5, cap=1.0, jitter=0.0),
            budget=RestartBudget(), stop_timeout=1.0)
        settings.update(overrides)
        self.cfg = PoolConfig(**settings)
        self.clock = Clock()
        self.actors: list[FakeActor] = []
        self.inbox: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        harness = self

        class ActorClass:
            @staticmethod
            def remote() -> FakeActor:
                actor = FakeActor(4000 + len(harness.actors))
                harness.actors.append(actor)
                return actor

        def kill(actor: FakeActor, no_restart: bool = True) -> None:
            actor.killed = True
            actor.die(Killed())

        import ray

        monkeypatch.setattr(_pool_actor, "pool_actor_class", lambda: ActorClass)
        monkeypatch.setattr(_pool, "_driver_node", lambda: "")
        monkeypatch.setattr(ray, "kill", kill)
        self.shared = PoolShared(self.cfg)
        self.loop: Reactor[Any] = Reactor("t", self._on_deadline, self.clock)
        self.manager = _pool.RayPoolManager(self.shared, self.loop, {}, self._post,
                                            clock=self.clock)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        self.inbox.append((fn, args))

    def _on_deadline(self, key: Any, now: float) -> None:
        self.manager.on_deadline(key, now)

    def round(self, advance: float = 0.0) -> None:
        """What one round of the manager thread does."""
        self.clock.now += advance
        while self.inbox:
            fn, args = self.inbox.pop(0)
            fn(*args)
        self.loop.run_due(self.clock.now)
        while self.inbox:
            fn, args = self.inbox.pop(0)
            fn(*args)
        self.manager.after_round(self.clock.now)

    def boot(self, actor: FakeActor) -> None:
        actor.reply("boot", (actor.pid, "", pickle.dumps(("h",))))
        self.round()

    def submit(self, timeout: float | None = None, retries: int = 0) -> PoolFuture[Any]:
        fut: PoolFuture[Any] = PoolFuture(lambda t: self._post(self.manager.cancel_running, t))
        task = Task(self.shared.next_id(), fut, b"payload", "fn", timeout, retries)
        fut._task = task
        self.shared.pending.append(task)
        self.round()
        return fut

    def close(self) -> None:
        self.loop.close()


@pytest.fixture
def harness(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(**overrides: Any) -> Harness:
        h = Harness(monkeypatch, **overrides)
        made.append(h)
        h.manager.fill(h.clock.now)
        return h

    yield make
    for h in made:
        h.close()


def test_a_result_comes_back_and_the_worker_takes_the_next_task(
        harness: Callable[..., Harness]) -> None:
    h = harness()
    (actor,) = h.actors
    assert len(actor.pending("watch")) == 1  # its death would be known whenever it happens
    h.boot(actor)
    assert h.shared.pids == (actor.pid,)
    first, second = h.submit(), h.submit()
    assert len(actor.pending("run")) == 1  # one task at a time
    actor.reply("run", result_frame(9))
    h.round()
    assert first.result(timeout=0) == 9
    assert len(actor.pending("run")) == 1  # the second went out
    actor.reply("run", result_frame(16))
    h.round()
    assert second.result(timeout=0) == 16


def test_a_result_after_the_timeout_does_not_count(harness: Callable[..., Harness]) -> None:
    h = harness()
    (actor,) = h.actors
    h.boot(actor)
    fut = h.submit(timeout=1.0)
    h.round(advance=1.0)  # the timeout falls: a stack dump is asked for, no kill yet
    assert len(actor.pending("stacks")) == 1 and not actor.killed
    actor.reply("run", result_frame(9))  # the result arrives too late
    h.round()
    assert not fut.done()
    actor.reply("stacks", "Thread 1 (the task):\n  File spin.py\n")
    h.round()
    assert actor.killed
    with pytest.raises(TaskTimeout, match="corral killed the Ray actor") as info:
        fut.result(timeout=0)
    assert "spin.py" in info.value.dump and info.value.pid == actor.pid
    assert h.shared.counters["timeouts"] == 1
    assert len(h.actors) == 2  # a replacement is being started


def test_no_stack_dump_in_time_kills_anyway(harness: Callable[..., Harness]) -> None:
    h = harness()
    (actor,) = h.actors
    h.boot(actor)
    fut = h.submit(timeout=1.0)
    h.round(advance=1.0)
    h.round(advance=_pool.DUMP_WAIT)
    assert actor.killed
    with pytest.raises(TaskTimeout, match="no stack dump"):
        fut.result(timeout=0)


def test_a_death_fails_only_its_task_and_a_retry_runs_elsewhere(
        harness: Callable[..., Harness]) -> None:
    h = harness(max_workers=2)
    a, b = h.actors
    h.boot(a)
    h.boot(b)
    doomed, retried = h.submit(retries=0), h.submit(retries=1)
    a.die(rx.ActorDiedError())  # the worker running the first task dies
    h.round()
    with pytest.raises(WorkerLost, match=f"worker pid {a.pid} died while running") as info:
        doomed.result(timeout=0)
    assert info.value.pid == a.pid and info.value.exit is None  # Ray does not say
    b.die(rx.ActorDiedError())  # and the second, whose task may run again
    h.round()
    assert not retried.done() and h.shared.counters["retried"] == 1
    c = h.actors[2]  # (the fourth replaces b)
    h.boot(c)
    c.reply("run", result_frame(5))
    h.round()
    assert retried.result(timeout=0) == 5
    assert h.shared.counters["workers_lost"] == 2


def test_cancelling_a_running_task_kills_its_actor_and_ignores_its_result(
        harness: Callable[..., Harness]) -> None:
    h = harness()
    (actor,) = h.actors
    h.boot(actor)
    fut = h.submit()
    assert fut.running() and fut.cancel()
    h.round()
    assert actor.killed and fut.cancelled()
    assert h.shared.counters["cancelled_running"] == 1


def test_an_initializer_that_raises_ends_the_worker_and_backs_off(
        harness: Callable[..., Harness]) -> None:
    h = harness()
    (actor,) = h.actors
    err = RuntimeError("no")
    actor.reply("boot", (actor.pid, "", pickle.dumps(("i", "Traceback...\nRuntimeError: no\n",
                                                      err))))
    h.round()
    assert actor.killed and h.shared.counters["boot_failures"] == 1
    assert len(h.actors) == 1  # the backoff holds the next start
    h.round(advance=0.5)
    assert len(h.actors) == 2
