"""The pool manager without processes: a fake clock, fake processes and socket pairs.

The test drives the manager's rounds itself (``PoolRunner.step``) on its own thread; only the
spawner thread runs beside it, calling the fake spawn function. A fake worker speaks the real
wire protocol on its end of a socket pair; a fake process's exit is a pipe the test makes
readable. No process is started.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError
from typing import Any

import pytest

from corral import heartbeat
from corral.exitstatus import ExitStatus
from corral.policy import Backoff, RestartBudget
from corral.pool._future import PoolFuture
from corral.pool._manager import SpawnRequest
from corral.pool._records import PoolConfig, Task, WorkerState
from corral.pool._runner import PoolRunner
from corral.pool._wire import FrameDecoder, WireKind, encode
from corral.pool.errors import PoolBroken, TaskTimeout, WorkerLost
from corral.process import DUMP_NAME, DUMP_SIGNAL


def square(x: int) -> int:
    return x * x


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeProcess:
    """A worker process as the manager sees it. ``exit()`` makes its waitable readable."""

    def __init__(self, pid: int, clock: Clock) -> None:
        self.pid = pid
        self.started = clock()
        self._r, self._w = os.pipe()
        self.status: ExitStatus | None = None
        self.signals: list[int] = []
        self.dump_fd = -1  # set by a test: a memfd the "handler" writes to
        self.closed = False

    def waitable(self) -> int:
        return self._r

    def exit(self, status: ExitStatus) -> None:
        if self.status is None:
            self.status = status
            os.write(self._w, b"x")

    def send(self, sig: int) -> bool:
        self.signals.append(sig)
        if sig == DUMP_SIGNAL and self.dump_fd >= 0 and self.status is None:
            os.write(self.dump_fd, b"Thread 0x1 (most recent call first):\n  File spin.py\n")
        return self.status is None

    def send_group(self, sig: int) -> bool:
        self.signals.append(sig)
        if sig == signal.SIGKILL:
            self.exit(ExitStatus(signal=signal.SIGKILL))
        return True

    def kill_group_leftovers(self) -> None:
        pass

    def reap(self) -> ExitStatus | None:
        return self.status

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self._r)
            os.close(self._w)

    def kill_and_reap(self) -> None:
        self.send_group(signal.SIGKILL)
        self.close()


class FakeWorker:
    """The worker's end: the real protocol on a socket pair."""

    def __init__(self, req: SpawnRequest, proc: FakeProcess, sock: socket.socket) -> None:
        self.req = req
        self.proc = proc
        self.sock = sock
        self.sock.settimeout(5)
        self._decoder = FrameDecoder()
        self._frames: list[bytes] = []

    def say(self, *msg: Any) -> None:
        self.sock.sendall(encode(pickle.dumps(msg)))

    def hello(self) -> None:
        self.say(WireKind.HELLO.value)

    def recv(self) -> bytes:
        while not self._frames:
            chunk = self.sock.recv(1 << 16)
            assert chunk, "the manager closed the socket"
            self._frames += [bytes(f) for f in self._decoder.feed(chunk)]
        return self._frames.pop(0)

    def task(self) -> tuple[Any, ...]:
        fn, args, kwargs = pickle.loads(self.recv())
        return fn, args, kwargs

    def run_task(self) -> None:
        fn, args, kwargs = self.task()
        self.say(WireKind.RESULT.value, fn(*args, **kwargs))


class World:
    """The fake spawn function and everything it made."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.workers: list[FakeWorker] = []
        self.lock = threading.Lock()
        self.next_pid = 90_000
        self.use_real_pid = False  # the dump test needs /proc/<pid>/fd of this process
        self.table: Any = None
        self.fail: BaseException | None = None  # what a start raises, if set
        self.failed = 0
        self.hold: threading.Event | None = None  # set: a start waits for it (a stuck server)
        self.held = threading.Event()  # a start is waiting for ``hold``

    def spawn(self, req: SpawnRequest) -> tuple[FakeProcess, socket.socket]:
        if self.hold is not None:
            self.held.set()
            assert self.hold.wait(30), "the test never let the start go"
        if self.fail is not None:
            self.failed += 1
            raise self.fail
        ours, theirs = socket.socketpair()
        with self.lock:
            self.next_pid += 1
            pid = os.getpid() if self.use_real_pid else self.next_pid
            proc = FakeProcess(pid, self.clock)
            self.workers.append(FakeWorker(req, proc, theirs))
        return proc, ours

    def __getitem__(self, i: int) -> FakeWorker:
        with self.lock:
            return self.workers[i]

    def __len__(self) -> int:
        with self.lock:
            return len(self.workers)


def config(**overrides: Any) -> PoolConfig:
    settings: dict[str, Any] = dict(
        name="t", max_workers=1, spare_workers=0, start_method="spawn", initializer=None,
        initargs=(), task_timeout=None, retries=0, max_tasks_per_worker=None,
        max_memory_per_worker=None, memory_check_interval=1.0, startup_timeout=None,
        backoff=Backoff(initial=0.5, cap=1.0, jitter=0.0), budget=RestartBudget(),
        stop_timeout=5.0)
    settings.update(overrides)
    return PoolConfig(**settings)


class Harness:
    def __init__(self, cfg: PoolConfig, fail: BaseException | None = None) -> None:
        self.clock = Clock()
        self.world = World(self.clock)
        self.world.fail = fail
        self.runner = PoolRunner(cfg, clock=self.clock, spawn=self.world.spawn)
        self.runner.open()
        self.world.table = self.runner._table
        manager = self.runner.manager
        assert manager is not None
        self.manager = manager
        manager.fill(self.clock())

    def step(self) -> None:
        # Waits at most 50 ms (real time) for an fd: the fake clock only moves when told to.
        self.runner.step(self.clock() + 0.05)

    def until(self, cond: Callable[[], object], what: str, timeout: float = 20.0) -> None:
        # Bounded by real time, not rounds: a round with a due fake-clock deadline returns at
        # once, and a burst of those can end before another thread has handed anything over.
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"never happened: {what}")
            self.step()

    def advance(self, seconds: float) -> None:
        self.clock.now += seconds
        self.step()

    def submit(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None,
               retries: int = 0) -> PoolFuture[Any]:
        shared = self.runner.shared
        fut: PoolFuture[Any] = PoolFuture(self.runner.cancel_running)
        fut._task = Task(shared.next_id(), fut, pickle.dumps((fn, args, {})), fn, timeout,
                         retries)
        shared.pending.append(fut._task)
        self.runner.wake()
        return fut

    def serve(self, w: FakeWorker, n: int = 1) -> None:
        """``w`` runs its next ``n`` tasks, a round after each reply (which sends the next)."""
        for _ in range(n):
            w.run_task()
            self.step()

    def booted(self, n: int) -> list[FakeWorker]:
        """Wait for the n-th started worker, say hello from each not yet ready."""
        self.until(lambda: len(self.world) >= n, f"{n} workers started")
        workers = [self.world[i] for i in range(n)]
        for w in workers:
            record = self.record(w)
            if record is not None and record.state is WorkerState.BOOTING:
                w.hello()
        self.until(lambda: all(self.state(w) is not WorkerState.BOOTING for w in workers),
                   "the hellos")
        return workers

    def record(self, fake: FakeWorker) -> Any:
        return self.manager._roster.workers.get(fake.req.worker_id)

    def state(self, fake: FakeWorker) -> WorkerState | None:
        record = self.record(fake)
        return None if record is None else record.state

    def close(self) -> None:
        self.runner.finish()
        for w in self.world.workers:
            w.sock.close()
            w.proc.close()


@pytest.fixture
def make() -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def factory(fail: BaseException | None = None, **overrides: Any) -> Harness:
        h = Harness(config(**overrides), fail)
        made.append(h)
        return h

    yield factory
    for h in made:
        h.close()


def test_a_worker_boots_takes_a_task_and_returns_its_result(make: Callable[..., Harness]) -> None:
    h = make()
    h.until(lambda: len(h.world) == 1, "a start")
    (w,) = h.booted(1)
    assert h.state(w) is WorkerState.IDLE
    assert h.runner.shared.pids == (w.proc.pid,)
    fut = h.submit(square, 7)
    h.step()
    assert h.state(w) is WorkerState.BUSY and fut.running()
    w.run_task()
    h.until(fut.done, "the result")
    assert fut.result() == 49
    assert h.state(w) is WorkerState.IDLE
    assert h.runner.shared.counters["tasks_done"] == 1


def test_a_worker_that_exits_before_replying_loses_its_task(
        make: Callable[..., Harness]) -> None:
    h = make()
    (w,) = h.booted(1)
    fut = h.submit(square, 3)
    h.step()
    w.task()
    w.proc.exit(ExitStatus(signal=signal.SIGSEGV))
    h.until(fut.done, "the loss")
    err = fut.exception()
    assert isinstance(err, WorkerLost)
    assert err.pid == w.proc.pid and err.exitcode == -signal.SIGSEGV
    assert "died while running task" in str(err) and "SIGSEGV" in str(err)
    h.until(lambda: len(h.world) == 2, "a replacement")  # a worker that was ready: at once
    assert h.runner.shared.counters["workers_lost"] == 1


def test_the_last_reply_in_the_same_batch_as_the_exit_still_counts(
        make: Callable[..., Harness]) -> None:
    h = make()
    (w,) = h.booted(1)
    fut = h.submit(square, 4)
    h.step()
    w.task()
    w.say(WireKind.RESULT.value, 16)
    w.proc.exit(ExitStatus(code=0))
    batch = h.runner._reactor.get_events(1)  # type: ignore[union-attr]
    assert {fd for fd, _ in batch} == {h.record(w).fd, w.proc.waitable()}
    h.runner._reactor.process_events(batch)  # type: ignore[union-attr]
    assert fut.result(timeout=0) == 16  # the reply first, then the exit
    assert h.record(w) is None  # forgotten


def test_a_task_past_its_timeout_gets_a_dump_then_its_worker_killed(
        make: Callable[..., Harness]) -> None:
    h = make()
    h.world.use_real_pid = True  # the dump is read through /proc/<pid>/fd/<fd>
    (w,) = h.booted(1)
    dump_fd = os.memfd_create(f"{DUMP_NAME}-0")
    try:
        w.proc.dump_fd = dump_fd
        # What the worker's bootstrap writes into its heartbeat slot.
        h.world.table.view[w.req.boot.index * heartbeat._DOUBLES + 4] = float(dump_fd)
        fut = h.submit(square, 5, timeout=30.0)
        h.step()
        w.task()  # and never replies
        h.advance(29.0)
        assert not fut.done() and DUMP_SIGNAL not in w.proc.signals
        h.advance(1.5)  # past the timeout: the dump is asked for, the worker leaves
        assert DUMP_SIGNAL in w.proc.signals and signal.SIGKILL not in w.proc.signals
        assert h.state(w) is WorkerState.LEAVING
        h.until(lambda: h.advance(0.01) or fut.done(), "the dump and the kill")
        assert signal.SIGKILL in w.proc.signals
        err = fut.exception()
        assert isinstance(err, TaskTimeout) and err.timeout == 30.0 and err.pid == os.getpid()
        assert "File spin.py" in err.dump and "File spin.py" in str(err)
        h.until(lambda: h.record(w) is None, "its exit")
        assert h.runner.shared.counters["timeouts"] == 1
        assert h.runner.shared.counters["workers_lost"] == 0  # a kill of ours is no crash
    finally:
        os.close(dump_fd)


def test_a_worker_is_recycled_after_max_tasks(make: Callable[..., Harness]) -> None:
    h = make(max_tasks_per_worker=2)
    (w,) = h.booted(1)
    futures = [h.submit(square, i) for i in range(3)]
    h.step()
    h.serve(w, 2)
    h.until(lambda: futures[1].done(), "two results")
    assert w.recv() == b""  # the quit frame
    assert h.state(w) is WorkerState.LEAVING
    h.until(lambda: len(h.world) == 2, "its replacement")
    w2 = h.world[1]
    w2.hello()
    w.proc.exit(ExitStatus(code=0))
    h.until(lambda: h.state(w2) is WorkerState.BUSY, "the third task on the new worker")
    w2.run_task()
    h.until(lambda: futures[2].done(), "the third on the new worker")
    assert [f.result() for f in futures] == [0, 1, 4]
    assert h.runner.shared.counters["recycled_tasks"] == 1


def test_a_worker_that_ignores_quit_is_killed_after_stop_timeout(
        make: Callable[..., Harness]) -> None:
    h = make(max_tasks_per_worker=1, stop_timeout=5.0)
    (w,) = h.booted(1)
    fut = h.submit(square, 2)
    h.step()
    w.run_task()
    h.until(fut.done, "the result")
    assert w.recv() == b""
    h.advance(4.0)
    assert signal.SIGKILL not in w.proc.signals
    h.advance(1.5)
    assert signal.SIGKILL in w.proc.signals


def test_a_spare_takes_a_lost_workers_place_at_once(make: Callable[..., Harness]) -> None:
    h = make(spare_workers=1)
    w, spare = h.booted(2)
    record = h.record(spare)
    assert record.spare and h.runner.shared.spare_pids == (spare.proc.pid,)
    fut = h.submit(square, 6)
    h.step()
    assert h.state(w) is WorkerState.BUSY and h.state(spare) is WorkerState.IDLE
    w.task()  # a spare gets no task
    w.proc.exit(ExitStatus(code=1))
    h.until(fut.done, "the loss")
    assert isinstance(fut.exception(), WorkerLost)
    nxt = h.submit(square, 8)
    h.until(lambda: h.state(spare) is WorkerState.BUSY, "the spare's first task")
    assert not h.record(spare).spare
    assert h.runner.shared.pids == (spare.proc.pid,)
    assert h.runner.shared.counters["spares_promoted"] == 1
    spare.run_task()
    h.until(nxt.done, "its result")
    assert nxt.result() == 64
    h.until(lambda: len(h.world) == 3, "a new spare")
    assert h.record(h.world[2]).spare


def test_shutdown_runs_the_pending_tasks_then_closes(make: Callable[..., Harness]) -> None:
    h = make()
    (w,) = h.booted(1)
    futures = [h.submit(square, i) for i in range(3)]
    h.runner.request_shutdown(cancel_futures=False)
    h.step()
    h.serve(w, len(futures))
    h.until(lambda: all(f.done() for f in futures), "every task")
    assert [f.result() for f in futures] == [0, 1, 4]
    h.until(lambda: h.state(w) is WorkerState.LEAVING, "the close")
    assert w.recv() == b""  # told to quit
    w.proc.exit(ExitStatus(code=0))
    h.until(lambda: h.manager.done, "the end")


def test_shutdown_with_cancel_futures_cancels_what_waits(make: Callable[..., Harness]) -> None:
    h = make()
    (w,) = h.booted(1)
    running = h.submit(square, 1)
    h.step()
    waiting = [h.submit(square, i) for i in range(3)]
    h.runner.request_shutdown(cancel_futures=True)
    h.step()
    assert all(f.cancelled() for f in waiting)
    with pytest.raises(CancelledError):
        waiting[0].result(timeout=0)
    w.run_task()
    h.until(running.done, "the running task")
    assert running.result() == 1
    assert w.recv() == b""
    w.proc.exit(ExitStatus(code=0))
    h.until(lambda: h.manager.done, "the end")


def test_cancelling_a_running_task_kills_its_worker(make: Callable[..., Harness]) -> None:
    h = make()
    (w,) = h.booted(1)
    fut = h.submit(square, 1)
    h.step()
    w.task()
    assert fut.cancel()
    h.until(lambda: signal.SIGKILL in w.proc.signals, "the kill")
    h.until(lambda: len(h.world) == 2, "a replacement")
    assert h.runner.shared.counters["cancelled_running"] == 1
    assert h.runner.shared.counters["workers_lost"] == 0


def test_a_used_up_budget_breaks_the_pool(make: Callable[..., Harness]) -> None:
    h = make(budget=RestartBudget(max_restarts=2, window=60))
    waiting = None
    for i in range(3):
        (w,) = h.booted(i + 1)[-1:]
        if i == 2:
            waiting = h.submit(square, 1)  # seen in the same round as the exit, after it
        w.proc.exit(ExitStatus(code=3))  # a worker that was ready dies: a crash, charged
        h.until(lambda n=i: h.runner.shared.counters["workers_lost"] == n + 1, "the exit")
    broken = h.runner.shared.broken
    assert isinstance(broken, PoolBroken)
    assert "more than 2 times within 60s" in str(broken) and len(broken.history) == 3
    assert waiting is not None and isinstance(waiting.exception(timeout=0), PoolBroken)
    h.until(lambda: h.manager.done, "the close")
    assert len(h.world) == 3  # no start after it broke


def test_workers_that_die_while_starting_are_backed_off(make: Callable[..., Harness]) -> None:
    h = make()
    h.until(lambda: len(h.world) == 1, "a start")
    h.world[0].proc.exit(ExitStatus(code=1))
    h.until(lambda: h.runner.shared.counters["boot_failures"] == 1, "the failure")
    assert len(h.world) == 1  # backed off: Backoff(initial=0.5)
    h.advance(0.6)
    h.until(lambda: len(h.world) == 2, "the next start after the backoff")
    # The same failure twice in a row: the pool breaks at once.
    h.world[1].proc.exit(ExitStatus(code=1))
    h.until(lambda: h.runner.shared.broken is not None, "the break")
    assert "two new workers in a row died while starting" in str(h.runner.shared.broken)


def test_a_start_that_fails_twice_the_same_way_breaks_the_pool(
        make: Callable[..., Harness]) -> None:
    h = make(fail=pickle.PicklingError("initargs cannot be pickled"))
    h.until(lambda: h.world.failed == 1, "a failed start")
    assert h.runner.shared.broken is None  # once may pass
    h.advance(1.0)  # the backoff
    h.until(lambda: h.runner.shared.broken is not None, "the break")
    broken = h.runner.shared.broken
    assert "a worker could not be started (PicklingError" in str(broken)
    assert isinstance(broken.__cause__, pickle.PicklingError)
    assert h.world.failed == 2 and len(h.world) == 0


def test_a_close_gives_up_a_start_that_never_returns(make: Callable[..., Harness]) -> None:
    # A start stuck with the spawner thread (a stopped forkserver) held the close for ever:
    # it waits stop_timeout plus START_OVERTIME for it, then gives it up; a process that
    # comes after that is killed on arrival.
    h = make(stop_timeout=2.0)
    (w,) = h.booted(1)
    h.world.hold = threading.Event()
    w.proc.exit(ExitStatus(signal=signal.SIGKILL))
    h.until(h.world.held.is_set, "the replacement's start, held up")
    h.runner.request_shutdown(cancel_futures=False)
    h.step()
    h.advance(2.1)  # stop_timeout: the start gets its overtime
    assert not h.manager.done
    h.advance(0.8)
    assert not h.manager.done
    h.advance(0.3)  # START_OVERTIME (1 s) past stop_timeout
    h.until(lambda: h.manager.done, "the close", timeout=5)
    assert h.manager.abandoned == 1
    h.world.hold.set()  # the server goes on: the late process is killed as it arrives
    h.until(lambda: len(h.world) == 2 and h.world[1].proc.closed, "the late one killed")
    assert signal.SIGKILL in h.world[1].proc.signals


def test_tasks_kept_for_starts_that_never_return_are_cancelled(
        make: Callable[..., Harness]) -> None:
    # shutdown(cancel_futures=True) keeps the next task for a worker still starting (it counts
    # as running); with that start stuck (a stopped forkserver) the task waited for ever and
    # the close never began. Now it is cancelled stop_timeout + 1 s later, and the close
    # keeps its own deadline.
    h = make(stop_timeout=2.0)
    (w,) = h.booted(1)
    h.world.hold = threading.Event()
    w.proc.exit(ExitStatus(signal=signal.SIGKILL))
    h.until(h.world.held.is_set, "the replacement's start, held up")
    futures = [h.submit(square, i) for i in range(3)]
    h.step()
    h.runner.request_shutdown(cancel_futures=True)
    h.step()
    assert futures[0].running() and all(f.cancelled() for f in futures[1:])
    h.advance(2.5)
    assert futures[0].running()  # not before stop_timeout + 1 s
    h.advance(0.6)
    h.until(lambda: futures[0].cancelled(), "the kept task cancelled", timeout=5)
    h.advance(2.1)  # the close's stop_timeout: the start gets its overtime
    h.advance(1.1)
    h.until(lambda: h.manager.done, "the close", timeout=5)
    assert h.manager.abandoned == 1
    h.world.hold.set()
