"""corral's exceptions: hierarchy and pickling (they cross process boundaries)."""

from __future__ import annotations

import pickle

import pytest

from corral.errors import CorralError, GaveUp, NotPicklable, SupervisorStateError
from corral.events import ExitRecord
from corral.exitstatus import ExitStatus
from corral.states import StopReason

pytestmark = pytest.mark.timeout(10)


def _history() -> list[ExitRecord]:
    return [
        ExitRecord(index=0, name="w-0", pid=101, exit=ExitStatus(code=1),
                   reason=StopReason.EXITED, at=1000.0, uptime=0.25),
        ExitRecord(index=1, name="w-1", pid=102, exit=ExitStatus(signal=11, core_dumped=True),
                   reason=StopReason.KILLED, at=1000.5, uptime=0.5, detail="segfault"),
        ExitRecord(index=1, name="w-1", pid=None, exit=None,
                   reason=StopReason.SPAWN_FAILED, at=1001.0, uptime=0.0, detail="OSError"),
    ]


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_gave_up_pickle_round_trip(protocol: int) -> None:
    err = GaveUp("pool 'web' gave up: 3 restarts in 60s", _history())
    back = pickle.loads(pickle.dumps(err, protocol=protocol))
    assert type(back) is GaveUp
    assert str(back) == str(err)
    assert back.args == err.args
    assert back.history == tuple(_history())
    assert isinstance(back.history, tuple)
    assert back.history[1].exit == ExitStatus(signal=11, core_dumped=True)
    assert back.history[2].exit is None


def test_gave_up_history_defaults_empty_and_is_a_tuple() -> None:
    assert GaveUp("x").history == ()
    assert pickle.loads(pickle.dumps(GaveUp("x"))).history == ()
    hist = _history()
    err = GaveUp("x", hist)
    hist.clear()  # the error keeps its own copy
    assert len(err.history) == 3


def test_gave_up_raises_and_catches_as_corral_error() -> None:
    with pytest.raises(CorralError, match="gave up"):
        raise GaveUp("gave up", _history())


def test_hierarchy() -> None:
    assert issubclass(GaveUp, CorralError)
    assert issubclass(NotPicklable, CorralError)
    assert issubclass(NotPicklable, TypeError)
    assert issubclass(SupervisorStateError, CorralError)
    assert issubclass(SupervisorStateError, RuntimeError)


@pytest.mark.parametrize("cls", [CorralError, NotPicklable, SupervisorStateError])
def test_other_errors_pickle(cls: type[CorralError]) -> None:
    back = pickle.loads(pickle.dumps(cls("message")))
    assert type(back) is cls
    assert str(back) == "message"


def test_exit_record_describe() -> None:
    crash, segv, never = _history()
    assert crash.describe() == (
        "worker 'w-0' (index 0, pid 101): exited, exit code 1 after 0.25s "
        "(an uncaught exception in Python, or a program's general failure (see its stderr))"
    )
    assert segv.describe().startswith(
        "worker 'w-1' (index 1, pid 102): killed by signal, SIGSEGV(-11), core dumped after 0.50s")
    assert "native code" in segv.describe()
    assert never.describe() == (
        "worker 'w-1' (index 1, pid None): spawn failed, no process after 0.00s")
    # Corral's own decisions carry no guess about the cause.
    hung = ExitRecord(index=2, name="w-2", pid=103, exit=ExitStatus(signal=9),
                      reason=StopReason.HUNG, at=0.0, uptime=12.0)
    assert hung.describe() == "worker 'w-2' (index 2, pid 103): hung, SIGKILL(-9) after 12.00s"


def test_not_picklable_is_a_pickling_error() -> None:
    import pickle

    assert issubclass(NotPicklable, pickle.PicklingError)
    with pytest.raises(pickle.PicklingError):
        raise NotPicklable("x")
