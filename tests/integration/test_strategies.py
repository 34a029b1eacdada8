"""Supervision strategies with real processes under every start method (issue 10)."""

from __future__ import annotations

import os
import signal

import pytest
import workers
from _helpers import pool, wait_value

import corral
from corral import EventKind, StopReason, WorkerState
from support import START_METHODS


def _all_running(sup: corral.Supervisor, n: int) -> list[int] | None:
    st = sup.status()
    if len(st) == n and all(s.state is WorkerState.RUNNING and s.pid for s in st):
        return [s.pid for s in st if s.pid is not None]
    return None


@pytest.mark.parametrize("method", START_METHODS)
@pytest.mark.timeout(90)
def test_one_for_all_replaces_all_four_charged_once(method: str, no_leaks: set[int]) -> None:
    with pool(no_leaks, workers.graceful, workers=4, start_method=method, ready_when="ready",
              strategy="one_for_all",
              budget=corral.RestartBudget(max_restarts=1, window=60)) as (sup, log):
        before = wait_value(lambda: _all_running(sup, 4), 60, "four RUNNING")
        os.kill(before[2], signal.SIGKILL)
        after = wait_value(lambda: (p if (p := _all_running(sup, 4)) and not set(p) & set(before)
                                    else None), 60, "four new processes")
        assert len(set(after)) == 4
        for s in sup.status():
            assert s.last_exit is not None and s.restarts == 1
            if s.index == 2:
                assert s.last_exit.reason is StopReason.KILLED
            else:
                assert s.last_exit.reason is StopReason.GROUP_RESTART
                assert "restarted with worker 2" in s.last_exit.describe()
        # A budget of one restart covered the whole group: no give-up.
        assert not log.of(EventKind.GAVE_UP) and sup.running
        restarting = [e for e in log.of(EventKind.RESTARTING) if e.index != 2]
        assert {e.index for e in restarting} == {0, 1, 3}
        assert all("restarted with worker 2" in e.message for e in restarting)


@pytest.mark.parametrize("method", START_METHODS)
@pytest.mark.timeout(90)
def test_rest_for_one_keeps_the_lower_indexes(method: str, no_leaks: set[int]) -> None:
    with pool(no_leaks, workers.graceful, workers=4, start_method=method, ready_when="ready",
              strategy="rest_for_one") as (sup, _log):
        before = wait_value(lambda: _all_running(sup, 4), 60, "four RUNNING")
        os.kill(before[1], signal.SIGKILL)
        after = wait_value(lambda: (p if (p := _all_running(sup, 4)) and p[1] != before[1]
                                    and p[2] != before[2] and p[3] != before[3] else None),
                           60, "1, 2 and 3 replaced")
        assert after[0] == before[0]  # a lower index is not touched


def test_strategy_is_validated() -> None:
    with pytest.raises(ValueError, match="strategy must be one of"):
        corral.PoolSpec(workers.sleeper, strategy="all_for_one")
    assert corral.PoolSpec(workers.sleeper, strategy="one-for-all").strategy is (
        corral.Strategy.ONE_FOR_ALL)
