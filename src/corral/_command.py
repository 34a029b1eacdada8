"""Command workers: an exec'd program in its own process group, with the same guarantees.

A :class:`CommandProcess` is what the monitor holds for a worker that runs a command instead of
a Python target (``PoolSpec(command=[...])``): a pidfd for its exit, its own process group (the
stop signal and the final SIGKILL reach its children), the keeper (its group dies with the
supervisor, since an exec'd program cannot carry corral's parent-death watch), reaped by pid.

It is started with ``subprocess.Popen`` (``process_group=0``, ``close_fds``; CPython uses vfork
or posix_spawn when it can), never with a ``preexec_fn`` (unsafe in a process with threads).
"""

from __future__ import annotations

import contextlib
import errno
import grp
import multiprocessing.connection
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from corral._keeper import keeper
from corral.exitstatus import ExitStatus
from corral.process import GroupSignals, disown_fd, own_fd

__all__ = ["CommandProcess", "Launch", "missing_interpreter"]


@dataclass
class Launch:
    """What one start of a command gets beyond the pool's settings (from the worker IO).

    Attributes:
        env: variables to add (NOTIFY_SOCKET, ...).
        stdout, stderr: fds the child writes to (write ends of pipes; None: inherit ours).
        pass_fds: other fds the child keeps (listening sockets).
        readers: our ends of the pipes, for the worker IO once the process exists.
        listeners: ``corral.serve._listeners.Listener`` objects the program gets as systemd
            hands them over (fds 3.., LISTEN_FDS/LISTEN_FDNAMES/LISTEN_PID, ``{listen.NAME.fd}``
            in the argv); it is then started with ``posix_spawn`` through a ``/bin/sh`` shim
            (a Python one, which switches the ids, when it runs as another user or group).
    """

    env: dict[str, str] = field(default_factory=dict)
    stdout: int | None = None
    stderr: int | None = None
    pass_fds: tuple[int, ...] = ()
    readers: tuple[int, ...] = ()
    listeners: tuple[Any, ...] = ()

    def close_child_ends(self) -> None:
        for fd in (self.stdout, self.stderr):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.stdout = self.stderr = None

    def close_readers(self) -> None:
        for fd in self.readers:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.readers = ()


def _supplementary_groups(user: int | str | None, group: int | str | None
                          ) -> list[int] | None:
    """The supplementary groups of a command switched to ``user``: that user's own, as
    initgroups(3) gives them (None: nothing to switch). Without this it would keep corral's
    (root's) supplementary groups under the new uid.

    Raises:
        KeyError: ``group`` names no group.
    """
    if user is None or os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam(user) if isinstance(user, str) else pwd.getpwuid(user)
    except KeyError:
        return []  # a bare uid with no passwd entry: no supplementary group at all
    if group is None:
        gid = pw.pw_gid
    else:
        gid = grp.getgrnam(group).gr_gid if isinstance(group, str) else group
    return os.getgrouplist(pw.pw_name, gid)


def _numeric_ids(user: int | str | None, group: int | str | None
                 ) -> tuple[int | None, int | None, list[int] | None]:
    """(uid, gid, supplementary groups) for ``user``/``group`` as subprocess would set them:
    the user's primary group unless ``group`` is given, and initgroups(3)'s list.

    Raises:
        KeyError: an unknown user or group name.
    """
    uid = gid = None
    if user is not None:
        uid = pwd.getpwnam(user).pw_uid if isinstance(user, str) else user
    if group is not None:
        gid = grp.getgrnam(group).gr_gid if isinstance(group, str) else group
    return uid, gid, _supplementary_groups(user, group)


def missing_interpreter(argv0: str, env: Mapping[str, str],
                        cwd: str | None) -> FileNotFoundError | None:
    """Why exec said ENOENT for a program that exists: the interpreter its ``#!`` line names
    does not (exec reports that as the script being missing). None: not that case."""
    path = shutil.which(argv0, path=env.get("PATH", os.defpath)) if "/" not in argv0 \
        else os.path.join(cwd or os.getcwd(), argv0)
    if path is None or not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            first = f.readline(256)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    # The kernel splits the line at the first blank (space or tab) only: a \r stays in it.
    line = first[2:].rstrip(b"\n").lstrip(b" \t")
    interp = os.fsdecode(line.replace(b"\t", b" ").split(b" ", 1)[0])
    if not interp:
        return None
    if os.path.exists(interp):
        return None
    why = f"{argv0!r} exists, but the interpreter its #! line names, {interp!r}, does not"
    if interp.endswith("\r"):
        why += " (the line ends in \\r: the file has Windows line endings)"
    return FileNotFoundError(errno.ENOENT, why, path)


class CommandProcess(GroupSignals):
    """One running command (a ``ProcessLike``)."""

    def __init__(self, popen: subprocess.Popen[bytes] | None, pid: int | None = None,
                 keeper_slot: int = 0) -> None:
        self.popen = popen
        self.pid: int = popen.pid if popen is not None else int(pid)  # type: ignore[arg-type]
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.exit: ExitStatus | None = None
        self.stop_sent: int | None = None
        self._pidfd = -1
        try:
            self._pidfd = own_fd(os.pidfd_open(self.pid))
        except OSError:
            pass
        keeper.adopt(keeper_slot, self.pid)  # process_group=0: its group id is its pid

    @classmethod
    def start(cls, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              cwd: str | None = None, user: int | str | None = None,
              group: int | str | None = None, umask: int | None = None,
              launch: Launch | None = None) -> CommandProcess:
        """Start ``argv`` in a new process group.

        Raises:
            OSError: it could not be started (no such program, permission, limits).
        """
        launch = launch or Launch()
        full_env = dict(os.environ if env is None else env)
        full_env.update(launch.env)
        if launch.listeners and launch.pass_fds:
            raise ValueError("listeners cannot be handed to a command started with "
                             f"pass_fds (pass_fds={launch.pass_fds!r})")
        # Marked for the keeper until its group is registered: a supervisor killed while the
        # start returns still has the program killed.
        slot, mark = keeper.reserve_for_command()
        full_env.update(mark)
        try:
            if launch.listeners:
                from corral.serve._listeners import spawn_with_listeners

                ids = None
                if user is not None or group is not None:
                    ids = _numeric_ids(user, group)
                pid = spawn_with_listeners(
                    argv, launch.listeners, env=full_env, cwd=cwd, stdout=launch.stdout,
                    stderr=launch.stderr, umask=umask, ids=ids)
                return cls(None, pid, keeper_slot=slot)
            popen = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=launch.stdout,
                stderr=launch.stderr, env=full_env, cwd=cwd, user=user, group=group,
                extra_groups=_supplementary_groups(user, group),
                umask=-1 if umask is None else umask, process_group=0, close_fds=True,
                pass_fds=launch.pass_fds)
        except BaseException as exc:
            keeper.release(slot)
            if isinstance(exc, FileNotFoundError):
                raise missing_interpreter(argv[0], full_env, cwd) or exc from None
            raise
        return cls(popen, keeper_slot=slot)

    def waitable(self) -> int:
        return self._pidfd

    def reap(self) -> ExitStatus | None:
        if self.exit is not None:
            return self.exit
        try:
            result = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            # Collected by someone else (a foreign reaper): its status is lost for good.
            self.exit = ExitStatus.unknown_status()
        else:
            if result is None:
                return None
            if result.si_code == os.CLD_EXITED:
                self.exit = ExitStatus(code=result.si_status)
            else:
                self.exit = ExitStatus(signal=result.si_status,
                                       core_dumped=result.si_code == os.CLD_DUMPED)
        if self.popen is not None:
            self.popen.returncode = (self.exit.returncode if self.exit.returncode is not None
                                     else -1)
        keeper.unregister(self.pid)
        return self.exit

    def kill_and_reap(self, timeout: float = 5.0) -> None:
        self.send_group(signal.SIGKILL)
        if self._pidfd >= 0:
            multiprocessing.connection.wait([self._pidfd], timeout=timeout)
        self.kill_group_leftovers()
        self.reap()
        self.close()

    def close(self) -> None:
        if self._pidfd >= 0:
            disown_fd(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
