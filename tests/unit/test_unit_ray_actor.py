"""corral.ray's actor body and heartbeat.LocalSlot, in this process (no Ray cluster).

WorkerActor is a plain class: run() runs in a thread of ours as it would in the actor's default
concurrency group, and probe()/request_stop() are called from the test thread as the "ctl"
group's thread would call them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import corral
from corral import heartbeat as hb
from corral.ray._actor import RayBoot, StopRequested, WorkerActor
from support import wait_for

pytestmark = pytest.mark.timeout(20)


@pytest.fixture(autouse=True)
def _detached() -> Iterator[None]:
    assert hb._view is None, "another test left the heartbeat module attached"
    yield
    assert hb._view is None, "the actor left the heartbeat module attached"


class Runner:
    """run() of one WorkerActor in a thread; its outcome or exception when it ends."""

    def __init__(self, target: Callable[..., Any], *args: Any, ready_on_beat: bool = False,
                 actor: WorkerActor | None = None) -> None:
        self.actor = actor or WorkerActor()
        self.result: dict[str, Any] | None = None
        self.error: BaseException | None = None
        boot = RayBoot("p", 3, "p-3", ready_on_beat)
        self.thread = threading.Thread(target=self._run, args=(target, args, boot), daemon=True)

    def _run(self, target: Callable[..., Any], args: tuple[Any, ...], boot: RayBoot) -> None:
        try:
            self.result = self.actor.run(target, 3, args, boot)
        except BaseException as exc:
            self.error = exc

    def start(self) -> Runner:
        self.thread.start()
        return self

    def join(self, timeout: float = 5.0) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "run() did not end"


def beating(index: int, started: threading.Event, cleaned: list[str]) -> None:
    assert index == 3
    corral.set_status("warming up")
    corral.ready()
    started.set()
    try:
        while True:
            corral.beat()
            time.sleep(0.005)
    finally:
        cleaned.append("finally ran")


def test_probe_reads_what_the_target_writes() -> None:
    started, cleaned = threading.Event(), []
    actor = WorkerActor()
    before = actor.probe()
    assert before["seq"] == 0.0 and before["beat_age"] is None and not before["ready"]
    assert not before["running"]
    r = Runner(beating, started, cleaned, actor=actor).start()
    assert started.wait(5)
    first = actor.probe()
    assert first["ready"] and first["status"] == "warming up" and first["running"]
    assert first["pid"] > 0 and first["rss"] > 0
    assert 0 <= first["beat_age"] < 5
    second = wait_for(lambda: (p := actor.probe())["seq"] != first["seq"] and p, 5,
                      "the beat sequence to advance")
    assert second["seq"] > first["seq"]
    assert actor.request_stop() is True
    r.join()
    assert r.error is None
    assert r.result == {"code": 0, "stopped": True}
    assert cleaned == ["finally ran"]
    assert not actor.probe()["running"] and actor.probe()["stop_requested"]


def test_a_stop_request_is_raised_once() -> None:
    started, cleaned = threading.Event(), []
    r = Runner(beating, started, cleaned).start()
    assert started.wait(5)
    assert r.actor.request_stop() is True
    assert r.actor.request_stop() is False
    r.join()
    assert r.result == {"code": 0, "stopped": True}


def stubborn(index: int, started: threading.Event, seen: list[BaseException]) -> None:
    started.set()
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:  # swallows the stop request, then returns by itself
        try:
            time.sleep(0.01)
        except StopRequested as exc:
            seen.append(exc)


def test_a_target_that_swallows_the_request_is_not_asked_again() -> None:
    started, seen = threading.Event(), []
    r = Runner(stubborn, started, seen).start()
    assert started.wait(5)
    assert r.actor.request_stop() is True
    r.join()
    assert len(seen) == 1 and isinstance(seen[0], SystemExit)
    assert r.result == {"code": 0, "stopped": True}


def test_stop_before_run_means_the_target_never_runs() -> None:
    ran = []
    actor = WorkerActor()
    assert actor.request_stop() is False
    r = Runner(lambda index: ran.append(index), actor=actor).start()
    r.join()
    assert ran == [] and r.result == {"code": 0, "stopped": True}


@pytest.mark.parametrize("code, expected", [(None, 0), (0, 0), (3, 3), ("bye", 1), (256 + 7, 7)])
def test_system_exit_in_the_target_is_an_exit_code(code: object, expected: int) -> None:
    def target(index: int) -> None:
        raise SystemExit(code)

    r = Runner(target).start()
    r.join()
    assert r.result == {"code": expected, "stopped": False}


def test_an_exception_propagates_and_the_slot_is_detached() -> None:
    def target(index: int) -> None:
        corral.beat()
        raise KeyError("nope")

    r = Runner(target).start()
    r.join()
    assert isinstance(r.error, KeyError)
    assert corral.beat() is False  # detached (checked again by the fixture)


def test_run_twice_is_refused() -> None:
    actor = WorkerActor()
    Runner(lambda index: None, actor=actor).start().join()
    r = Runner(lambda index: None, actor=actor).start()
    r.join()
    assert isinstance(r.error, RuntimeError) and "twice" in str(r.error)


def test_ready_on_beat() -> None:
    def target(index: int, go: threading.Event) -> None:
        corral.beat()
        go.wait(5)

    go = threading.Event()
    r = Runner(target, go, ready_on_beat=True).start()
    wait_for(lambda: r.actor.probe()["ready"], 5, "the first beat to count as ready")
    go.set()
    r.join()


def test_stacks_show_the_target() -> None:
    started, cleaned = threading.Event(), []
    r = Runner(beating, started, cleaned).start()
    assert started.wait(5)
    text = r.actor.stacks()
    assert "(the target)" in text and "in beating" in text
    r.actor.request_stop()
    r.join()


def test_local_slot_outside_a_worker_and_after_detach() -> None:
    slot = hb.LocalSlot()
    assert slot.read() == hb.SlotReading(0.0, 0.0, 0, -1, "")
    slot.attach()
    try:
        assert corral.in_worker()
        assert corral.beat() and corral.set_status("é" * 300)  # cut on a character boundary
        reading = slot.read()
        assert reading.last_beat > 0 and reading.ready_at == 0.0
        assert reading.status == "é" * (hb._TEXT_MAX // 2)
        other = hb.LocalSlot()
        other.detach()  # not the attached one: nothing happens
        assert corral.in_worker()
    finally:
        slot.detach()
    assert not corral.in_worker() and corral.beat() is False


def test_actor_options_are_checked_before_anything_starts() -> None:
    from corral.ray import validate_options

    assert validate_options(None) == {}
    opts = {"num_cpus": 0.5, "scheduling_strategy": "SPREAD", "runtime_env": {"env_vars": {}}}
    assert validate_options(opts) == opts
    with pytest.raises(ValueError, match="must not set 'max_restarts'"):
        validate_options({"max_restarts": 3})
    with pytest.raises(ValueError, match="must not set 'lifetime'"):
        validate_options({"lifetime": "detached"})
    with pytest.raises(ValueError, match="unknown option 'num_cpu'"):
        validate_options({"num_cpu": 1})
    with pytest.raises(TypeError, match="ray_options must be a dict"):
        validate_options([("num_cpus", 1)])  # type: ignore[arg-type]
