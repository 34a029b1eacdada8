"""Room for file descriptors: raise our soft RLIMIT_NOFILE when a pool needs it, explain EMFILE.

The supervisor holds about three fds per worker (a pidfd and multiprocessing's two pipe ends
under fork, its sentinel otherwise; a ProcessPool worker also a socket and an open /proc
statm), so a pool of a few hundred workers outgrows the common soft limit of 1024 long before
the hard limit.
"""

from __future__ import annotations

import errno
import logging
import os
import resource

__all__ = ["FDS_PER_WORKER", "ensure_fd_room", "explain_fd_error"]

log = logging.getLogger("corral.supervisor")

FDS_PER_WORKER = 3
_MARGIN = 64  # for the pool's own fds and the program's


def _open_fds() -> int | None:
    """How many fds this process has open; None if that cannot be read (it takes one fd)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def ensure_fd_room(workers: int, per_worker: int = FDS_PER_WORKER) -> None:
    """Raise the soft RLIMIT_NOFILE toward the hard limit if ``workers`` more need it.

    Never lowers a limit and never fails: if the hard limit is too low it says so in the log,
    and a start that then hits EMFILE reports the limit (see :func:`explain_fd_error`).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return
    need = (_open_fds() or soft) + workers * per_worker + _MARGIN
    if need <= soft:
        return
    target = need * 2 if hard == resource.RLIM_INFINITY else min(hard, need * 2)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("raised this process's soft RLIMIT_NOFILE from %d to %d for %d more "
                     "workers", soft, target, workers)
            soft = target
        except (OSError, ValueError) as exc:
            log.warning("could not raise RLIMIT_NOFILE from %d to %d: %s", soft, target, exc)
    if need > soft:
        log.warning("%d more workers need about %d file descriptors, over the hard limit "
                    "RLIMIT_NOFILE=%d: starts may fail with 'Too many open files'. Raise the "
                    "hard limit (ulimit -Hn, or LimitNOFILE= in a systemd unit).", workers, need,
                    hard)


def explain_fd_error(exc: BaseException) -> str:
    """The text of ``exc``, with the fd limit that was hit when it is EMFILE/ENFILE, and the
    limits on processes that may have been when it is EAGAIN (a fork or a thread refused)."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        which = ("this process's RLIMIT_NOFILE" if exc.errno == errno.EMFILE
                 else "the system-wide file table (fs.file-max)")
        open_now = _open_fds()
        count = "every fd in use" if open_now is None else f"{open_now} fds open"
        text += (f" ({which} is exhausted: {count}, soft limit {soft}, hard limit {hard}; "
                 "raise the hard limit with ulimit -Hn or LimitNOFILE=)")
    elif isinstance(exc, OSError) and exc.errno == errno.EAGAIN:
        soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
        limit = "unlimited" if soft == resource.RLIM_INFINITY else str(soft)
        text += (" (no new process or thread could be made: a limit on processes is reached, "
                 f"RLIMIT_NPROC (soft {limit}) or the pids limit of this cgroup "
                 "(pids.max; TasksMax= under systemd), or the system's kernel.pid_max)")
    return text
