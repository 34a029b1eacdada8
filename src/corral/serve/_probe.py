"""``corral serve --http``: the server's own /readyz and /livez, and the endpoint's upkeep.

The server lives on its loop thread; the endpoint answers on a thread of its own. The loop
publishes a :class:`ServerState` (immutable) after each round, and the endpoint reads the
latest one (one attribute read) and judges it with :func:`verdict`, a pure function. /livez
and /status ask the loop itself (:func:`ask`), bounded by the endpoint's timeout.

::

    loop thread:  advance() / stop() -> ServerProbe.publish(ServerState(...))
    endpoint:     GET /readyz -> verdict(probe.state, now)   (no round trip to the loop)
                  GET /livez  -> ask(reactor, no-op, timeout) (does the loop answer?)
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from corral._reactor import Reactor

__all__ = ["ServerProbe", "ServerState", "ask", "verdict"]

log = logging.getLogger("corral.serve")

T = TypeVar("T")


@dataclass(frozen=True)
class ServerState:
    """What /readyz needs of a ``corral serve``, as its loop saw it at the end of a round.

    Attributes:
        name: the program's name.
        phase: "starting" (READY=1 not sent yet), "serving" or "stopping".
        ready: workers accepting, across generations (RUNNING and ready, not draining).
        needed: ``min_ready`` (default: workers).
        workers: N.
        generation: the generation serving (None: none yet).
        reloading_to: the generation a reload under way starts (None: no reload).
        alive: worker processes alive or being started, across generations.
        why: what stops the server ("SIGTERM", ...), while stopping.
        shutdown_delay: seconds of ``shutdown_delay``.
        drain_at: ``time.monotonic()`` at which the drain begins (None: no delay, or begun).
    """

    name: str
    phase: str
    ready: int
    needed: int
    workers: int
    generation: int | None = None
    reloading_to: int | None = None
    alive: int = 0
    why: str = ""
    shutdown_delay: float = 0.0
    drain_at: float | None = None


def verdict(state: ServerState, now: float) -> tuple[bool, str]:
    """The server's /readyz: ready, and a one-line reason naming it (pure).

    Ready while serving with at least ``needed`` workers accepting; not ready while starting,
    short of workers, and from the moment a stop begins (through ``shutdown_delay``, while the
    workers still accept, and the drain).
    """
    who = f"server {state.name!r}"
    counted = f"{state.ready}/{state.workers} workers ready, needs {state.needed}"
    if state.phase == "stopping":
        head = f"{who}: shutting down ({state.why})" if state.why else f"{who}: shutting down"
        if state.drain_at is not None and now < state.drain_at:
            return False, (f"{head}: shutdown_delay {state.shutdown_delay:g}s, "
                           f"{state.drain_at - now:.1f}s left before the drain; "
                           f"{state.ready} workers still accepting")
        return False, f"{head}: draining, {state.alive} worker process(es) left"
    if state.phase == "starting":
        if state.generation is None and state.ready == 0:
            return False, f"{who}: starting: importing the app; {counted}"
        return False, f"{who}: starting: {counted}"
    where = f"generation {state.generation}" if state.generation is not None else "no generation"
    if state.reloading_to is not None:
        where += f", reloading to generation {state.reloading_to}"
    if state.ready >= state.needed:
        return True, f"{who}: serving: {counted} ({where})"
    return False, f"{who}: too few workers ready: {counted} ({where})"


def ask(reactor: Reactor[Any], fn: Callable[[], T], timeout: float) -> T:
    """``fn()`` run on ``reactor``'s thread; its result, or its exception re-raised.

    Raises:
        TimeoutError: the loop did not run it within ``timeout`` seconds (wedged, or no
            longer driven), or the loop is closed.
    """
    done = threading.Event()
    box: list[Any] = []

    def run() -> None:
        try:
            box.append((True, fn()))
        except BaseException as exc:  # handed to the asking thread
            box.append((False, exc))
        finally:
            done.set()

    try:
        reactor.call_soon_threadsafe(run)
    except RuntimeError:
        raise TimeoutError("the server's loop is closed") from None
    if not done.wait(timeout):
        raise TimeoutError(f"the server's loop did not answer within {timeout:g}s")
    ok, value = box[0]
    if not ok:
        raise value
    result: T = value
    return result


class ServerProbe:
    """The endpoint of one ``corral serve``: started with the server, closed after its
    listeners; generations' pools are added as they start and removed as they are retired.

    Args:
        address: ``--http``.
        reactor: the server's loop (for /livez and /status).
        state: the first :class:`ServerState`.
        status: ``status() -> dict`` (run on the loop thread, via :func:`ask`).
    """

    def __init__(self, address: str, reactor: Reactor[Any], state: ServerState,
                 status: Callable[[], dict[str, Any]]) -> None:
        from corral.endpoint import Endpoint

        self.state = state
        self._reactor = reactor
        self._status = status
        self._served: set[str] = set()
        self.endpoint = Endpoint(address, readiness=self.readiness, liveness=self.liveness,
                                 status=self.status)

    def start(self) -> ServerProbe:
        """Raises:
            OSError: the address cannot be bound.
        """
        self.endpoint.start()
        return self

    def publish(self, state: ServerState) -> None:
        """The loop thread: the state /readyz reads from now on (one reference assignment)."""
        self.state = state

    def add(self, sup: Any) -> None:
        """The loop thread: a generation's pool started."""
        name = sup.spec.name
        if name not in self._served:
            self.endpoint.add(sup)
            self._served.add(name)

    def remove(self, name: str) -> None:
        """The loop thread: a generation retired (its series leave /metrics with it)."""
        if name in self._served:
            self._served.discard(name)
            with contextlib.suppress(KeyError):
                self.endpoint.remove(name)

    def close(self) -> None:
        self.endpoint.close()

    # --------------------------------------------------------------- the endpoint's thread

    def readiness(self) -> tuple[bool, str]:
        return verdict(self.state, time.monotonic())

    def liveness(self, timeout: float) -> tuple[bool, str]:
        who = f"server {self.state.name!r}"
        try:
            ask(self._reactor, lambda: None, timeout)
        except TimeoutError as exc:
            return False, f"{who}: {exc} (wedged or stopped)"
        return True, f"{who}: its loop answers"

    def status(self) -> dict[str, Any]:
        return ask(self._reactor, self._status, self.endpoint.timeout)
