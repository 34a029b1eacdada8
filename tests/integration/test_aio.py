"""The asyncio API with real processes, under fork, spawn and forkserver: AsyncSupervisor
(start, wait_ready, events, wait, stop), the event loop never blocked, and tasks awaited in a
ProcessPool."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import obs_workers
import pool_tasks
import pytest

import corral
import corral.aio
from corral import EventKind, WorkerState
from support import START_METHODS, pid_alive

T = TypeVar("T")
FAST = corral.Backoff(initial=0.01, multiplier=2.0, cap=0.05, jitter=0.0, reset_after=0)


def run(main: Callable[[], Awaitable[T]], timeout: float = 60.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(main(), timeout)
    return asyncio.run(bounded())


def _track(sup: corral.AsyncSupervisor, started: set[int]) -> None:
    sup.supervisor.subscribe(lambda e: started.add(e.pid) if e.pid else None)


async def _until(cond: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("method", START_METHODS)
def test_async_supervisor_lifecycle(method: str, no_leaks: set[int]) -> None:
    async def main() -> None:
        sup = corral.AsyncSupervisor(obs_workers.graceful, workers=3, start_method=method,
                                     ready_when="ready", backoff=FAST, stop_timeout=5.0,
                                     http="127.0.0.1:0")
        _track(sup, no_leaks)
        async with sup:
            stream = sup.events()
            assert await sup.wait_ready(timeout=30) == 3
            assert await sup.wait_ready(timeout=0) == 3  # a poll: the answer as of now
            statuses = await sup.status()
            assert [s.state for s in statuses] == [WorkerState.RUNNING] * 3
            assert sup.http_address is not None
            victim = statuses[1].pid
            assert victim is not None
            os.kill(victim, signal.SIGKILL)
            seen: list[corral.Event] = []
            async for event in stream:
                seen.append(event)
                if event.kind is EventKind.READY and event.index == 1 and event.pid != victim:
                    break
            kinds = [(e.kind, e.index) for e in seen if e.index == 1]
            assert (EventKind.EXITED, 1) in kinds and (EventKind.SPAWNED, 1) in kinds
            exited = next(e for e in seen if e.kind is EventKind.EXITED)
            assert exited.pid == victim and exited.to_json()["reason"] == "killed by signal"
            assert not await sup.wait(timeout=0.05)  # still running
            tail = sup.events()
        # Left the block: stopped, and the open stream ends with STOPPED.
        rest = [e async for e in tail]
        assert rest[-1].kind is EventKind.STOPPED
        assert await sup.wait(timeout=5)
        assert not sup.supervisor.running
        stream.close()
        assert [e async for e in sup.events()] == []  # a stream made after the end: empty

    run(main)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("method", START_METHODS)
def test_event_loop_never_blocked(method: str, no_leaks: set[int]) -> None:
    """A 1 ms ticker runs while a pool of 8 starts (1 s to be ready), one crashes and is
    replaced, and the pool stops (1 s to exit): a loop that blocked on any of these would be
    late by about a second. Its worst lateness must stay far below that."""
    delay = 1.0

    async def main() -> tuple[float, float, int]:
        worst, ticks = 0.0, 0
        stop_ticking = asyncio.Event()

        async def ticker() -> None:
            nonlocal worst, ticks
            loop = asyncio.get_running_loop()
            expected = loop.time() + 0.001
            while not stop_ticking.is_set():
                await asyncio.sleep(0.001)
                now = loop.time()
                worst = max(worst, now - expected)
                expected = now + 0.001
                ticks += 1

        tick = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        sup = corral.AsyncSupervisor(obs_workers.slow_both_ways, workers=8,
                                     args=lambda i: (delay,), start_method=method,
                                     ready_when="ready", backoff=FAST, stop_timeout=10.0)
        _track(sup, no_leaks)
        async with sup:
            await sup.wait_ready(timeout=60)
            statuses = await sup.status()
            victim = statuses[3].pid
            assert victim is not None
            os.kill(victim, signal.SIGKILL)
            async for event in sup.events():
                if event.kind is EventKind.READY and event.index == 3:
                    break
        elapsed = time.monotonic() - t0
        stop_ticking.set()
        await tick
        return worst, elapsed, ticks

    worst, elapsed, ticks = run(main)
    # Start (>= 1 s), replacement (>= 1 s) and stop (>= 1 s) took seconds in all...
    assert elapsed >= 3 * delay
    # ...while the loop was never late by more than a fraction of one of them (it ticked
    # hundreds of times: a blocked loop would show ~1 s).
    assert ticks > 100
    assert worst < 0.4, f"the event loop was late by {worst * 1000:.1f} ms at worst"
    print(f"\n{method}: worst lateness of a 1 ms ticker {worst * 1000:.1f} ms over "
          f"{elapsed:.1f} s ({ticks} ticks)")


@pytest.mark.timeout(60)
def test_a_stream_starts_after_events_still_on_their_way(no_leaks: set[int]) -> None:
    """events() means events from now on, even those the monitor emitted before the call but
    the events thread had not delivered yet: wait_ready() answers straight from the monitor,
    so the READY events of the start may still be on their way when it returns. A gate
    subscriber holds the events thread on the first READY to make that certain."""
    gate, held = threading.Event(), threading.Event()

    def hold(event: corral.Event) -> None:
        if event.kind is EventKind.READY and not held.is_set():
            held.set()
            gate.wait(30)

    async def main() -> list[corral.Event]:
        sup = corral.AsyncSupervisor(obs_workers.graceful, workers=3, start_method="fork",
                                     ready_when="ready", stop_timeout=5.0)
        _track(sup, no_leaks)
        sup.supervisor.subscribe(hold)  # after AsyncSupervisor's own: it sees one READY
        async with sup:
            await sup.wait_ready(timeout=30)
            # The events thread gets stuck on the first READY (at once, or a moment after
            # wait_ready() answered): the two other READY events then wait behind it.
            assert await asyncio.to_thread(held.wait, 10)
            stream = sup.events()
            gate.set()
        return [e async for e in stream]

    try:
        seen = run(main)
    finally:
        gate.set()
    assert [e.kind for e in seen if e.kind is EventKind.READY] == []
    assert seen and seen[-1].kind is EventKind.STOPPED


@pytest.mark.timeout(60)
def test_wait_ready_timeout_and_cancel(no_leaks: set[int]) -> None:
    async def main() -> None:
        sup = corral.AsyncSupervisor(obs_workers.slow_both_ways, workers=1,
                                     args=lambda i: (30.0,), start_method="fork",
                                     ready_when="ready", stop_timeout=0.5)
        _track(sup, no_leaks)
        async with sup:
            with pytest.raises(TimeoutError, match="fewer than all workers ready"):
                await sup.wait_ready(timeout=0.2)
            waiter = asyncio.create_task(sup.wait_ready())
            await asyncio.sleep(0.1)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            monitor = sup.supervisor._monitor
            assert monitor is not None
            await _until(lambda: _no_waiters(sup), 5, "the waiters to be withdrawn")

    run(main)


async def _no_waiters(sup: corral.AsyncSupervisor) -> bool:
    monitor = sup.supervisor._monitor
    assert monitor is not None
    return await asyncio.to_thread(
        lambda: monitor.call(lambda reply: reply.finish(not monitor._ready_waiters)))


@pytest.mark.timeout(60)
def test_gave_up_is_raised_by_wait(no_leaks: set[int]) -> None:
    async def main() -> None:
        sup = corral.AsyncSupervisor(obs_workers.crash, workers=1, start_method="fork",
                                     backoff=FAST,
                                     budget=corral.RestartBudget(max_restarts=2, window=60))
        _track(sup, no_leaks)
        async with sup:
            with pytest.raises(corral.GaveUp):
                await sup.wait(timeout=30)
            with pytest.raises(corral.GaveUp):
                await sup.wait_ready(timeout=5)

    run(main)


@pytest.mark.timeout(60)
def test_slow_consumer_drops_oldest_keeps_stopped(no_leaks: set[int]) -> None:
    async def main() -> None:
        sup = corral.AsyncSupervisor(obs_workers.graceful, workers=4, start_method="fork",
                                     ready_when="ready", backoff=FAST)
        _track(sup, no_leaks)
        await sup.start()
        stream = sup.events(maxsize=3)
        await sup.wait_ready(timeout=30)
        await sup.stop()  # 4 exits and the end, nobody reading: more than 3 events
        got = [e async for e in stream]
        assert len(got) == 3 and stream.dropped >= 2
        assert got[-1].kind is EventKind.STOPPED  # never dropped

    run(main)


# ------------------------------------------------------------------------------- pools


@pytest.mark.timeout(90)
@pytest.mark.parametrize("method", START_METHODS)
def test_await_tasks_in_a_process_pool(method: str) -> None:
    async def main() -> None:
        async with corral.aio.AsyncPool(2, start_method=method, spare_workers=0) as pool:
            assert await pool.run(pool_tasks.add, 2, 3, z=4) == 9
            results = await asyncio.gather(*(pool.run(pool_tasks.square, x) for x in range(8)))
            assert results == [x * x for x in range(8)]
            assert await pool.map(pool_tasks.square, range(5)) == [0, 1, 4, 9, 16]
            with pytest.raises(ValueError):
                await pool.run(pool_tasks.raise_value, 1)
            with pytest.raises(corral.TaskTimeout):
                await pool.run_task(pool_tasks.sleep_then, (1, 30.0), timeout=0.3)
            # Beside run_in_executor, which works the same way.
            loop = asyncio.get_running_loop()
            assert await loop.run_in_executor(pool.pool, pool_tasks.square, 7) == 49
            assert await corral.aio.run(pool.pool, pool_tasks.square, 6) == 36

    run(main)


@pytest.mark.timeout(60)
def test_cancelling_the_await_kills_the_running_task() -> None:
    async def main() -> None:
        pool = corral.ProcessPool(1, start_method="fork", spare_workers=0)
        try:
            pid = await corral.aio.run(pool, pool_tasks.getpid)
            task = asyncio.create_task(corral.aio.run(pool, pool_tasks.sleep_then, 1, 60.0))
            await asyncio.sleep(0.3)  # it is running
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await _until(lambda: _dead(pid), 10, "the worker running it to be killed")
            assert await corral.aio.run(pool, pool_tasks.square, 3) == 9  # replaced
        finally:
            await asyncio.to_thread(pool.shutdown)

    run(main)


async def _dead(pid: int) -> bool:
    return not pid_alive(pid)


def test_async_pool_of_refuses_non_executors() -> None:
    with pytest.raises(TypeError, match="an Executor"):
        corral.aio.AsyncPool.of(object())  # type: ignore[arg-type]


