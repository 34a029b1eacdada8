"""Where and as whom a pool's Python target workers run: PoolSpec's env/cwd/umask/user/group
resolved once in the supervisor (names to ids, checked), for the worker's bootstrap."""

from __future__ import annotations

import grp
import os
import pwd

from corral._bootstrap import WorkerSettings
from corral.spec import PoolSpec

__all__ = ["worker_settings"]


def worker_settings(spec: PoolSpec) -> WorkerSettings | None:
    """The settings a target worker applies before ``target`` runs, or None for none.

    Raises:
        ValueError: an unknown user or group, a ``cwd`` that is not a directory, or a user
            switch that needs root while the supervisor is not root.
    """
    if spec.command is not None or all(
            getattr(spec, key) is None for key in ("env", "cwd", "umask", "user", "group")):
        return None
    if spec.cwd is not None and not os.path.isdir(spec.cwd):
        raise ValueError(f"cwd must be an existing directory, got {spec.cwd!r}")
    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] | None = None
    pw: pwd.struct_passwd | None = None
    if spec.user is not None:
        try:
            pw = pwd.getpwnam(spec.user) if isinstance(spec.user, str) else pwd.getpwuid(spec.user)
        except KeyError:
            if isinstance(spec.user, str):
                raise ValueError(f"user must name a user of this system, got {spec.user!r}"
                                 ) from None
            pw = None  # a bare uid with no passwd entry
        uid = pw.pw_uid if pw is not None else int(spec.user)
        gid = pw.pw_gid if pw is not None else None
    if spec.group is not None:
        try:
            gid = (grp.getgrnam(spec.group).gr_gid if isinstance(spec.group, str)
                   else int(spec.group))
        except KeyError:
            raise ValueError(f"group must name a group of this system, got {spec.group!r}"
                             ) from None
    if (uid is not None and uid != os.geteuid()) or (gid is not None and gid != os.getegid()):
        if os.geteuid() != 0:
            raise ValueError(f"user={spec.user!r} / group={spec.group!r}: switching needs root "
                             f"(the supervisor runs as uid {os.geteuid()})")
        # That user's own supplementary groups (initgroups(3)), never the supervisor's.
        if spec.user is not None and pw is not None:
            groups = tuple(os.getgrouplist(pw.pw_name, gid if gid is not None else pw.pw_gid))
        else:
            groups = ()
    return WorkerSettings(env=dict(spec.env) if spec.env is not None else None, cwd=spec.cwd,
                          umask=spec.umask, uid=uid, gid=gid, groups=groups)
