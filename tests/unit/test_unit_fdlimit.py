"""The reasons given for a start refused by a limit (pure text, no processes)."""

from __future__ import annotations

import errno
import os

from corral._fdlimit import explain_fd_error


def test_emfile_names_the_fd_limit() -> None:
    text = explain_fd_error(OSError(errno.EMFILE, os.strerror(errno.EMFILE)))
    assert "RLIMIT_NOFILE is exhausted" in text and "hard limit" in text


def test_eagain_names_the_limits_on_processes() -> None:
    # A fork refused by a full pids cgroup was a bare "BlockingIOError: [Errno 11] Resource
    # temporarily unavailable", naming no limit.
    text = explain_fd_error(BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN)))
    assert text.startswith("BlockingIOError: [Errno 11]")
    assert "RLIMIT_NPROC" in text and "pids.max" in text


def test_other_errors_are_left_as_they_are() -> None:
    exc = PermissionError(errno.EACCES, "Permission denied")
    assert explain_fd_error(exc) == "PermissionError: [Errno 13] Permission denied"
