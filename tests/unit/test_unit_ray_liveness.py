"""corral.ray's Liveness: hung / unresponsive from probe replies, on a fake clock (no Ray)."""

from __future__ import annotations

import pytest

from corral.events import StopReason
from corral.ray import Liveness, ProbeFailure, default_probe_interval

pytestmark = pytest.mark.timeout(10)


def test_a_worker_whose_sequence_advances_is_never_hung() -> None:
    live = Liveness(100.0, heartbeat_timeout=2.0)
    for k in range(1, 40):
        now = 100.0 + k * 0.5
        live.on_reply(now, seq=5000.0 + k)  # a new beat before every probe
        assert live.verdict(now) is None
        assert live.due() == now + 2.0


def test_sequence_standing_still_for_the_timeout_is_hung() -> None:
    live = Liveness(100.0, heartbeat_timeout=2.0)
    live.on_reply(100.5, seq=7.0)
    for now in (101.0, 101.5, 102.0, 102.4):  # replies keep coming, the sequence does not move
        live.on_reply(now, seq=7.0)
        assert live.verdict(now) is None
    assert live.due() == 102.5
    verdict = live.verdict(102.5)
    assert verdict is not None
    assert verdict.reason is StopReason.HUNG and verdict.responsive
    assert "no heartbeat for 2.000s" in verdict.detail


def test_progress_is_timed_by_our_clock_not_the_workers_stamp() -> None:
    # The worker's stamps come from another machine's clock: far in the past or future.
    live = Liveness(100.0, heartbeat_timeout=1.0)
    live.on_reply(100.2, seq=-3.0e6)
    live.on_reply(100.9, seq=9.0e9)
    assert live.last_progress == 100.9
    assert live.verdict(101.8) is None
    assert live.verdict(101.9) is not None


def test_never_beating_is_a_startup_timeout_after_one_heartbeat_timeout() -> None:
    live = Liveness(100.0, heartbeat_timeout=2.0)
    live.on_reply(100.5, seq=0.0)  # 0: never beat
    assert not live.beaten
    assert live.due() == 102.0
    assert live.verdict(101.9) is None
    verdict = live.verdict(102.0)
    assert verdict is not None and verdict.reason is StopReason.STARTUP_TIMEOUT


def test_startup_grace_alone_counts_while_starting() -> None:
    live = Liveness(100.0, heartbeat_timeout=1.0, startup_timeout=30.0)
    live.on_reply(100.1, seq=1.0)  # beats once, then loads a model for a long time
    assert live.verdict(120.0, starting=True) is None
    assert live.due(starting=True) == 130.0
    verdict = live.verdict(130.0, starting=True)
    assert verdict is not None and verdict.reason is StopReason.STARTUP_TIMEOUT
    assert "not ready" in verdict.detail
    # Once running, the heartbeat timeout applies from the last progress.
    verdict = live.verdict(101.2)
    assert verdict is not None and verdict.reason is StopReason.HUNG


def test_without_heartbeat_timeout_only_probe_failures_count() -> None:
    live = Liveness(100.0, heartbeat_timeout=None)
    live.on_reply(101.0, seq=0.0)
    assert live.due() is None
    assert live.verdict(1e9) is None


def test_n_probe_timeouts_in_a_row_make_it_unresponsive() -> None:
    live = Liveness(100.0, heartbeat_timeout=None, max_probe_failures=3)
    live.on_reply(100.5, seq=1.0)
    live.on_failure(101.5, ProbeFailure.TIMEOUT)
    live.on_failure(102.5, ProbeFailure.TIMEOUT)
    assert live.verdict(102.5) is None
    live.on_failure(103.5, ProbeFailure.TIMEOUT)
    verdict = live.verdict(103.5)
    assert verdict is not None
    assert verdict.reason is StopReason.HUNG and not verdict.responsive
    assert verdict.detail == "not answering: 3 probes in a row failed, last answer 3.0s ago"


def test_a_reply_resets_the_failure_count() -> None:
    live = Liveness(100.0, heartbeat_timeout=None, max_probe_failures=2)
    live.on_failure(101.0, ProbeFailure.UNAVAILABLE)
    live.on_reply(101.5, seq=2.0)
    live.on_failure(102.0, ProbeFailure.UNAVAILABLE)
    assert live.verdict(102.0) is None
    live.on_failure(102.5, ProbeFailure.UNAVAILABLE)
    verdict = live.verdict(102.5)
    assert verdict is not None and "unreachable" in verdict.detail and not verdict.responsive


@pytest.mark.parametrize("kwargs, what", [
    ({"heartbeat_timeout": 0}, "heartbeat_timeout"),
    ({"heartbeat_timeout": 1.0, "startup_timeout": -1}, "startup_timeout"),
    ({"heartbeat_timeout": 1.0, "max_probe_failures": 0}, "max_probe_failures"),
    ({"heartbeat_timeout": 1.0, "max_probe_failures": True}, "max_probe_failures"),
])
def test_bad_arguments_name_the_parameter(kwargs: dict[str, object], what: str) -> None:
    with pytest.raises(ValueError, match=what):
        Liveness(0.0, **kwargs)  # type: ignore[arg-type]


def test_default_probe_interval() -> None:
    assert default_probe_interval(None) == 1.0
    assert default_probe_interval(2.0) == 0.5
    assert default_probe_interval(0.2) == 0.1
    assert default_probe_interval(60.0) == 1.0


def test_import_corral_never_imports_ray() -> None:
    # A fresh interpreter: this one may have imported Ray for other tests.
    import subprocess
    import sys

    code = ("import sys, corral, corral.ray; from corral.ray import Liveness, ActorExit, "
            "WorkerActor, RayWorker; corral.beat(); "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "False", out.stderr
