"""A zygote per code generation: one process imports the app once and forks the workers.

The zygote is a fresh interpreter (``subprocess``, never a fork of the threaded supervisor) that
imports corral's bootstrap, uvicorn and the app, loads uvicorn's config, checks that no thread was
started by those imports, and then waits on its control socket. Each fork request comes back as
a child that boots at fork speed and shares the zygote's memory copy-on-write.

    supervisor (spawner thread)            zygote (one thread)                  worker
    fork(boot, args) --("fork", id, ...)--> os.fork() ----------------------->  reset signals,
                                            setpgid, pidfd_open                 reseed random,
                  <--("forked", id, pid) + pidfd (SCM_RIGHTS)                   close the ctl
    ZygoteChild(pid, pidfd)                                                     sockets, corral's
                                            SIGCHLD -> kill group leftovers,    bootstrap, then
                                            status (waitid, WNOWAIT)            serve
    monitor's loop <--("exit", pid, status) (exits' socket)   then reap (waitpid)
    -> the child's eventfd becomes readable: the monitor reaps it from there

The zygote is the workers' parent, so it reaps them and reports each wait status; the supervisor
holds a pidfd of each (signals without a pid-reuse race) and an eventfd that becomes readable
once the status is known (what the monitor waits on). Given the monitor's loop, the zygote
handle watches each worker's pidfd there and reads the status from the zombie, the moment the
zygote itself learns of the death (a restart is on the clock: no process or thread in
between); the zygote's reports, sent before it reaps, come on a socket of their own read on
the same loop, and tell when the zombie was reaped first. Workers get ``PR_SET_PDEATHSIG``
against the zygote; the zygote exits when its control socket reaches EOF (the supervisor is
gone, however it ended) and the keeper kills the registered groups. A zygote is retired (told
to exit) once its generation has no worker left.

Python's stdlib forkserver is one per process with a fixed preload list, so it cannot hold two
code generations; zygotes are corral's own, one per generation, any number at once.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from corral._keeper import keeper
from corral.exitstatus import ExitStatus
from corral.process import GroupSignals, disown_fd, own_fd

if TYPE_CHECKING:
    from corral._reactor import Reactor

__all__ = ["Zygote", "ZygoteChild", "ZygoteError", "main"]

log = logging.getLogger("corral.serve.zygote")

_MAX_MSG = 1 << 20
_MAX_FDS = 8


class ZygoteError(RuntimeError):
    """The zygote could not start (an import error in the app, threads at fork) or is gone."""


@dataclass(frozen=True)
class ZygoteReady:
    pid: int
    interface: str
    import_seconds: float
    threads: tuple[str, ...]  # native threads seen at fork time (warned about)


def _send(sock: socket.socket, obj: Any, fds: Sequence[int] = ()) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendall(data)


def _recv(sock: socket.socket) -> tuple[Any, list[int]] | None:
    """One message and the fds it carried; None at EOF."""
    data, ancdata, _flags, _addr = sock.recvmsg(
        _MAX_MSG, socket.CMSG_SPACE(_MAX_FDS * array.array("i").itemsize))
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    if not data:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        return None
    return pickle.loads(data), fds


# ------------------------------------------------------------------------- supervisor side


class ZygoteChild(GroupSignals):
    """A worker forked by a zygote (a ``ProcessLike`` for the monitor).

    ``waitable()`` is an eventfd that becomes readable once the worker's exit status is known
    (read from its zombie on the monitor's loop, or reported by the zygote), so the monitor
    never sees an exit whose status is not known yet.
    """

    def __init__(self, zygote: Zygote, pid: int, pidfd: int) -> None:
        self.zygote = zygote
        self.pid = pid
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.exit: ExitStatus | None = None
        self.stop_sent: int | None = None
        self._pidfd = own_fd(pidfd)
        self._event = own_fd(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
        self._status: ExitStatus | None = None
        self._closed = False
        keeper.register(pid)  # its group dies with the supervisor too

    def _set_status(self, status: ExitStatus) -> None:
        """The worker was reaped (or is a zombie whose status was read): any thread."""
        if self._status is None:
            self._status = status
            with contextlib.suppress(OSError):
                os.eventfd_write(self._event, 1)

    def waitable(self) -> int:
        return self._event

    def send(self, sig: int) -> bool:
        if self.exit is not None or self._pidfd < 0:
            return False
        try:
            signal.pidfd_send_signal(self._pidfd, sig)
            return True
        except ProcessLookupError:
            return False

    def _group_is_ours(self) -> bool:
        # The zygote kills what is left of the group before it reaps the worker (while the
        # zombie still holds the group id); after that the id may be reused: hands off.
        return self._status is None

    def reap(self) -> ExitStatus | None:
        if self.exit is not None:
            return self.exit
        if self._status is None:
            return None
        self.exit = self._status
        keeper.unregister(self.pid)
        return self.exit

    def kill_and_reap(self, timeout: float = 5.0) -> None:
        self.send_group(signal.SIGKILL)
        with contextlib.suppress(OSError, ValueError):
            select.select([self._event], [], [], timeout)
        self.reap()
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fd in (self._pidfd, self._event):
            disown_fd(fd)
            with contextlib.suppress(OSError):
                os.close(fd)
        self._pidfd = self._event = -1
        self.zygote._forget(self.pid)


class Zygote:
    """The supervisor's handle on one zygote process.

    Args:
        name: for titles and logs ("web@2").
        init: the :class:`corral.serve._worker.WorkerInit` of this generation.
        listeners: fds of the listening sockets the workers serve on (inherited by the zygote).
        env: the zygote's (and so the workers') environment; default: ours.
        reactor: the loop that supervises the workers: their exits are read on it, straight
            from the zygote (no thread in between); without one, the reader thread reads them.
    """

    def __init__(self, name: str, init: Any, listeners: Sequence[int],
                 env: dict[str, str] | None = None, reactor: Reactor[Any] | None = None,
                 ) -> None:
        self.name = name
        self.init = init
        self.listeners = tuple(listeners)
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: ZygoteReady | None = None
        self._sock: socket.socket | None = None
        # The workers' exits come on a line of their own, read on ``reactor`` when given.
        self._exits: socket.socket | None = None
        self._reactor = reactor
        self._attached = False
        self._loop_thread = 0  # the reactor's thread, once attached
        # Reactor mode: a dup of each worker's pidfd, watched on the loop (see _watch_child).
        self._watches: dict[int, int] = {}  # pid -> its watched pidfd (loop thread only)
        self._send_lock = threading.Lock()
        self._children: dict[int, ZygoteChild] = {}
        self._early: dict[int, ExitStatus] = {}  # exits reported before the fork reply was read
        self._pending: dict[int, Future[tuple[int, int]]] = {}
        self._ids = 0
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self.dead = False
        self.retiring = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    # -------------------------------------------------------------------------- start, stop

    def start(self, timeout: float) -> ZygoteReady:
        """Start the zygote and wait until it has imported the app.

        Raises:
            ZygoteError: the import failed (the message carries the traceback), threads were
                started by it, or nothing came within ``timeout``.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        exits, exits_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        exits.setblocking(False)
        try:
            code = "from corral.serve._zygote import main; main()"
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code, str(theirs.fileno()), self.name,
                 str(exits_theirs.fileno())],
                stdin=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(), exits_theirs.fileno(), *self.listeners),
                close_fds=True, process_group=0, env=self.env)
        except BaseException:
            ours.close()
            exits.close()
            raise
        finally:
            theirs.close()
            exits_theirs.close()
        keeper.register(self.proc.pid)
        self._sock = ours
        self._exits = exits
        own_fd(ours.fileno())
        own_fd(exits.fileno())
        try:
            _send(ours, (self.init, self.listeners))
            ready, _, _ = select.select([ours], [], [], timeout)
            if not ready:
                raise ZygoteError(f"zygote {self.name}: the app was not imported within "
                                  f"{timeout:g}s")
            msg = _recv(ours)
            if msg is None:
                raise ZygoteError(f"zygote {self.name} exited while importing the app "
                                  f"(exit status {self._wait_exit(2.0)})")
            kind, payload = msg[0][0], msg[0][1]
            if kind != "ready":
                raise ZygoteError(f"zygote {self.name} could not load the app:\n{payload}")
        except BaseException:
            self.kill()
            raise
        self.info = payload
        if self._reactor is not None:
            try:
                self._reactor.call_soon_threadsafe(self._attach)
                self._attached = True
            except RuntimeError:  # the loop has closed
                pass
        self._reader = threading.Thread(target=self._read_loop, daemon=True,
                                        name=f"corral-zygote[{self.name}]")
        self._reader.start()
        return payload  # type: ignore[no-any-return]

    def _wait_exit(self, timeout: float) -> str:
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return "still running"
        return ExitStatus.from_returncode(code).describe()

    def retire(self, timeout: float = 5.0) -> None:
        """Tell the zygote to exit (its generation is over) and reap it."""
        self.retiring = True
        sock = self._sock
        if sock is not None and not self.dead:
            with contextlib.suppress(OSError), self._send_lock:
                _send(sock, ("exit",))
        self._finish(timeout)

    def kill(self) -> None:
        """SIGKILL the zygote (its workers follow through their parent-death signal)."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(OSError):
                self.proc.kill()
        self._finish(5.0)

    def _finish(self, timeout: float) -> None:
        proc = self.proc
        if proc is not None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            keeper.unregister(proc.pid)
        reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(timeout)
        sock = self._sock
        if sock is not None and (reader is None or not reader.is_alive()):
            disown_fd(sock.fileno())
            sock.close()
            self._sock = None
            self._close_exits()

    def _close_exits(self) -> None:
        """Close the exits' line (on the reactor's thread when it is read there)."""
        if self._attached:
            self._attached = False
            if threading.get_ident() == self._loop_thread:
                self._detach(True)
                return
            try:
                assert self._reactor is not None
                self._reactor.call_soon_threadsafe(self._detach, True)
                return
            except RuntimeError:  # the loop has closed: nobody reads it any more
                pass
        exits, self._exits = self._exits, None
        if exits is not None:
            disown_fd(exits.fileno())
            exits.close()

    def _attach(self) -> None:
        """On the reactor's thread: read the exits there."""
        exits = self._exits
        if exits is not None and self._reactor is not None and not self._reactor.closed:
            self._loop_thread = threading.get_ident()
            self._reactor.add_reader(exits.fileno(), self._on_exits)

    def _detach(self, close: bool) -> None:
        """On the reactor's thread: stop reading the exits there (and close the line)."""
        exits = self._exits
        if exits is None:
            return
        if self._reactor is not None and self._reactor.watching(exits.fileno()):
            self._reactor.remove_reader(exits.fileno())
        if close:
            self._exits = None
            disown_fd(exits.fileno())
            exits.close()
            for pidfd in self._watches.values():
                self._unwatch_fd(pidfd)
            self._watches.clear()

    def _on_exits(self) -> None:
        """The reactor's callback: every exit report waiting on the line."""
        try:
            if not self._read_exits(on_loop=True):
                self._detach(False)  # the zygote is gone: the reader thread says what next
        except Exception:
            log.exception("zygote %s: reading an exit report failed", self.name)
            self._detach(False)

    def _read_exits(self, on_loop: bool = False) -> bool:
        """Take every exit report waiting (any thread; ``on_loop``: the reactor's, where the
        monitor handles each exit in this same round); False once the line has ended."""
        exits = self._exits
        if exits is None:
            return False
        while True:
            try:
                msg = _recv(exits)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if msg is None:
                return False
            (kind, *rest), fds = msg
            for fd in fds:
                os.close(fd)
            if kind == "exit":
                child = self._on_exit_report(*rest)
                if on_loop and child is not None and self._reactor is not None:
                    # Its eventfd is readable now; the monitor's reader runs at the end of this
                    # round instead of after one more poll.
                    self._reactor.call_soon(self._run_exit_reader, child)

    def _watch_child(self, child: ZygoteChild, pidfd: int) -> None:
        """On the loop: learn of the worker's death from its pidfd, the moment the zygote
        does, instead of after the zygote's report (one process hop less). A dup of the
        pidfd, so that closing the worker's handle never closes a watched fd."""
        own_fd(pidfd)
        reactor = self._reactor
        if (child._status is not None or child._closed or not self._attached
                or reactor is None or reactor.closed):
            self._unwatch_fd(pidfd)
            return
        self._watches[child.pid] = pidfd
        reactor.add_reader(pidfd, lambda: self._on_child_dead(child))

    def _unwatch_fd(self, pidfd: int) -> None:
        if self._reactor is not None and self._reactor.watching(pidfd):
            self._reactor.remove_reader(pidfd)
        disown_fd(pidfd)
        with contextlib.suppress(OSError):
            os.close(pidfd)

    def _on_child_dead(self, child: ZygoteChild) -> None:
        """On the loop: the worker has exited (its pidfd is readable). Its status is read from
        its zombie; if the zygote has reaped it already, its report tells (it is on its way)."""
        pidfd = self._watches.pop(child.pid, None)
        if pidfd is None:
            return
        try:
            if child._status is None and not child._closed:
                status = _zombie_status(child.pid, pidfd)
                if status is not None:
                    child._set_status(_decode(status))
                    self._run_exit_reader(child)
        except Exception:  # the zygote's report still tells
            log.exception("zygote %s: reading the exit of pid %s failed", self.name, child.pid)
        finally:
            self._unwatch_fd(pidfd)

    def _run_exit_reader(self, child: ZygoteChild) -> None:
        if not child._closed and self._reactor is not None:  # closed: its fd may be reused
            self._reactor.run_reader(child.waitable())

    # ------------------------------------------------------------------------------ forking

    def fork(self, boot: Any, args: tuple[Any, ...], fds: Sequence[int] = (),
             timeout: float = 30.0) -> ZygoteChild:
        """Fork one worker (any thread; the monitor's spawner thread). ``boot`` is its
        :class:`corral._bootstrap.BootConfig`; ``fds`` are passed to the child (a standby's
        pipe).

        Raises:
            ZygoteError: the zygote is gone or did not answer.
            OSError: the fork failed in the zygote (no memory, process limit).
        """
        sock = self._sock
        if sock is None or self.dead:
            raise ZygoteError(f"zygote {self.name} is not running")
        future: Future[tuple[int, int]] = Future()
        with self._lock:
            self._ids += 1
            req = self._ids
            self._pending[req] = future
        try:
            with self._send_lock:
                _send(sock, ("fork", req, boot, args, len(fds)), fds)
        except OSError as exc:
            with self._lock:
                self._pending.pop(req, None)
            raise ZygoteError(f"zygote {self.name} is gone ({exc})") from None
        try:
            pid, pidfd = future.result(timeout)
        except TimeoutError:
            raise ZygoteError(f"zygote {self.name} did not answer a fork within "
                              f"{timeout:g}s") from None
        with self._lock:
            child = ZygoteChild(self, pid, pidfd)
            self._children[pid] = child
            early = self._early.pop(pid, None)
        if early is not None:
            child._set_status(early)
        elif self._attached and self._reactor is not None:
            watched = os.dup(pidfd)
            try:
                self._reactor.call_soon_threadsafe(self._watch_child, child, watched)
            except RuntimeError:  # the loop has closed
                os.close(watched)
        return child

    def _forget(self, pid: int) -> None:
        with self._lock:
            self._children.pop(pid, None)

    @property
    def children(self) -> int:
        with self._lock:
            return len(self._children)

    def _read_loop(self) -> None:
        sock = self._sock
        assert sock is not None
        exits = self._exits
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        if exits is not None and not self._attached:
            poller.register(exits.fileno(), select.POLLIN)
        while True:
            try:
                ready = {fd for fd, _ in poller.poll()}
            except InterruptedError:
                continue
            if exits is not None and exits.fileno() in ready and not self._read_exits():
                poller.unregister(exits.fileno())
            if sock.fileno() not in ready:
                continue
            try:
                msg = _recv(sock)
            except OSError:
                msg = None
            if msg is None:
                break
            (kind, *rest), fds = msg
            if kind == "forked":
                req, pid = rest
                with self._lock:
                    future = self._pending.pop(req, None)
                if future is None or not fds:
                    for fd in fds:
                        os.close(fd)
                    continue
                future.set_result((pid, fds[0]))
            elif kind == "fork-failed":
                req, errno_, text = rest
                with self._lock:
                    future = self._pending.pop(req, None)
                if future is not None:
                    future.set_exception(OSError(errno_, text))
        self._on_eof()

    def _on_exit_report(self, pid: int, wait_status: int) -> ZygoteChild | None:
        """A worker was reaped: its status to its handle (kept for later if its fork reply
        has not been read yet). Returns the handle, if there is one already."""
        status = _decode(wait_status)
        with self._lock:
            child = self._children.get(pid)
            if child is None:
                self._early[pid] = status
        if child is not None:
            child._set_status(status)
        return child

    def _on_eof(self) -> None:
        """The zygote is gone: fail pending forks; every child still running dies through its
        parent-death signal, and is reported with an unknown status once its pidfd says so."""
        self.dead = True
        # Reports still waiting on the exits' line come first: they know the real statuses.
        with contextlib.suppress(OSError, ValueError):
            self._read_exits()
        with self._lock:
            pending = list(self._pending.values())
            self._pending.clear()
            children = list(self._children.values())
        for future in pending:
            future.set_exception(ZygoteError(f"zygote {self.name} exited"))
        if children and not self.retiring:
            log.error("zygote %s (pid %s) exited with %d worker(s) still running; they die "
                      "with it and are restarted from a new zygote", self.name, self.pid,
                      len(children))
        for child in children:
            if child._status is not None or child._pidfd < 0:
                continue
            with contextlib.suppress(OSError, ValueError):
                select.select([child._pidfd], [], [], 5.0)
            child._set_status(ExitStatus.unknown_status())


def _zombie_status(pid: int, pidfd: int) -> int | None:
    """The wait status of an exited, not yet reaped worker, from ``/proc/PID/stat`` (its
    exit_code field, waitpid's form); None once it is reaped, or unreadable, or 0: the kernel
    shows 0 to a reader without ptrace access (a worker run as another user), so a clean exit
    is left to the zygote's report."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        if fields[0] != b"Z":
            return None
        status = int(fields[49])  # field 52, counted from the state (field 3)
    except (OSError, IndexError, ValueError):
        return None
    if status == 0:
        return None
    try:
        # Not reaped yet after the read: the pid was not reused, what was read is ours.
        signal.pidfd_send_signal(pidfd, 0)
    except OSError:
        return None
    return status


def _decode(wait_status: int) -> ExitStatus:
    if os.WIFSIGNALED(wait_status):
        return ExitStatus(signal=os.WTERMSIG(wait_status), core_dumped=os.WCOREDUMP(wait_status))
    return ExitStatus(code=os.WEXITSTATUS(wait_status))


# ---------------------------------------------------------------------------- zygote side


def main() -> None:
    """The zygote process (``python -c 'from corral.serve._zygote import main; main()' FD``)."""
    ctl = socket.socket(fileno=int(sys.argv[1]))
    name = sys.argv[2] if len(sys.argv) > 2 else "zygote"
    exits = socket.socket(fileno=int(sys.argv[3])) if len(sys.argv) > 3 else ctl
    # The supervisor stops us through the socket; a terminal's Ctrl-C is not for us.
    for sig in _IGNORED:
        signal.signal(sig, signal.SIG_IGN)
    msg = _recv(ctl)
    if msg is None:
        os._exit(0)
    global _LISTEN_FDS
    init, _LISTEN_FDS = msg[0]
    with contextlib.suppress(Exception):
        import setproctitle

        setproctitle.setproctitle(f"corral: {name} zygote")
    try:
        from corral import _bootstrap
        from corral.serve import _worker

        pre = _worker.preload(init)
        native = _threads_check(init.check_threads)
    except BaseException:
        with contextlib.suppress(OSError):
            _send(ctl, ("failed", traceback.format_exc()))
        os._exit(3)
    _send(ctl, ("ready", ZygoteReady(os.getpid(), pre.interface, pre.import_seconds, native)))
    _serve_forks(ctl, exits, _bootstrap, _worker)


def _threads_check(strict: bool) -> tuple[str, ...]:
    """Refuse to be a zygote with Python threads running (a fork would copy their locks
    held); native threads (a BLAS pool) are reported and tolerated."""
    others = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    if others and strict:
        raise ZygoteError(
            f"importing the app started thread(s) {others}: forking now could copy a lock "
            "held by one of them into every worker. Start threads in the app's lifespan "
            "start-up (it runs in each worker), or use --start-method forkserver/spawn.")
    names: list[str] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir("/proc/self/task"):
            if int(tid) == os.getpid():
                continue
            with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/comm") as fh:
                names.append(fh.read().strip())
    return tuple(names)


def _serve_forks(ctl: socket.socket, exits: socket.socket, bootstrap: Any, worker: Any,
                 ) -> None:
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    me = os.getpid()
    poller = select.poll()
    poller.register(ctl.fileno(), select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    children: set[int] = set()
    while True:
        try:
            events = poller.poll()
        except InterruptedError:
            continue
        for fd, _ in events:
            if fd == wake_r:
                with contextlib.suppress(BlockingIOError):
                    while os.read(wake_r, 512):
                        pass
                _reap(exits, children)
                continue
            try:
                msg = _recv(ctl)
            except OSError:
                msg = None
            if msg is None or msg[0][0] == "exit":
                # The supervisor is gone, or retired us: our children (if any) follow by their
                # parent-death signal.
                os._exit(0)
            (_, req, boot, args, _), fds = msg
            # A child born with our SIG_IGN would drop a stop signal sent before its bootstrap
            # resets the handlers (the supervisor may stop it as soon as it has the pid): it
            # is born with them blocked instead, so such a signal stays pending until the
            # bootstrap has set the defaults, and then ends it.
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, _IGNORED)
            try:
                pid = os.fork()
            except OSError as exc:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                for f in fds:
                    os.close(f)
                _send(ctl, ("fork-failed", req, exc.errno, str(exc)))
                continue
            if pid == 0:
                _child((ctl, exits), (wake_r, wake_w), me, boot, args, fds, bootstrap, worker)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            for f in fds:
                os.close(f)
            children.add(pid)
            with contextlib.suppress(OSError):
                os.setpgid(pid, pid)  # both sides: a signal right away reaches the group
            pidfd = os.pidfd_open(pid)
            try:
                _send(ctl, ("forked", req, pid), [pidfd])
            finally:
                os.close(pidfd)
        _reap(exits, children)


def _reap(exits: socket.socket, children: set[int]) -> None:
    """Every child that has exited: kill its group's leftovers while the zombie still holds
    the group id, report the status (read without reaping: the report is on its way before
    the reap's cost), then reap it."""
    for pid in list(children):
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            children.discard(pid)
            continue
        if info is None:
            continue
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            _send(exits, ("exit", pid, _wait_status(info.si_code, info.si_status)))
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        children.discard(pid)


def _wait_status(code: int, status: int) -> int:
    """waitid's (si_code, si_status) as the status word waitpid would have returned."""
    if code == os.CLD_EXITED:
        return (status & 0xFF) << 8
    if code == os.CLD_DUMPED:
        return (status & 0x7F) | 0x80
    return status & 0x7F  # CLD_KILLED


def _child(ctls: tuple[socket.socket, socket.socket], wake: tuple[int, int], zygote_pid: int,
           boot: Any,
           args: tuple[Any, ...], fds: list[int], bootstrap: Any, worker: Any) -> None:
    """In the forked worker: never returns."""
    code = 1
    try:
        import dataclasses
        import random

        for ctl in ctls:
            ctl.close()  # the supervisor's lines are the zygote's, not ours
        for fd in wake:
            os.close(fd)
        random.seed()  # not the zygote's (or a sibling's) sequence
        # Parent-death signal and the getppid() check against the zygote, our parent.
        cfg = dataclasses.replace(boot, supervisor_pid=zygote_pid, forkserver=False,
                                  forked=False)
        sockets = _inherited_sockets(worker)
        if fds:  # a hot standby: its pipe to the supervisor
            from multiprocessing.connection import Connection

            bootstrap.run_standby(cfg, _serve_target(worker, sockets), Connection(fds[0]),
                                  lambda: worker.warm_up(sockets))
        else:
            bootstrap.run_worker(cfg, _serve_target(worker, sockets), ())
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int | None):
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


_LISTEN_FDS: tuple[int, ...] = ()
# Ignored by the zygote, blocked in a child until its bootstrap resets them (see _serve_forks).
_IGNORED = (signal.SIGINT, signal.SIGHUP, signal.SIGTERM)


def _inherited_sockets(worker: Any) -> list[socket.socket]:
    return [socket.socket(fileno=fd) for fd in worker_listen_fds()]


def worker_listen_fds() -> tuple[int, ...]:
    return _LISTEN_FDS


def _serve_target(worker: Any, sockets: list[socket.socket]) -> Callable[..., None]:
    def target(index: int, *_: Any) -> None:
        worker.serve_preloaded(index, sockets)

    return target
