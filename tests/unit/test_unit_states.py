"""The worker state machine: the transition table, check(), and the state/reason properties."""

from __future__ import annotations

import itertools

import pytest

from corral.errors import CorralError
from corral.states import (
    TRANSITIONS,
    IllegalTransition,
    StopReason,
    Trigger,
    WorkerState,
    check,
)

pytestmark = pytest.mark.timeout(10)

S, T = WorkerState, Trigger  # short names for the tables below
WHO = "worker 'web-3' (index 3, pid 4242)"

_LISTED = sorted(
    ((state, trigger, new) for (state, trigger), targets in TRANSITIONS.items() for new in targets),
    key=lambda x: (x[0].name, x[1].name, x[2].name),
)
_UNLISTED_PAIRS = [
    (state, trigger) for state, trigger in itertools.product(S, T)
    if (state, trigger) not in TRANSITIONS
]
_WRONG_TARGETS = [
    (state, trigger, new) for (state, trigger), targets in sorted(
        TRANSITIONS.items(), key=lambda kv: (kv[0][0].name, kv[0][1].name))
    for new in S if new not in targets
]


def _id(x: object) -> str:
    return x.name if isinstance(x, WorkerState | Trigger) else str(x)


@pytest.mark.parametrize(("state", "trigger", "new"), _LISTED, ids=_id)
def test_listed_transitions_are_accepted(state: WorkerState, trigger: Trigger,
                                         new: WorkerState) -> None:
    check(state, trigger, new, WHO)  # does not raise


@pytest.mark.parametrize(("state", "trigger"), _UNLISTED_PAIRS, ids=_id)
def test_unlisted_pairs_raise_naming_worker_state_and_trigger(state: WorkerState,
                                                              trigger: Trigger) -> None:
    for new in S:
        with pytest.raises(IllegalTransition) as info:
            check(state, trigger, new, WHO)
        msg = str(info.value)
        assert msg.startswith(WHO + ":")
        assert f"from {state.name} on {trigger.name} to {new.name}" in msg
        assert "allowed" not in msg  # nothing is allowed from here


@pytest.mark.parametrize(("state", "trigger", "new"), _WRONG_TARGETS, ids=_id)
def test_listed_pair_with_other_target_raises_and_lists_allowed(
        state: WorkerState, trigger: Trigger, new: WorkerState) -> None:
    with pytest.raises(IllegalTransition) as info:
        check(state, trigger, new, WHO)
    msg = str(info.value)
    assert msg.startswith(WHO + ":")
    assert f"from {state.name} on {trigger.name} to {new.name}" in msg
    allowed = msg.split("(allowed: ", 1)[1].rstrip(")").split(", ")
    assert set(allowed) == {s.name for s in TRANSITIONS[(state, trigger)]}


def test_table_is_well_formed() -> None:
    assert _UNLISTED_PAIRS  # the table is not everything-to-everything
    for (state, trigger), targets in TRANSITIONS.items():
        assert isinstance(state, S) and isinstance(trigger, T)
        assert isinstance(targets, frozenset) and targets
        assert all(isinstance(t, S) for t in targets)


def test_some_transitions_that_must_stay_illegal() -> None:
    # A few the monitor must never make; guards against the table being loosened by accident.
    for state, trigger, new in [
        (S.PENDING, T.READY, S.RUNNING),  # no process yet
        (S.STOPPED, T.BACKOFF_OVER, S.PENDING),  # stopped by corral stays stopped...
        (S.STOPPING, T.READY, S.RUNNING),  # readiness does not cancel a stop
        (S.BACKOFF, T.EXITED, S.PENDING),  # nothing runs in backoff
        (S.EXITED, T.SPAWNED, S.STARTING),
        (S.RUNNING, T.SPAWNED, S.STARTING),
        (S.STOPPED, T.STOP, S.PENDING),
    ]:
        with pytest.raises(IllegalTransition):
            check(state, trigger, new, WHO)


def test_a_stopped_worker_starts_again_only_when_asked() -> None:
    # ...unless someone asks: `corral start web:2` after `corral stop web:2`.
    check(S.STOPPED, T.RESTART, S.PENDING, WHO)


def test_every_state_can_be_stopped() -> None:
    for state in S:
        assert (state, T.STOP) in TRANSITIONS, state


def test_illegal_transition_is_a_corral_runtime_error() -> None:
    assert issubclass(IllegalTransition, CorralError)
    assert issubclass(IllegalTransition, RuntimeError)


@pytest.mark.parametrize(("state", "alive", "final"), [
    (S.PENDING, False, False),
    (S.STARTING, True, False),
    (S.RUNNING, True, False),
    (S.STOPPING, True, False),
    (S.BACKOFF, False, False),
    (S.EXITED, False, True),
    (S.STOPPED, False, True),
])
def test_worker_state_alive_and_final(state: WorkerState, alive: bool, final: bool) -> None:
    assert state.alive is alive
    assert state.final is final


def test_worker_state_covered() -> None:
    assert len(S) == 7


@pytest.mark.parametrize("reason", list(StopReason), ids=lambda r: r.name)
def test_stop_reason_by_corral(reason: StopReason) -> None:
    by_itself = {StopReason.EXITED, StopReason.KILLED, StopReason.SPAWN_FAILED}
    assert reason.by_corral is (reason not in by_itself)
