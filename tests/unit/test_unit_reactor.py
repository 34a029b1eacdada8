"""The reactor: fds, merged wake-ups, the inbox, typed deadlines, batches and priorities."""

from __future__ import annotations

import enum
import os
import threading

import pytest

from corral._loop import WriterLoop
from corral._reactor import Reactor
from support import wait_for


class Kind(enum.Enum):
    A = "a"
    B = "b"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def reactor() -> Reactor[tuple[int, Kind]]:
    r: Reactor[tuple[int, Kind]] = Reactor("test")
    yield r  # type: ignore[misc]
    r.close()


def test_is_a_writer_loop(reactor: Reactor[tuple[int, Kind]]) -> None:
    assert isinstance(reactor, WriterLoop)


def test_reader_callback_runs_when_readable(reactor: Reactor[tuple[int, Kind]]) -> None:
    r, w = os.pipe()
    seen: list[bytes] = []
    reactor.add_reader(r, lambda: seen.append(os.read(r, 10)))
    os.write(w, b"hi")
    reactor.run_once()
    assert seen == [b"hi"]
    reactor.remove_reader(r)
    os.write(w, b"again")
    assert reactor.get_events(0) == []
    os.close(r)
    os.close(w)


def test_run_reader_runs_it_now_and_the_poll_may_run_it_again(
        reactor: Reactor[tuple[int, Kind]]) -> None:
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    r, w = os.pipe()
    seen: list[int] = []

    def reader() -> None:
        try:
            seen.append(os.eventfd_read(fd))
        except BlockingIOError:
            seen.append(0)  # already taken: nothing to do

    def trigger() -> None:  # a callback that makes the eventfd readable in this round
        os.read(r, 1)
        os.eventfd_write(fd, 1)
        reactor.call_soon(reactor.run_reader, fd)

    reactor.run_reader(fd)  # no reader yet: nothing
    reactor.add_reader(fd, reader)
    reactor.add_reader(r, trigger)
    os.write(w, b"x")
    reactor.run_once()
    assert seen == [1]  # in the same round, not after one more poll
    assert reactor.get_events(0) == []  # it took the value: the poll has nothing more
    reactor.remove_reader(fd)
    reactor.remove_reader(r)
    reactor.run_reader(fd)
    assert seen == [1]
    for x in (fd, r, w):
        os.close(x)


def test_lower_priority_runs_first_in_a_batch(reactor: Reactor[tuple[int, Kind]]) -> None:
    (r1, w1), (r2, w2) = os.pipe(), os.pipe()
    order: list[str] = []
    reactor.add_reader(r1, lambda: order.append("exit") or os.read(r1, 10), priority=1)
    reactor.add_reader(r2, lambda: order.append("reply") or os.read(r2, 10), priority=0)
    os.write(w1, b"x")
    os.write(w2, b"x")
    batch = reactor.get_events(1)
    assert len(batch) == 2
    reactor.process_events(batch)
    assert order == ["reply", "exit"]
    for fd in (r1, w1, r2, w2):
        os.close(fd)


def test_inbox_from_other_threads_and_merged_wakeups(reactor: Reactor[tuple[int, Kind]]) -> None:
    got: list[int] = []
    threads = [threading.Thread(target=reactor.call_soon_threadsafe, args=(got.append, i))
               for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Fifty hand-overs, at most one byte in the pipe.
    assert len(os.read(reactor._wake_r, 100)) == 1
    reactor._wake_pending = False
    reactor.process_events([])
    assert sorted(got) == list(range(50))


def test_wake_interrupts_a_wait(reactor: Reactor[tuple[int, Kind]]) -> None:
    timer = threading.Timer(0.05, reactor.wake)
    timer.start()
    batch = reactor.get_events(30)  # returns well before 30 s
    timer.join()
    assert [fd for fd, _ in batch] == [reactor._wake_r]


def test_keyed_deadlines_replace_and_fire_in_order() -> None:
    clock = FakeClock()
    fired: list[tuple[tuple[int, Kind], float]] = []
    r: Reactor[tuple[int, Kind]] = Reactor("t", on_deadline=lambda k, now: fired.append((k, now)),
                                           clock=clock)
    try:
        r.set_deadline((1, Kind.A), 1005.0)
        r.set_deadline((2, Kind.B), 1002.0)
        r.set_deadline((1, Kind.A), 1001.0)  # replaces 1005
        assert r.timeout() == pytest.approx(1.0)
        clock.now = 1003.0
        r.run_due(clock.now)
        assert [k for k, _ in fired] == [(1, Kind.A), (2, Kind.B)]
        assert r.timeout() is None
        r.set_deadline((3, Kind.A), 1010.0)
        r.cancel_deadline((3, Kind.A))
        clock.now = 2000.0
        r.run_due(clock.now)
        assert len(fired) == 2
    finally:
        r.close()


def test_timers_and_the_extra_deadline() -> None:
    clock = FakeClock()
    r: Reactor[tuple[int, Kind]] = Reactor("t", clock=clock)
    try:
        calls: list[str] = []
        t1 = r.call_later(5, calls.append, "five")
        r.call_at(1002.0, calls.append, "two")
        assert r.timeout(extra=1001.0) == pytest.approx(1.0)
        t1.cancel()
        clock.now = 1010.0
        r.run_due(clock.now)
        assert calls == ["two"]
    finally:
        r.close()


def test_far_deadlines_do_not_overflow(reactor: Reactor[tuple[int, Kind]]) -> None:
    reactor.set_deadline((1, Kind.A), 1e300)
    timeout = reactor.timeout()
    assert timeout is not None and timeout <= 86400
    assert reactor.get_events(0) == []


def test_closed_refuses_hand_overs_and_frees_its_fds() -> None:
    before = len(os.listdir("/proc/self/fd"))
    r: Reactor[tuple[int, Kind]] = Reactor("t")
    r.close()
    r.close()
    assert len(os.listdir("/proc/self/fd")) == before
    with pytest.raises(RuntimeError, match="closed"):
        r.call_soon_threadsafe(print)


def test_writer_callbacks(reactor: Reactor[tuple[int, Kind]]) -> None:
    r, w = os.pipe()
    wrote: list[int] = []
    reactor.add_writer(w, lambda: wrote.append(os.write(w, b"x")))
    reactor.run_once()
    assert wrote == [1]
    reactor.remove_writer(w)
    assert not reactor.watching(w)
    os.close(r)
    os.close(w)


@pytest.mark.timeout(20)
def test_a_signal_handler_may_hand_over_inside_a_hand_over(
        reactor: Reactor[tuple[int, Kind]]) -> None:
    """A Python signal handler runs in the main thread between two bytecodes, possibly inside
    call_soon_threadsafe's locked section on that same thread. If it hands work over too, it
    must not deadlock on the reactor's lock (it did: `corral run` hung on SIGTERM)."""
    import collections
    import signal

    ran: list[str] = []

    def handler(signum: int, frame: object) -> None:
        reactor.call_soon_threadsafe(ran.append, "from the handler")

    class SignalOnAppend(collections.deque):  # type: ignore[type-arg]
        armed = True

        def append(self, item: object) -> None:
            super().append(item)
            if self.armed:  # a real signal, delivered while the lock is held
                self.armed = False
                signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        reactor._inbox = SignalOnAppend()  # type: ignore[assignment]
        reactor.call_soon_threadsafe(ran.append, "outer")
    finally:
        signal.signal(signal.SIGUSR1, previous)
    while len(ran) < 2:
        reactor.run_once()
    assert sorted(ran) == ["from the handler", "outer"]


def test_busy_for_is_zero_in_epoll_and_grows_in_a_callback() -> None:
    r: Reactor[object] = Reactor("busy")
    inside, release = threading.Event(), threading.Event()
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            r.run_once()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        r.call_soon_threadsafe(lambda: (inside.set(), release.wait(10)))
        assert inside.wait(10)
        first = r.busy_for()
        assert first > 0.0
        assert wait_for_growth(r, first)
        release.set()
        wait_for(lambda: r.busy_for() == 0.0, 10, "back in epoll: 0.0")
    finally:
        release.set()
        stop.set()
        r.call_soon_threadsafe(lambda: None)
        thread.join(10)
        r.close()
    assert not thread.is_alive()


def wait_for_growth(r: Reactor[object], first: float) -> bool:
    return bool(wait_for(lambda: r.busy_for() > first, 10, "busy_for grows"))


def test_timeout_skips_cancelled_deadlines() -> None:
    """A cancelled timer left on top of the heap must not wake the loop early."""
    clock = FakeClock()
    r: Reactor[object] = Reactor("cancelled", clock=clock)
    try:
        early = r.call_later(5.0, lambda: None)
        r.call_later(100.0, lambda: None)
        early.cancel()
        assert r.timeout() == pytest.approx(100.0)
    finally:
        r.close()


@pytest.mark.timeout(30)
def test_close_does_not_wait_for_a_thread_held_up_inside_a_hand_over() -> None:
    # A SIGTERM handler that calls Supervisor.stop() runs on the main thread between two
    # bytecodes, maybe inside call_soon_threadsafe's locked section, and waits there for the
    # monitor's end, whose last act is close(): close() waited for that lock for ever. The
    # handler is played by an inbox whose append blocks until close() has returned.
    r = Reactor("t")
    pipe = (r._wake_r, r._wake_w)
    inside = threading.Event()
    closed = threading.Event()

    class HeldUp(list[object]):
        def append(self, item: object) -> None:
            inside.set()
            assert closed.wait(20), "close() never returned"
            # The handler hands over once more, nested: refused, and it must leave the pipe
            # to the outer section (which is still inside, and would write to it).
            with pytest.raises(RuntimeError, match="closed"):
                r.call_soon_threadsafe(print)
            assert r._wake_w >= 0
            super().append(item)

    r._inbox = HeldUp()  # type: ignore[assignment]
    outcome: list[BaseException] = []

    def hand_over() -> None:
        try:
            r.call_soon_threadsafe(print)
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=hand_over)
    t.start()
    assert inside.wait(10)
    r.close()  # returns (after its short wait for the lock) while the section is still held
    closed.set()
    t.join(10)
    assert not t.is_alive()
    # The hand-over was refused (its caller answers itself), and the thread that held the
    # section closed the wake pipe as it left.
    assert len(outcome) == 1 and isinstance(outcome[0], RuntimeError), outcome
    assert r._wake_r == -1 and r._wake_w == -1 and pipe[0] >= 0
    with pytest.raises(RuntimeError, match="closed"):
        r.call_soon_threadsafe(print)
