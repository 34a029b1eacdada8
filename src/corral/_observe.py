"""What the HTTP endpoint and the metrics collector read of a pool, without prometheus_client.

- :class:`PoolView`: one pool at one moment (a :class:`PoolSummary`, counters, readiness rule,
  and every worker's status when asked for).
- :class:`PoolSource`: what the endpoint asks of a pool (``observe``, ``ping``). A
  :class:`corral.Supervisor` is adapted by :class:`SupervisorSource`; the CLI may pass its own.
- :func:`readiness`: the /readyz rule, pure.
- :class:`RssCache`: RSS of worker pids from ``/proc/<pid>/statm``, re-read at most every
  ``interval`` seconds (a scrape every second must cost next to nothing).
- :class:`Sources`: the pools an endpoint serves (several for the CLI).
- :func:`parse_address`: ``"127.0.0.1:9100"`` -> ``("127.0.0.1", 9100)``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from corral._stats import StatsSnapshot
from corral._taskstats import PoolTaskStats
from corral.states import WorkerState
from corral.status import WorkerStatus

if TYPE_CHECKING:
    from corral.supervisor import Supervisor

__all__ = ["PoolFacts", "PoolSource", "PoolSummary", "PoolView", "RssCache", "Sources",
           "SupervisorSource", "is_ready", "parse_address", "readiness", "ready_workers",
           "wanted_workers"]

_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class PoolSummary:
    """Pool-wide figures, computed on the pool's loop in one pass (cheap for any size).

    Attributes:
        counts: workers by state value ("running": 4, ...; every state present).
        ready: workers RUNNING and ready.
        wanted: workers meant to run (all but EXITED and STOPPED ones).
        pids: (index, pid) of every live worker process.
        youngest: uptime of the youngest live process, seconds (None: none).
        oldest_beat_age: seconds since the oldest last heartbeat of a live worker (None: no
            live worker has beaten yet).
        budget_remaining: restarts the budget still allows now (None: no limit).
        stopping: the pool is stopping.
    """

    counts: dict[str, int]
    ready: int
    wanted: int
    pids: tuple[tuple[int, int], ...]
    youngest: float | None
    oldest_beat_age: float | None
    budget_remaining: int | None
    stopping: bool = False

    @classmethod
    def of(cls, workers: Iterable[WorkerStatus], budget_remaining: int | None = None,
           stopping: bool = False) -> PoolSummary:
        """The same figures from statuses (a finished pool, or a source with statuses only)."""
        workers = tuple(workers)
        counts = dict.fromkeys((s.value for s in WorkerState), 0)
        for w in workers:
            counts[w.state.value] += 1
        live = [w for w in workers if w.pid is not None and w.state.alive]
        ages = [w.heartbeat_age for w in live if w.heartbeat_age is not None]
        return cls(counts=counts, ready=ready_workers(workers),
                   wanted=wanted_workers(workers),
                   pids=tuple((w.index, w.pid) for w in live if w.pid is not None),
                   youngest=min((w.uptime for w in live), default=None),
                   oldest_beat_age=max(ages, default=None),
                   budget_remaining=budget_remaining, stopping=stopping)


@dataclass(frozen=True)
class PoolFacts:
    """What a pool's loop publishes at the end of each round that changed it, so that a scrape
    or a probe reads the pool without a round trip to the loop (the ages, which move with the
    clock alone, are computed at read time: :meth:`corral._monitor.Monitor.observed`).

    Attributes:
        version: the loop's change counter when these were taken (a reader that sees another
            value now knows a round is changing the pool: it asks the loop instead).
        counts, ready, wanted, stopping: as in :class:`PoolSummary`.
        live: (index, pid, started: the loop's clock) of every live worker process.
        pids: (index, pid) of the same (the same tuple in every summary made from these
            facts: a reader may cache what it derives from it).
        budget_times: the loop's clock at each restart counted in the budget's window.
        indexes: the index of each live worker (ascending), and ``newest_start``: the
            latest start among them (-inf: none), so that a reader computes the ages with a
            few C calls instead of a loop over the workers.
    """

    version: int
    counts: dict[str, int]
    ready: int
    wanted: int
    live: tuple[tuple[int, int, float], ...]
    pids: tuple[tuple[int, int], ...]
    stopping: bool
    budget_times: tuple[float, ...]
    indexes: tuple[int, ...] = ()
    newest_start: float = -float("inf")


@dataclass(frozen=True)
class PoolView:
    """One pool as the endpoint sees it at one moment.

    Attributes:
        name: the pool (the ``pool`` label).
        kind: "target" (Python workers) or "command" (the CLI's command programs).
        state: "new" (not started), "running", "stopping", "stopped" or "gave up".
        summary: pool-wide figures; None if the pool's loop did not answer in time.
        workers: every worker's status when asked for (``detail``), else None.
        stats: restart and exit counters (None: the pool keeps none).
        min_ready: workers that must be RUNNING and ready for /readyz (None: every worker
            meant to run).
        started_at: ``time.time()`` the pool started, or None.
        timeout: the seconds the loop was given to answer (for messages).
    """

    name: str
    kind: str
    state: str
    summary: PoolSummary | None
    workers: tuple[WorkerStatus, ...] | None = None
    stats: StatsSnapshot | None = None
    min_ready: int | None = None
    started_at: float | None = None
    timeout: float = 0.0

    @property
    def responsive(self) -> bool:
        return self.summary is not None


@runtime_checkable
class PoolSource(Protocol):
    """A pool the endpoint can serve. Both methods are called on the endpoint's thread and
    must return within about ``timeout`` seconds (never block without bound).

    ``observe(timeout, detail)``: with ``detail``, :attr:`PoolView.workers` is filled too.
    """

    @property
    def name(self) -> str: ...

    def observe(self, timeout: float, detail: bool = False) -> PoolView: ...

    def ping(self, timeout: float) -> bool: ...


class SupervisorSource:
    """A :class:`corral.Supervisor` as a :class:`PoolSource`.

    Args:
        sup: the pool.
        kind: what /status calls it: "target" (Python workers) or "command" (the ``corral``
            command's command programs).
    """

    def __init__(self, sup: Supervisor, kind: str = "target") -> None:
        self.sup = sup
        self.kind = kind

    @property
    def name(self) -> str:
        return self.sup.spec.name

    def ping(self, timeout: float) -> bool:
        return self.sup.ping(timeout)

    def glance(self, timeout: float) -> tuple[Any, float | None, float | None] | None:
        """``(stamp, youngest, oldest_beat_age)``, or None where only :meth:`observe` can tell
        (not started, finished, a round changing the pool, a wedged loop).

        ``stamp`` is equal for two glances exactly when everything :meth:`observe` reports
        but the ages is (the published facts and counters by identity, min_ready, the
        budget left): a metrics scrape reuses what it made of the last one.
        """
        sup = self.sup
        monitor = sup._monitor
        if monitor is None:
            return None
        try:
            got = monitor.glance(timeout)
        except TimeoutError:
            return None
        if got is None:
            return None
        facts, youngest, oldest, budget = got
        return (facts, monitor.stats.snapshot(), sup.min_ready, budget), youngest, oldest

    def observe(self, timeout: float, detail: bool = False) -> PoolView:
        sup = self.sup
        monitor = sup._monitor
        if monitor is not None and not detail:
            # What the loop published, if it is current: no round trip (the loop sleeps on).
            # (observed() is None once the pool has finished: the ways below.)
            try:
                summary = monitor.observed(timeout)
            except TimeoutError:  # wedged: reported unresponsive (summary None)
                return PoolView(sup.spec.name, self.kind, "running", None, None,
                                monitor.stats.snapshot(), sup.min_ready, sup._started_at,
                                timeout)
            if summary is not None:
                return PoolView(sup.spec.name, self.kind,
                                "stopping" if summary.stopping else "running", summary, None,
                                monitor.stats.snapshot(), sup.min_ready, sup._started_at,
                                timeout)
        common: dict[str, Any] = dict(name=sup.spec.name, kind=self.kind,
                                      min_ready=sup.min_ready, started_at=sup._started_at,
                                      timeout=timeout)
        if monitor is None:
            return PoolView(state="new", summary=PoolSummary.of(()), workers=(), **common)
        stats = monitor.stats.snapshot()
        if not monitor.finished.is_set():
            try:
                summary, workers = monitor.call(monitor.do_observe, detail, timeout=timeout)
            except TimeoutError:
                return PoolView(state="running", summary=None, stats=stats, **common)
            except RuntimeError:
                pass  # it finished meanwhile: its last view, below
            else:
                return PoolView(state="stopping" if summary.stopping else "running",
                                summary=summary, workers=workers, stats=stats, **common)
        workers = sup.status()  # the view kept when it finished (answered at once)
        return PoolView(state="gave up" if monitor.gave_up else "stopped",
                        summary=PoolSummary.of(workers), workers=workers if detail else None,
                        stats=stats, **common)


class Sources:
    """The pools (and ProcessPool task counters) an endpoint or collector serves; thread-safe.

    :meth:`add` takes a :class:`corral.Supervisor`, any :class:`PoolSource`, a
    ``PoolTaskStats``, or an object that carries one as ``task_stats`` (a ProcessPool).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pools: dict[str, PoolSource] = {}
        self._tasks: dict[str, PoolTaskStats] = {}

    def add(self, obj: Any) -> None:
        """Raises:
            TypeError: ``obj`` is none of those.
            ValueError: a pool of the same name (and sort) is served already.
        """
        from corral.supervisor import Supervisor

        if isinstance(obj, Supervisor):
            obj = SupervisorSource(obj)
        stats = obj if isinstance(obj, PoolTaskStats) else getattr(obj, "task_stats", None)
        with self._lock:
            if isinstance(stats, PoolTaskStats):
                if stats.pool in self._tasks:
                    raise ValueError(f"task stats of pool {stats.pool!r} are served already")
                self._tasks[stats.pool] = stats
                return
            if not isinstance(obj, PoolSource):
                raise TypeError(
                    "expected a corral.Supervisor, a ProcessPool (with task_stats), a "
                    f"PoolTaskStats or a PoolSource (name, observe, ping), got {obj!r}")
            if obj.name in self._pools:
                raise ValueError(f"a pool named {obj.name!r} is served already; give each "
                                 "pool its own name (PoolSpec name=...)")
            self._pools[obj.name] = obj

    def remove(self, name: str) -> None:
        """Raises:
            KeyError: nothing called ``name`` is served.
        """
        with self._lock:
            found = self._pools.pop(name, None) is not None
            found = self._tasks.pop(name, None) is not None or found
        if not found:
            raise KeyError(f"no pool named {name!r} is served")

    def pools(self) -> list[PoolSource]:
        with self._lock:
            return list(self._pools.values())

    def pool(self, name: str) -> PoolSource | None:
        with self._lock:
            return self._pools.get(name)

    def has_tasks(self) -> bool:
        return bool(self._tasks)  # one read of a dict's size: no lock needed

    def tasks(self) -> list[PoolTaskStats]:
        with self._lock:
            return list(self._tasks.values())


def wanted_workers(workers: Iterable[WorkerStatus]) -> int:
    """Workers meant to run: every worker but those finished for good (EXITED, STOPPED)."""
    return sum(1 for w in workers if not w.state.final)


def ready_workers(workers: Iterable[WorkerStatus]) -> int:
    return sum(1 for w in workers if w.state is WorkerState.RUNNING and w.ready)


def is_ready(view: PoolView) -> bool:
    """The /readyz verdict alone (what :func:`readiness` decides, without its text)."""
    summary = view.summary
    if view.state != "running" or summary is None:
        return False
    return summary.ready >= (summary.wanted if view.min_ready is None else view.min_ready)


def readiness(view: PoolView) -> tuple[bool, str]:
    """The /readyz verdict for one pool, and a one-line reason that names the pool."""
    who = f"pool {view.name!r}"
    if view.state == "new":
        return False, f"{who}: not started"
    if view.state in ("stopping", "stopped"):
        return False, f"{who}: {view.state}"
    if view.state == "gave up":
        return False, f"{who}: gave up (restart budget used up)"
    summary = view.summary
    if summary is None:
        return False, f"{who}: its loop did not answer within {view.timeout:g}s"
    needed = summary.wanted if view.min_ready is None else view.min_ready
    total = sum(summary.counts.values())
    text = f"{who}: {summary.ready}/{total} workers ready, needs {needed}"
    if summary.ready >= needed:
        return True, text
    if view.workers is not None:
        waiting = [f"{w.name} {w.state.value}" for w in view.workers
                   if not (w.state is WorkerState.RUNNING and w.ready) and not w.state.final]
    else:
        waiting = [f"{n} {state}" for state, n in summary.counts.items()
                   if n and state not in ("running", "exited", "stopped")]
    if waiting:
        shown = ", ".join(waiting[:5]) + (f" and {len(waiting) - 5} more" if len(waiting) > 5
                                          else "")
        text += f"; not ready: {shown}"
    return False, text


class RssCache:
    """Resident set sizes of pids, each re-read at most every ``interval`` seconds.

    A pid seen for the first time is read at once. Reading is one open/read/close of
    ``/proc/<pid>/statm`` (about 5 us; psutil takes 6x that).
    """

    def __init__(self, interval: float = 10.0, clock: Any = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._values: dict[int, int] = {}
        self._taken = -float("inf")

    def due(self) -> bool:
        """The next :meth:`get` re-reads every pid."""
        return bool(self._clock() - self._taken >= self.interval)

    def get(self, pids: Iterable[int]) -> dict[int, int]:
        """``{pid: rss bytes}`` for those of ``pids`` that exist."""
        now = self._clock()
        fresh = now - self._taken >= self.interval
        if fresh:
            self._taken = now
        old = self._values
        out: dict[int, int] = {}
        for pid in pids:
            value = None if fresh else old.get(pid)
            if value is None:
                value = read_rss(pid)
                if value is None:
                    continue
            out[pid] = value
        self._values = out
        return out


def read_rss(pid: int) -> int | None:
    """The RSS of ``pid`` in bytes, or None if it is gone."""
    try:
        fd = os.open(f"/proc/{pid}/statm", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 256)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        return int(data.split()[1]) * _PAGE
    except (IndexError, ValueError):
        return None


def parse_address(text: Any, what: str = "http") -> tuple[str, int]:
    """``"HOST:PORT"``, ``"[IPv6]:PORT"`` or ``"PORT"`` (this machine only) -> (host, port).

    Port 0 asks the OS for a free port.

    Raises:
        TypeError: ``text`` is not a str.
        ValueError: not one of those forms, or a port outside 0..65535.
    """
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str like '127.0.0.1:9100', got {text!r} "
                        f"({type(text).__name__})")
    s = text.strip()
    host, port_text = "127.0.0.1", s
    if s.startswith("["):
        end = s.find("]")
        if end < 0 or s[end + 1:end + 2] != ":":
            raise ValueError(f"{what} must be '[IPv6]:PORT', got {text!r}")
        host, port_text = s[1:end], s[end + 2:]
    elif ":" in s:
        host, _, port_text = s.rpartition(":")
        if not host:
            raise ValueError(
                f"{what} needs a host, got {text!r}: '127.0.0.1{s}' serves this machine only, "
                f"'0.0.0.0{s}' every interface")
        if ":" in host:
            raise ValueError(f"{what}: write an IPv6 address in brackets, like '[::1]:9100', "
                             f"got {text!r}")
    if not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{what} must end with a port number 0..65535, got {text!r}")
    return host, int(port_text)
