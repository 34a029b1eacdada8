"""The death watch: a thread that learns of a worker's death from its death lock, before the
kernel has torn the process down (see :mod:`corral._robust`).

Each worker holds the robust mutex in its heartbeat slot. The watch waits on every slot's
mutex word at once (one ``futex_waitv``); the kernel sets "owner died" in a word and wakes the
watch as soon as the holder's exit begins. The watch tells its owner (index, pid) and keeps
nothing else: the owner checks that the process is really exiting, and the pidfd remains the
one authority on the exit itself. A notice lost to a race only means the pidfd tells first.

Idle, the thread sleeps in the kernel: no wake-up, no polling. It looks again when a worker
takes its lock (the worker wakes its own word), when a holder dies, and when poked (the table
grew, or the watch stops). The first ``WAITV_MAX - 1`` slots are watched; workers past them
are noticed by their pidfd only.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from corral import _robust
from corral.heartbeat import _LOCK_AT, _SLOT

__all__ = ["DeathWatch"]

log = logging.getLogger(__name__)


class DeathWatch:
    """Watch the death locks of the heartbeat table behind ``fd``.

    Args:
        fd: the table's fd (mapped again here: the owner may remap its own as it grows).
        name: for the thread's name, e.g. the pool's.
        on_death: called on the watch's thread with (slot index, pid of the lock's holder)
            when a holder's exit has begun. It must only hand the news over (it runs with
            the watch stopped).
    """

    def __init__(self, fd: int, name: str, on_death: Callable[[int, int], None]) -> None:
        self._fd = fd
        self._on_death = on_death
        self._stopping = False
        self._ctl = ctypes.c_uint32(0)  # the poke word (this process's memory)
        self._thread = threading.Thread(target=self._run, name=f"corral-deathwatch[{name}]",
                                        daemon=True)
        self._thread.start()

    def poke(self) -> None:
        """Make the watch look again (the table grew)."""
        self._ctl.value = (self._ctl.value + 1) & 0xFFFFFFFF
        _robust.futex_wake(ctypes.addressof(self._ctl))

    def close(self, timeout: float = 2.0) -> None:
        """Stop the watch and wait for its thread (from any thread but the watch's)."""
        self._stopping = True
        self.poke()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("%s did not stop within %.1fs", self._thread.name, timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            self._watch()
        except Exception:
            # Only the early notice is lost: every exit is still seen through its pidfd.
            log.exception("%s failed; deaths are noticed through pidfds only",
                          self._thread.name)

    def _watch(self) -> None:
        waiters = _robust.waiters(_robust.WAITV_MAX)
        ctl_at = ctypes.addressof(self._ctl)
        holders: dict[int, int] = {}  # slot -> pid of the holder armed for
        mapped: tuple[int, Any, int] | None = None  # (its address, its words, its size)
        try:
            while not self._stopping:
                ctl = self._ctl.value
                size = os.fstat(self._fd).st_size
                if mapped is None or mapped[2] != size:
                    mapped = _remap(mapped, self._fd, size)
                    holders.clear()
                    if mapped is None:  # an empty table: only a poke can change that
                        _robust.set_waiter(waiters, 0, ctl_at, ctl)
                        _robust.wait_any(waiters, 1)
                        continue
                base, words, _ = mapped
                _robust.set_waiter(waiters, 0, ctl_at, ctl)
                count = min(size // _SLOT, _robust.WAITV_MAX - 1)
                for i in range(count):
                    at = (i * _SLOT + _LOCK_AT) // 4
                    word = words[at]
                    owner = word & _robust.FUTEX_TID_MASK
                    if word & _robust.FUTEX_OWNER_DIED:
                        pid = holders.pop(i, 0)
                        if pid:
                            self._on_death(i, pid)
                    elif owner:
                        if not word & _robust.FUTEX_WAITERS:
                            _robust.add_waiters_bit(base + at * 4)
                            word = words[at]
                        if word & _robust.FUTEX_OWNER_DIED:  # before the bit: no wake-up
                            holders.pop(i, None)
                            self._on_death(i, owner)
                        else:
                            holders[i] = owner
                    else:
                        holders.pop(i, None)
                    # Woken when a holder dies, or when a new holder takes the lock.
                    _robust.set_waiter(waiters, i + 1, base + at * 4, word)
                _robust.wait_any(waiters, count + 1)
        finally:
            if mapped is not None:
                _remap(mapped, self._fd, 0)


def _remap(old: tuple[int, Any, int] | None, fd: int, size: int,
           ) -> tuple[int, Any, int] | None:
    """Drop ``old`` (if any) and map ``size`` bytes of the table (nothing if 0)."""
    if old is not None:
        _robust.unmap(old[0], old[2])
    if size == 0:
        return None
    address = _robust.map_shared(fd, size)
    return address, (ctypes.c_uint32 * (size // 4)).from_address(address), size
