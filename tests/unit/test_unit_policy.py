"""Backoff, BackoffState, RestartBudget/BudgetWindow and RestartPolicy: pure code, fake clock."""

from __future__ import annotations

import math
import random
import sys

import pytest

from corral.policy import Backoff, BackoffState, BudgetWindow, RestartBudget, RestartPolicy

pytestmark = pytest.mark.timeout(10)


# --- Backoff.base_delay -------------------------------------------------------------------------


def test_base_delay_exact_sequence_up_to_cap() -> None:
    b = Backoff(initial=0.1, multiplier=2, cap=1.0, jitter=0.0)
    got = [b.base_delay(n) for n in range(1, 9)]
    assert got == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0])


def test_base_delay_zero_streak_means_no_delay() -> None:
    b = Backoff(initial=0.5, multiplier=3, cap=10)
    assert b.base_delay(0) == 0.0
    assert b.base_delay(-5) == 0.0
    assert b.delay(0, random.Random(1)) == 0.0


def test_base_delay_multiplier_one_is_constant() -> None:
    b = Backoff(initial=0.3, multiplier=1.0, cap=5.0)
    assert [b.base_delay(n) for n in (1, 2, 10, 10_000)] == [0.3, 0.3, 0.3, 0.3]


def test_base_delay_is_monotonic_and_capped() -> None:
    b = Backoff(initial=0.05, multiplier=1.7, cap=3.0)
    seq = [b.base_delay(n) for n in range(1, 200)]
    assert seq == sorted(seq)
    assert max(seq) == 3.0
    assert seq[0] == 0.05


@pytest.mark.parametrize("streak", [1024, 1025, 1026, 10_000, 10**9, sys.maxsize, 10**30])
def test_base_delay_huge_streak_does_not_overflow(streak: int) -> None:
    b = Backoff(initial=0.1, multiplier=2.0, cap=30.0)
    assert b.base_delay(streak) == 30.0
    assert 0.0 <= b.delay(streak, random.Random(0)) <= 30.0 * (1 + b.jitter)


def test_base_delay_huge_multiplier_does_not_overflow() -> None:
    b = Backoff(initial=1.0, multiplier=1e300, cap=7.0)
    assert [b.base_delay(n) for n in (1, 2, 3, 4, 50)] == [1.0, 7.0, 7.0, 7.0, 7.0]


def test_base_delay_huge_initial_times_growth_stays_capped() -> None:
    # initial * multiplier**n overflows to inf in the multiplication (no exception there).
    b = Backoff(initial=1e300, multiplier=1e10, cap=1e300)
    assert b.base_delay(5) == 1e300


def test_base_delay_follows_formula_for_multiplier_near_one() -> None:
    b = Backoff(initial=0.1, multiplier=1.001, cap=30.0)
    assert b.base_delay(5000) == pytest.approx(min(30.0, 0.1 * 1.001**4999))


def test_base_delay_zero_initial_stays_zero_for_huge_streaks() -> None:
    b = Backoff(initial=0.0, multiplier=2.0, cap=5.0)
    assert b.base_delay(10) == 0.0
    assert b.base_delay(2000) == 0.0


# --- Backoff.delay (jitter) ---------------------------------------------------------------------


@pytest.mark.parametrize("jitter", [0.1, 0.5, 0.99])
def test_jitter_stays_within_fraction(jitter: float) -> None:
    b = Backoff(initial=0.1, multiplier=2, cap=1.0, jitter=jitter)
    rng = random.Random(12345)
    for streak in range(1, 12):
        base = b.base_delay(streak)
        for _ in range(200):
            d = b.delay(streak, rng)
            assert base * (1 - jitter) - 1e-12 <= d <= base * (1 + jitter) + 1e-12
            assert d >= 0.0


def test_jitter_actually_spreads_and_is_reproducible() -> None:
    b = Backoff(initial=1.0, multiplier=2, cap=10.0, jitter=0.2)
    first = [b.delay(3, random.Random(7)) for _ in range(3)]
    assert first[0] == first[1] == first[2]  # same seed, same delay
    rng = random.Random(7)
    many = {b.delay(3, rng) for _ in range(50)}
    assert len(many) > 40  # not lockstep
    assert min(many) < 4.0 < max(many)


def test_zero_jitter_is_exact() -> None:
    b = Backoff(initial=0.25, multiplier=2, cap=1.0, jitter=0.0)
    rng = random.Random(3)
    assert [b.delay(n, rng) for n in range(1, 5)] == [0.25, 0.5, 1.0, 1.0]


def test_delay_without_rng_uses_module_random() -> None:
    b = Backoff(initial=1.0, multiplier=2, cap=10.0, jitter=0.5)
    random.seed(99)
    a = b.delay(2)
    random.seed(99)
    assert b.delay(2) == a
    assert 1.0 <= a <= 3.0


# --- BackoffState -------------------------------------------------------------------------------


def test_quick_deaths_grow_the_streak() -> None:
    st = BackoffState(Backoff(initial=0.1, multiplier=2, cap=1.0, jitter=0.0, reset_after=10))
    delays = [st.on_death(uptime=0.5) for _ in range(6)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert st.streak == 6


def test_long_run_resets_streak_and_restarts_at_once() -> None:
    st = BackoffState(Backoff(initial=0.1, multiplier=2, cap=1.0, jitter=0.0, reset_after=10))
    for _ in range(4):
        st.on_death(uptime=1.0)
    assert st.streak == 4
    assert st.on_death(uptime=10.0) == 0.0  # exactly reset_after counts as healthy
    assert st.streak == 0
    assert st.on_death(uptime=9.999) == pytest.approx(0.1)  # next quick death starts over
    assert st.streak == 1
    assert st.on_death(uptime=3600.0) == 0.0
    assert st.streak == 0


def test_uptime_just_below_reset_after_is_a_quick_death() -> None:
    st = BackoffState(Backoff(initial=0.1, multiplier=2, cap=1.0, jitter=0.0, reset_after=10))
    st.on_death(uptime=9.99)
    assert st.on_death(uptime=9.99) == pytest.approx(0.2)
    assert st.streak == 2


def test_reset_after_inf_never_resets() -> None:
    st = BackoffState(Backoff(initial=0.1, multiplier=2, cap=1.0, jitter=0.0,
                              reset_after=math.inf))
    delays = [st.on_death(uptime=u) for u in (0.0, 1e3, 1e6, 1e9, 1e12)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0])
    assert st.streak == 5


def test_on_death_jitter_uses_given_rng() -> None:
    b = Backoff(initial=1.0, multiplier=2, cap=8.0, jitter=0.5, reset_after=10)
    a, c = BackoffState(b), BackoffState(b)
    ra, rc = random.Random(5), random.Random(5)
    da = [a.on_death(0.0, ra) for _ in range(5)]
    dc = [c.on_death(0.0, rc) for _ in range(5)]
    assert da == dc
    for n, d in enumerate(da, start=1):
        base = b.base_delay(n)
        assert base * 0.5 <= d <= base * 1.5


# --- RestartBudget / BudgetWindow ---------------------------------------------------------------


def test_window_allows_n_refuses_n_plus_one_then_allows_when_oldest_leaves() -> None:
    w = BudgetWindow(RestartBudget(max_restarts=3, window=10.0))
    assert w.try_spend(100.0)
    assert w.try_spend(101.0)
    assert w.try_spend(102.0)
    assert not w.try_spend(103.0)  # the 4th within 10 s
    assert not w.try_spend(109.999)  # 100.0 is still inside (now - window, now]
    assert w.try_spend(110.0)  # 100.0 left the window exactly at now - window
    assert not w.try_spend(110.5)
    assert w.try_spend(111.0)  # 101.0 left
    assert list(w.times) == [102.0, 110.0, 111.0]


def test_refused_try_records_nothing() -> None:
    w = BudgetWindow(RestartBudget(max_restarts=2, window=10.0))
    assert w.try_spend(0.0)
    assert w.try_spend(1.0)
    for t in (2.0, 5.0, 9.0):
        assert not w.try_spend(t)
    assert list(w.times) == [0.0, 1.0]
    # Had the refusals been recorded, 10.0 would still see 2 restarts (5.0, 9.0) in its window.
    assert w.try_spend(10.0)
    assert w.try_spend(11.0)
    assert not w.try_spend(12.0)


def test_window_forgets_everything_after_a_quiet_period() -> None:
    w = BudgetWindow(RestartBudget(max_restarts=2, window=5.0))
    assert w.try_spend(0.0) and w.try_spend(0.0)
    assert not w.try_spend(0.0)
    assert w.try_spend(1000.0) and w.try_spend(1000.0)
    assert list(w.times) == [1000.0, 1000.0]


def test_max_restarts_none_never_refuses() -> None:
    w = BudgetWindow(RestartBudget(max_restarts=None, window=1.0))
    assert all(w.try_spend(0.0) for _ in range(10_000))
    assert len(w.times) == 0  # nothing to remember


def test_max_restarts_zero_refuses_the_first() -> None:
    w = BudgetWindow(RestartBudget(max_restarts=0, window=60.0))
    assert not w.try_spend(0.0)
    assert not w.try_spend(1e9)
    assert len(w.times) == 0


def test_budget_defaults() -> None:
    b = RestartBudget()
    assert b.max_restarts == 20
    assert b.window == 60.0


# --- RestartPolicy ------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    ("always", RestartPolicy.ALWAYS),
    ("ALWAYS", RestartPolicy.ALWAYS),
    ("on-failure", RestartPolicy.ON_FAILURE),
    ("on_failure", RestartPolicy.ON_FAILURE),
    ("On-Failure", RestartPolicy.ON_FAILURE),
    ("never", RestartPolicy.NEVER),
    (RestartPolicy.NEVER, RestartPolicy.NEVER),
    (RestartPolicy.ON_FAILURE, RestartPolicy.ON_FAILURE),
])
def test_parse_accepts(value: object, expected: RestartPolicy) -> None:
    assert RestartPolicy.parse(value) is expected  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["sometimes", "", "on failure", None, 1, True, ["always"]])
def test_parse_rejects_naming_restart(value: object) -> None:
    with pytest.raises(ValueError, match=r"^restart must be one of") as info:
        RestartPolicy.parse(value)  # type: ignore[arg-type]
    assert repr(value) in str(info.value)


@pytest.mark.parametrize(("policy", "clean", "failed"), [
    (RestartPolicy.ALWAYS, True, True),
    (RestartPolicy.ON_FAILURE, False, True),
    (RestartPolicy.NEVER, False, False),
])
def test_wants_restart(policy: RestartPolicy, clean: bool, failed: bool) -> None:
    assert policy.wants_restart(clean_exit=True) is clean
    assert policy.wants_restart(clean_exit=False) is failed


# --- validation ---------------------------------------------------------------------------------

_BACKOFF_FIELDS = ("initial", "multiplier", "cap", "jitter", "reset_after")


@pytest.mark.parametrize("field", _BACKOFF_FIELDS)
@pytest.mark.parametrize("bad", [True, False, "1", None, [1.0], 1j])
def test_backoff_rejects_wrong_types(field: str, bad: object) -> None:
    with pytest.raises(TypeError, match=rf"^Backoff\.{field} must be a number"):
        Backoff(**{field: bad})  # type: ignore[arg-type]


@pytest.mark.parametrize("field", _BACKOFF_FIELDS)
def test_backoff_rejects_nan(field: str) -> None:
    with pytest.raises(ValueError, match=rf"^Backoff\.{field} must be a finite number"):
        Backoff(**{field: math.nan})


@pytest.mark.parametrize("field", ["initial", "multiplier", "cap", "jitter"])
def test_backoff_rejects_inf(field: str) -> None:
    with pytest.raises(ValueError, match=rf"^Backoff\.{field} must be a finite number"):
        Backoff(**{field: math.inf})


def test_backoff_reset_after_accepts_inf_but_not_minus_inf() -> None:
    assert Backoff(reset_after=math.inf).reset_after == math.inf
    with pytest.raises(ValueError, match=r"^Backoff\.reset_after must be >= 0"):
        Backoff(reset_after=-math.inf)


@pytest.mark.parametrize(("field", "value", "pattern"), [
    ("initial", -0.1, r"^Backoff\.initial must be >= 0"),
    ("cap", -1.0, r"^Backoff\.cap must be >= 0"),
    ("jitter", -0.01, r"^Backoff\.jitter must be >= 0"),
    ("reset_after", -1, r"^Backoff\.reset_after must be >= 0"),
    ("multiplier", 0.5, r"^Backoff\.multiplier must be >= 1"),
    ("multiplier", 0, r"^Backoff\.multiplier must be >= 1"),
    ("multiplier", -2.0, r"^Backoff\.multiplier must be >= 1"),
])
def test_backoff_rejects_out_of_range(field: str, value: float, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        Backoff(**{field: value})


def test_backoff_rejects_cap_below_initial() -> None:
    with pytest.raises(ValueError, match=r"^Backoff\.cap must be >= Backoff\.initial \(2\.0\)"):
        Backoff(initial=2.0, cap=1.0)


@pytest.mark.parametrize("jitter", [1, 1.0, 1.5])
def test_backoff_rejects_jitter_of_one_or_more(jitter: float) -> None:
    with pytest.raises(ValueError, match=r"^Backoff\.jitter must be a fraction in \[0, 1\)"):
        Backoff(jitter=jitter)


def test_backoff_accepts_edges() -> None:
    Backoff(initial=0, multiplier=1, cap=0, jitter=0, reset_after=0)
    Backoff(initial=1.0, cap=1.0, jitter=0.999)
    Backoff(initial=1, multiplier=3, cap=10, reset_after=5)  # ints are numbers


def test_backoff_is_frozen() -> None:
    b = Backoff()
    with pytest.raises(AttributeError):
        b.cap = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("bad", [True, False, 1.0, "3", [3]])
def test_budget_rejects_max_restarts_type(bad: object) -> None:
    with pytest.raises(TypeError, match=r"^RestartBudget\.max_restarts must be an int"):
        RestartBudget(max_restarts=bad)  # type: ignore[arg-type]


def test_budget_rejects_negative_max_restarts() -> None:
    with pytest.raises(ValueError, match=r"^RestartBudget\.max_restarts must be >= 0, got -1"):
        RestartBudget(max_restarts=-1)


@pytest.mark.parametrize(("bad", "exc", "pattern"), [
    (True, TypeError, r"^RestartBudget\.window must be a number"),
    ("60", TypeError, r"^RestartBudget\.window must be a number"),
    (None, TypeError, r"^RestartBudget\.window must be a number"),
    (math.nan, ValueError, r"^RestartBudget\.window must be a finite number"),
    (math.inf, ValueError, r"^RestartBudget\.window must be a finite number"),
    (0, ValueError, r"^RestartBudget\.window must be > 0"),
    (0.0, ValueError, r"^RestartBudget\.window must be > 0"),
    (-5.0, ValueError, r"^RestartBudget\.window must be > 0"),
])
def test_budget_rejects_window(bad: object, exc: type[Exception], pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        RestartBudget(window=bad)  # type: ignore[arg-type]


# --- the peeks the exit path uses before the policy decides ------------------------------------


def test_restarts_at_once_agrees_with_on_death_and_changes_nothing() -> None:
    st = BackoffState(Backoff(initial=0.1, multiplier=2, cap=1.0, jitter=0.0, reset_after=10))
    for uptime in (0.0, 5.0, 9.999, 10.0, 50.0):
        st.streak = 3
        peek = st.restarts_at_once(uptime)
        assert st.streak == 3
        assert peek == (st.on_death(uptime) == 0.0)


def test_budget_allows_agrees_with_try_spend_and_records_nothing() -> None:
    w = BudgetWindow(RestartBudget(max_restarts=2, window=10.0))
    for now in (0.0, 1.0, 2.0, 9.0, 10.5, 11.5, 30.0):
        before = list(w.times)
        peek = w.allows(now)
        assert list(w.times) == before
        assert peek == w.try_spend(now)
    assert BudgetWindow(RestartBudget(max_restarts=None)).allows(0.0)
    assert not BudgetWindow(RestartBudget(max_restarts=0)).allows(0.0)
