"""The OS seam for early death notices: glibc's robust, process-shared mutexes and futexes.

A worker holds a robust mutex that lives in the supervisor's shared heartbeat table. When the
holding thread ends, the kernel marks the mutex "owner died" and wakes its waiters while the
process is still being torn down (the robust list is walked before the address space goes),
about a millisecond before its pidfd becomes readable for a process of some tens of MB. A hot
standby can be sent into its place in that millisecond.

Linux with glibc only; :func:`available` says whether this machine has what it takes (a
seccomp profile may refuse ``futex_waitv``). Everything here is a thin wrapper: no policy.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Any

__all__ = ["FUTEX_OWNER_DIED", "FUTEX_TID_MASK", "FUTEX_WAITERS", "MUTEX_BYTES", "WAITV_MAX",
           "Waiters", "add_waiters_bit", "available", "futex_wake", "hold", "is_exiting",
           "map_shared", "mutex_init_bytes", "set_waiter", "unmap", "wait_any", "waiters"]

FUTEX_WAITERS = 0x80000000
FUTEX_OWNER_DIED = 0x40000000
FUTEX_TID_MASK = 0x3FFFFFFF
MUTEX_BYTES = 64  # room for a pthread_mutex_t (40 bytes on x86-64, 48 on arm64)
WAITV_MAX = 128  # the kernel's limit of futexes per futex_waitv

_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}.get(os.uname().machine, 0)  # 0: not known here
_SYS_FUTEX_WAITV = 449  # the same number on every architecture (Linux 5.16+)
_FUTEX_WAKE = 1  # shared (no FUTEX_PRIVATE_FLAG): the waiters are in other processes
_FUTEX_WAKE_OP = 5
# FUTEX_WAKE_OP's operation: *uaddr2 |= 1 << 31 (FUTEX_OP_OR with FUTEX_OP_OPARG_SHIFT).
_OR_WAITERS = ((2 | 8) << 28) | (31 << 12)
_FUTEX2_SIZE_U32 = 0x02
_PF_EXITING = 0x4  # task flag: do_exit has begun
_SIGKILL_BIT = 1 << (9 - 1)  # SIGKILL in /proc's pending-signal masks
_PROT_RW = 0x1 | 0x2
_MAP_SHARED = 0x01
_MAP_FAILED = (1 << (8 * ctypes.sizeof(ctypes.c_void_p))) - 1  # (void *) -1

_libc: Any = None
_init_bytes: bytes | None = None
_checked: bool | None = None


class _Waitv(ctypes.Structure):
    _fields_ = [("val", ctypes.c_uint64), ("uaddr", ctypes.c_uint64),
                ("flags", ctypes.c_uint32), ("reserved", ctypes.c_uint32)]


Waiters = ctypes.Array[_Waitv]
_Cell = ctypes.c_char * MUTEX_BYTES


def _load() -> Any:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)  # our own handle: argtypes set here stay ours
        lib.syscall.restype = ctypes.c_long
        lib.mmap.restype = ctypes.c_void_p
        for name in ("pthread_mutex_trylock", "pthread_mutex_consistent", "pthread_mutex_init",
                     "pthread_mutexattr_init", "pthread_mutexattr_setpshared",
                     "pthread_mutexattr_setrobust"):
            getattr(lib, name).restype = ctypes.c_int
        _libc = lib
    return _libc


def mutex_init_bytes() -> bytes:
    """The bytes of a freshly initialised robust, process-shared mutex (copied into a slot
    that no process holds yet, instead of calling pthread_mutex_init on every reset)."""
    global _init_bytes
    if _init_bytes is None:
        lib = _load()
        attr = ctypes.create_string_buffer(64)
        mutex = ctypes.create_string_buffer(MUTEX_BYTES)
        if (lib.pthread_mutexattr_init(attr) or lib.pthread_mutexattr_setpshared(attr, 1)
                or lib.pthread_mutexattr_setrobust(attr, 1)
                or lib.pthread_mutex_init(mutex, attr)):
            raise OSError("pthread_mutex_init of a robust, shared mutex failed")
        _init_bytes = mutex.raw
    return _init_bytes


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError):
        return False


def available() -> bool:
    """Robust mutexes and futex_waitv work here (checked once per process)."""
    global _checked
    if _checked is None:
        _checked = False
        if _SYS_FUTEX and os.uname().sysname == "Linux" and _glibc():
            try:
                mutex_init_bytes()
                lib = _load()
                # No futexes: EINVAL where the call exists, ENOSYS/EPERM where it does not.
                lib.syscall(ctypes.c_long(_SYS_FUTEX_WAITV), None, ctypes.c_uint(0),
                            ctypes.c_uint(0), None, ctypes.c_int(1))
                _checked = ctypes.get_errno() == errno.EINVAL
            except (OSError, AttributeError):
                _checked = False
    return _checked


def hold(buffer: Any, offset: int) -> Any:
    """Take the mutex at ``offset`` of ``buffer`` (a writable shared mapping) for this thread,
    and wake whoever watches it. Never blocks. Returns an object to keep alive while held
    (it pins the mapping), or None if the mutex was not free.
    """
    lib = _load()
    cell = _Cell.from_buffer(buffer, offset)
    rc = lib.pthread_mutex_trylock(cell)
    if rc == errno.EOWNERDEAD:  # a reset that raced a death: ours now, made whole
        lib.pthread_mutex_consistent(cell)
    elif rc != 0:
        return None
    futex_wake(ctypes.addressof(cell))
    return cell


def map_shared(fd: int, size: int) -> int:
    """Map ``size`` bytes of ``fd`` shared and writable; the address. Unlike ``mmap.mmap``,
    this keeps no duplicate of ``fd`` (one a fork child would inherit unregistered).

    Raises:
        OSError: mmap failed.
    """
    lib = _load()
    address = lib.mmap(None, ctypes.c_size_t(size), ctypes.c_int(_PROT_RW),
                       ctypes.c_int(_MAP_SHARED), ctypes.c_int(fd), ctypes.c_long(0))
    if address in (None, _MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of {size} bytes: {os.strerror(err)}")
    return int(address)


def unmap(address: int, size: int) -> None:
    _load().munmap(ctypes.c_void_p(address), ctypes.c_size_t(size))


def futex_wake(address: int) -> None:
    """Wake every waiter on the 32-bit futex at ``address`` (shared)."""
    _load().syscall(ctypes.c_long(_SYS_FUTEX), ctypes.c_void_p(address),
                    ctypes.c_int(_FUTEX_WAKE), ctypes.c_int(0x7FFFFFFF), None, None,
                    ctypes.c_int(0))


def add_waiters_bit(address: int) -> None:
    """Set FUTEX_WAITERS in the futex word at ``address`` atomically (a FUTEX_WAKE_OP that
    wakes no one): the kernel wakes a robust mutex's waiters at its owner's death only when
    that bit is set, and a plain write could erase an "owner died" set meanwhile."""
    _load().syscall(ctypes.c_long(_SYS_FUTEX), ctypes.c_void_p(address),
                    ctypes.c_int(_FUTEX_WAKE_OP), ctypes.c_int(0), ctypes.c_void_p(0),
                    ctypes.c_void_p(address), ctypes.c_uint(_OR_WAITERS))


def waiters(n: int) -> Waiters:
    return (_Waitv * n)()


def set_waiter(waiters: Waiters, i: int, address: int, value: int) -> None:
    w = waiters[i]
    w.uaddr, w.val, w.flags = address, value, _FUTEX2_SIZE_U32


def wait_any(waiters: Waiters, n: int) -> int:
    """Sleep until one of the first ``n`` futexes is woken; its index, or -1 when a value had
    changed already (EAGAIN) or a signal came: the caller looks again in either case."""
    lib = _load()
    rc = lib.syscall(ctypes.c_long(_SYS_FUTEX_WAITV), waiters, ctypes.c_uint(n),
                     ctypes.c_uint(0), None, ctypes.c_int(1))
    if rc >= 0:
        return int(rc)
    err = ctypes.get_errno()
    if err in (errno.EAGAIN, errno.EINTR):
        return -1
    raise OSError(err, f"futex_waitv: {os.strerror(err)}")


def is_exiting(pid: int) -> bool:
    """True once process ``pid`` has begun to exit: every one of its threads has (PF_EXITING,
    from /proc) or is a zombie. The main thread alone is not enough: it can end (pthread_exit)
    while other threads run on, and its death lock is freed then too. False if any thread
    runs (an exec also frees robust mutexes: that is not a death) or the process is gone.

    An exec from a thread other than the main one kills the other threads, then gives the
    exec'ing thread the process's pid: read in between, every thread listed looks exiting
    (the old main thread, and the exec'ing one gone or its tid already the old main
    thread's). So the main thread is read again last: after an exec it is the running one.
    A thread gone meanwhile counts as exiting (a dying process's threads go one by one)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    leader = str(pid)
    return (bool(tids) and all(_task_exiting(pid, tid) is not False for tid in tids)
            and _task_exiting(pid, leader) is True)


def _task_exiting(pid: int, tid: str) -> bool | None:
    """Thread ``tid`` has begun to exit, or is bound to: a group exit (a fatal signal,
    exit_group) leaves SIGKILL pending in every thread it has not reached yet. None if the
    thread is gone (for the main thread: the process has been reaped)."""
    task = f"/proc/{pid}/task/{tid}"
    try:
        with open(f"{task}/stat", "rb") as f:
            data = f.read()
        fields = data[data.rfind(b")") + 2:].split()
        if fields[0] in (b"Z", b"X") or int(fields[6]) & _PF_EXITING:
            return True
        with open(f"{task}/status", "rb") as f:
            for line in f:
                if line.startswith(b"SigPnd:"):
                    return bool(int(line.split()[1], 16) & _SIGKILL_BIT)
    except FileNotFoundError:
        return None
    except (OSError, IndexError, ValueError):
        pass
    return False
