"""events() streams made before start, two at once, and one made just before a kill."""
from __future__ import annotations

import asyncio
import os
import signal

import obs_workers
import pytest

import corral
from corral import EventKind

FAST = corral.Backoff(initial=0.01, multiplier=2.0, cap=0.05, jitter=0.0, reset_after=0)


@pytest.mark.timeout(60)
def test_streams_before_start_and_right_before_a_kill(no_leaks: set[int]) -> None:
    async def main() -> None:
        sup = corral.AsyncSupervisor(obs_workers.graceful, workers=2, start_method="fork",
                                     ready_when="ready", backoff=FAST, stop_timeout=5.0)
        sup.supervisor.subscribe(lambda e: no_leaks.add(e.pid) if e.pid else None)
        early_a, early_b = sup.events(), sup.events()
        async with sup:
            assert await sup.wait_ready(timeout=30) == 2
            victim = (await sup.status())[0].pid
            assert victim is not None
            late = sup.events()
            os.kill(victim, signal.SIGKILL)
            exited = False
            async for event in late:  # its exit, then its replacement's start (a backoff later)
                if event.kind is EventKind.EXITED:
                    assert event.pid == victim
                    exited = True
                elif exited and event.kind is EventKind.SPAWNED:
                    break
        a = [e async for e in early_a]
        b = [e async for e in early_b]
        assert [(e.kind, e.pid) for e in a] == [(e.kind, e.pid) for e in b]
        assert sum(e.kind is EventKind.SPAWNED for e in a) >= 3
        assert a[-1].kind is EventKind.STOPPED
        assert any(e.kind is EventKind.EXITED and e.pid == victim for e in a)

    asyncio.run(asyncio.wait_for(main(), 50))
