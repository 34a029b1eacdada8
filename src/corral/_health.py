"""Health checks and memory readings, off the monitor thread.

A custom ``health_check(process, index)`` may block or hang, and reading the RSS of a worker and
its children through psutil takes a while: both run on threads of their own and hand their
results back to the monitor's reactor. Memory readings have a thread of their own, so hung
health checks can never starve memory recycling. The threads are daemons: a check that never
returns does not hold up the program's exit once its pool has stopped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from corral._daemonpool import DaemonExecutor

__all__ = ["HealthRunner", "measure_rss", "over_max_memory"]


class HealthRunner:
    """The executors of one pool (made on first use, shut down with the pool)."""

    def __init__(self, name: str, max_checks: Callable[[], int]) -> None:
        self._name = name
        self._max_checks = max_checks
        self._checks: DaemonExecutor | None = None
        self._memory: DaemonExecutor | None = None

    def check(self, fn: Callable[..., bool], *args: Any) -> Future[bool]:
        if self._checks is None:
            self._checks = DaemonExecutor(
                max_workers=max(2, min(64, self._max_checks())),
                thread_name_prefix=f"corral-check[{self._name}]")
        return self._checks.submit(fn, *args)

    def measure(self, targets: list[tuple[int, int, int]],
                ) -> Future[list[tuple[int, int, int]]]:
        if self._memory is None:
            self._memory = DaemonExecutor(
                max_workers=1, thread_name_prefix=f"corral-memory[{self._name}]")
        return self._memory.submit(measure_rss, targets)

    def shutdown(self) -> None:
        for executor in (self._checks, self._memory):
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)


def measure_rss(targets: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """RSS of each worker plus its children: ``(index, generation, pid)`` ->
    ``(index, generation, bytes)``; a worker that is gone is left out."""
    import psutil

    out = []
    for index, generation, pid in targets:
        try:
            proc = psutil.Process(pid)
            rss = proc.memory_info().rss
            for child in proc.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    rss += child.memory_info().rss
        except psutil.Error:
            continue
        out.append((index, generation, rss))
    return out


def over_max_memory(rss: int, limit: int) -> str:
    """Why a worker is recycled: ``"RSS 150.02 MiB > max_memory 150.0 MiB"``.

    One decimal, or as many as it takes (up to 6) for the RSS to read as more than the limit:
    a worker a few pages over 150 MiB must not read "150.0 MiB > 150.0 MiB".
    """
    digits = 1
    while digits < 6 and round(rss / 2**20, digits) <= round(limit / 2**20, digits):
        digits += 1
    return f"RSS {rss / 2**20:.{digits}f} MiB > max_memory {limit / 2**20:.{digits}f} MiB"
