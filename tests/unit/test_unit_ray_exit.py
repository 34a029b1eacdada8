"""corral.ray's decoding of how a worker's run() ended, from real Ray exception objects.

The objects are built here as Ray builds them for the caller (the messages are the ones measured
on Ray 2.60, see src/corral/ray/NOTES.md); no cluster is needed.
"""

from __future__ import annotations

import pytest

from corral.events import StopReason
from corral.exitstatus import ExitStatus
from corral.ray import DeathCause, decode

rx = pytest.importorskip("ray.exceptions", reason="Ray is not installed (pip install corral[ray])")

pytestmark = pytest.mark.timeout(20)

_DIED = ("The actor died unexpectedly before finishing this task.\n\tclass_name: WorkerActor\n"
         "\tpid: 11506\n")


def _actor_died(tail: str) -> BaseException:
    exc = rx.ActorDiedError()
    exc.error_msg = _DIED + tail
    return exc


def test_returned_and_exited() -> None:
    done = decode({"code": 0, "stopped": False})
    assert done.cause is DeathCause.RETURNED and done.exit == ExitStatus(code=0)
    assert done.reason is StopReason.EXITED and not done.stop_requested
    stopped = decode({"code": 0, "stopped": True})
    assert stopped.cause is DeathCause.EXITED and stopped.stop_requested
    three = decode({"code": 3, "stopped": False})
    assert three.cause is DeathCause.EXITED and three.exit == ExitStatus(code=3)


def test_a_raising_target_keeps_the_users_exception_and_traceback() -> None:
    user = ValueError("boom")
    tb = 'Traceback (most recent call last):\n  File "t.py", line 3, in target\nValueError: boom'
    err = rx.RayTaskError("WorkerActor.run", tb, user, proctitle="ray::WorkerActor.run",
                          pid=42, ip="127.0.0.1").as_instanceof_cause()
    assert isinstance(err, ValueError)  # Ray's dual class, as ray.get raises it
    got = decode(err)
    assert got.cause is DeathCause.RAISED and got.exit == ExitStatus(code=1)
    assert got.reason is StopReason.EXITED
    assert got.error is user
    assert "ValueError: boom" in got.detail and 't.py", line 3' in got.detail
    record = got.record(2, "w-2", 42, 1.5)
    assert record.exit == ExitStatus(code=1) and record.detail and "boom" in record.detail


@pytest.mark.parametrize("tail, cause, code", [
    ("The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR "
     "Worker exit detail: Worker unexpectedly exits with a connection error code 2. End of "
     "file.", DeathCause.DIED, None),
    ("The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR "
     "Worker exit detail: Worker exits unexpectedly. Worker exits with an exit code 3.",
     DeathCause.DIED, 3),
    ("The actor is dead because it was killed by `ray.kill`.", DeathCause.KILLED, None),
    ("The actor died because its node has died. Node Id: a69e\n\tthe actor's node was "
     "terminated unexpectedly: health check failed due to missing too many heartbeats",
     DeathCause.NODE_LOST, None),
])
def test_actor_died(tail: str, cause: DeathCause, code: int | None) -> None:
    got = decode(_actor_died(tail), stop_requested=True)
    assert got.cause is cause
    assert got.exit == (ExitStatus(code=code) if code is not None else None)
    assert got.reason is (StopReason.EXITED if code is not None else StopReason.KILLED)
    assert got.stop_requested and tail[:40] in got.detail
    assert got.record(0, "w-0", 11506, 2.0, reason=StopReason.SHUTDOWN).reason is \
        StopReason.SHUTDOWN


def test_ray_oom_killer_and_node_died() -> None:
    oom = decode(rx.OutOfMemoryError("1 worker(s) were killed due to the node running low on "
                                     "memory."))
    assert oom.cause is DeathCause.OOM and oom.reason is StopReason.KILLED
    assert oom.hint is not None and "memory" in oom.hint
    assert "memory" in oom.describe()
    node = decode(rx.NodeDiedError("node gone"))
    assert node.cause is DeathCause.NODE_LOST


def test_start_failures() -> None:
    init = rx.ActorDiedError()
    init._actor_init_failed = True
    assert decode(init).cause is DeathCause.START_FAILED
    assert decode(init).reason is StopReason.SPAWN_FAILED
    assert decode(rx.ActorUnschedulableError("no node")).cause is DeathCause.START_FAILED
    assert decode(rx.RuntimeEnvSetupError("pip failed")).cause is DeathCause.START_FAILED


def test_unavailable_and_other_ray_errors() -> None:
    assert decode(rx.ActorUnavailableError("rpc failed", None)).cause is DeathCause.UNAVAILABLE
    assert decode(rx.LocalRayletDiedError()).cause is DeathCause.ERROR
