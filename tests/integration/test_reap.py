"""WorkerProcess.reap() when someone else collected the child first (os.waitpid(-1)/os.wait())."""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal

import pytest

from corral.process import WorkerProcess

pytestmark = [pytest.mark.timeout(30), pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning")]


def _sleep() -> None:
    signal.pause()


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_a_child_reaped_elsewhere_has_an_unknown_status(start_method: str) -> None:
    proc = WorkerProcess.start(multiprocessing.get_context(start_method), _sleep, (), "w", False)
    sentinel = proc.process.sentinel
    try:
        assert proc.reap() is None  # running
        proc.send(signal.SIGKILL)
        multiprocessing.connection.wait([proc.waitable()], timeout=10)
        # The host's generic reaper takes it (by pid here: waitpid(-1) would take any child
        # of the test process).
        os.waitpid(proc.pid, 0)
        status = proc.reap()
        assert status is not None and status.unknown
        assert proc.reap() is status  # once known, always the same answer
    finally:
        proc.send(signal.SIGKILL)
        proc.close()
    with pytest.raises(OSError):
        os.fstat(sentinel)  # close() released multiprocessing's sentinel all the same
