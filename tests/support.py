"""Test helpers shared by every suite: waiting on conditions with a deadline, processes by pid.

Imported as a module (``from support import wait_for``); the fixtures are in conftest.py.
"""

from __future__ import annotations

import http.client
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import psutil

T = TypeVar("T")

START_METHODS = ("fork", "spawn", "forkserver")


def wait_for(condition: Callable[[], T], timeout: float = 10.0, what: str = "condition",
             interval: float = 0.005) -> T:
    """Return the first truthy value of ``condition()``; fail the test after ``timeout`` s.

    A generous deadline for a real condition, never a fixed sleep.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _helper_processes() -> set[int]:
    """multiprocessing's forkserver and resource tracker, and corral's keeper (one per
    supervising process, see corral._keeper): long-lived helpers, not leaks."""
    out = set()
    for child in psutil.Process().children(recursive=False):
        try:
            cmd = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "forkserver" in cmd or "resource_tracker" in cmd or "corral-keeper" in cmd:
            out.add(child.pid)
    return out


def descendants() -> dict[int, psutil.Process]:
    """Every process below this one, except multiprocessing's own helpers."""
    helpers = _helper_processes()
    return {p.pid: p for p in psutil.Process().children(recursive=True) if p.pid not in helpers}


def kill_pids(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def is_zombie(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_for_fds(baseline: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        n = len(os.listdir("/proc/self/fd"))
        if n <= baseline + 3 or time.monotonic() > deadline:
            return n
        time.sleep(0.01)




def http_get(port: int, path: str = "/", timeout: float = 5.0) -> tuple[int, str, str]:
    """One GET on a new connection to 127.0.0.1:``port``: (status, its x-pid header, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.getheader("x-pid") or "", resp.read().decode()
    finally:
        conn.close()


class Load:
    """A thread sending requests (a new connection each, ``interval`` s apart) until stopped;
    counts the answers, the failures and the worker pids (x-pid) that answered."""

    def __init__(self, port: int, path: str = "/", interval: float = 0.005) -> None:
        self.port, self.path, self.interval = port, path, interval
        self.ok = 0
        self.failed: list[str] = []
        self.pids: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status, pid, _ = http_get(self.port, self.path)
                if status == 200:
                    self.ok += 1
                    self.pids.add(pid)
                else:
                    self.failed.append(f"status {status}")
            except OSError as exc:
                self.failed.append(repr(exc))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


class FakeSystemd:
    """A NOTIFY_SOCKET of the test's own, read as systemd does, as the datagrams come."""

    def __init__(self, tmp_path: Path, abstract: bool) -> None:
        self.rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"corral-test-{secrets.token_hex(6)}"
            self.rx.bind("\0" + name)
            self.address = "@" + name
        else:
            self.address = str(tmp_path / "notify.sock")
            self.rx.bind(self.address)
        self.rx.settimeout(0.2)
        self.messages: list[str] = []
        self._done = threading.Event()
        self._reader = threading.Thread(target=self._receive, daemon=True)
        self._reader.start()

    def _receive(self) -> None:
        while not self._done.is_set():
            try:
                self.messages.append(self.rx.recv(4096).decode())
            except TimeoutError:
                continue

    def kinds(self) -> list[str]:
        """The first field of each message but WATCHDOG=1 and STATUS alone."""
        return [m.split("\n")[0].split("=")[0] for m in list(self.messages)
                if m != "WATCHDOG=1" and not m.startswith("STATUS=")]

    def close(self) -> None:
        self._done.set()
        self._reader.join(5)
        self.rx.close()
