"""End-to-end tests of the ``corral`` command: a real ``corral run`` as a subprocess, driven by
real ``corral`` verbs (subprocesses too) over its control socket.

The ``corral`` fixture is a factory: ``c = corral("-n", "2", "--", *cmd)`` or
``corral(config=TEXT)`` starts ``corral run`` with its control socket in a 0700 directory under
``tmp_path``, waits until it answers, and returns a :class:`Corral`. Whatever happens, each one
is stopped at the end of the test (SIGTERM, then SIGKILL), and every process seen below it is
killed by pid.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest

from support import wait_for

HERE = Path(__file__).resolve().parent
WORKER = str(HERE / "worker.py")
PY = sys.executable
CLI = [PY, "-c", "import sys; from corral.cli.main import main; sys.argv[0] = 'corral'; main()"]


def worker(*args: str) -> list[str]:
    """The argv of the test worker (tests/e2e/worker.py) with ``args``."""
    return [PY, WORKER, *args]


def toml_argv(argv: Sequence[str]) -> str:
    return "[" + ", ".join(json.dumps(a) for a in argv) + "]"


class Corral:
    """One ``corral run`` under test."""

    def __init__(self, tmp: Path, name: str = "c") -> None:
        self.tmp = tmp
        self.dir = tmp / f"{name}-sock"
        self.dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self.socket = str(self.dir / "corral.sock")
        self.out_path = tmp / f"{name}-out.txt"
        self.err_path = tmp / f"{name}-err.txt"
        self.proc: subprocess.Popen[bytes] | None = None
        self.seen: set[int] = set()  # every pid seen below corral (killed at the end)

    # -- running it
    def start(self, run_args: Sequence[str], *, env: dict[str, str] | None = None,
              wait: bool = True, cwd: Path | None = None, stdout: int | None = None,
              prefix: Sequence[str] = (), pass_fds: Sequence[int] = ()) -> Corral:
        """``prefix``: a launcher that execs corral (its pid stays corral's), e.g. setpriv;
        ``pass_fds``: fds of the test the launcher inherits."""
        full_env = dict(os.environ)
        full_env.pop("CORRAL_SOCKET", None)
        full_env.pop("CORRAL_CONFIG", None)
        full_env.update(env or {})
        with open(self.out_path, "ab") as out, open(self.err_path, "ab") as err:
            self.proc = subprocess.Popen(
                [*prefix, *CLI, "--socket", self.socket, "run", *run_args],
                stdin=subprocess.DEVNULL,
                stdout=out if stdout is None else stdout, stderr=err,
                cwd=str(cwd or self.tmp), env=full_env,
                start_new_session=True, pass_fds=tuple(pass_fds))
        if wait:
            wait_for(lambda: self._answers(), 20, "corral run to answer on its socket")
        return self

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"corral run exited with {self.proc.returncode}:\n"
                                 f"{self.err()}")
        return self.cli("status", "--json").returncode in (0, 1, 3)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cli(self, *args: str, timeout: float = 30, input: str | None = None
            ) -> subprocess.CompletedProcess[str]:
        """Run ``corral --socket SOCKET ARGS...`` and return it (text output)."""
        env = dict(os.environ)
        env.pop("CORRAL_SOCKET", None)
        env.pop("CORRAL_CONFIG", None)
        return subprocess.run([*CLI, "--socket", self.socket, *args], capture_output=True,
                              text=True, timeout=timeout, cwd=str(self.tmp), env=env,
                              input=input)

    def ok(self, *args: str, timeout: float = 30) -> str:
        r = self.cli(*args, timeout=timeout)
        assert r.returncode == 0, f"corral {' '.join(args)} -> {r.returncode}\n{r.stdout}\n" \
                                  f"{r.stderr}"
        return r.stdout

    def status(self) -> dict[str, Any]:
        r = self.cli("status", "--json")
        assert r.returncode in (0, 1, 3), r.stderr
        data: dict[str, Any] = json.loads(r.stdout)
        self.note_pids()
        return data

    def workers(self, program: str | None = None) -> list[dict[str, Any]]:
        progs = self.status()["programs"]
        return [w for p in progs if program in (None, p["name"]) for w in p["workers"]]

    def wait_workers(self, cond: Callable[[list[dict[str, Any]]], bool], what: str,
                     program: str | None = None, timeout: float = 20
                     ) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = []

        def check() -> bool:
            result[:] = self.workers(program)
            return cond(result)

        wait_for(check, timeout, what, interval=0.05)
        return result

    def wait_running(self, n: int, program: str | None = None, timeout: float = 20
                     ) -> list[dict[str, Any]]:
        return self.wait_workers(
            lambda ws: len(ws) == n and all(w["state"] == "running" and w["ready"]
                                            and w["pid"] for w in ws),
            f"{n} running worker(s) of {program or 'every program'}", program, timeout)

    def out(self) -> str:
        return self.out_path.read_text(errors="replace")

    def err(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait_out(self, text: str, timeout: float = 20) -> str:
        wait_for(lambda: text in self.out(), timeout, f"{text!r} in corral's output")
        return self.out()

    def wait_err(self, text: str, timeout: float = 20) -> str:
        wait_for(lambda: text in self.err(), timeout, f"{text!r} in corral's stderr")
        return self.err()

    def descendants(self) -> set[int]:
        if self.proc is None:
            return set()
        try:
            return {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            return set()

    def note_pids(self) -> set[int]:
        found = self.descendants()
        self.seen |= found
        return found

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM, wait; SIGKILL past ``timeout``. Returns corral's exit code."""
        if self.proc is None:
            return None
        self.note_pids()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def cleanup(self) -> None:
        self.stop()
        for pid in self.seen:
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except OSError:
                    pass


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def corral(tmp_path: Path) -> Iterator[Callable[..., Corral]]:
    made: list[Corral] = []

    def make(*run_args: str, config: str | None = None, env: dict[str, str] | None = None,
             wait: bool = True, name: str = "c", stdout: int | None = None,
             prefix: Sequence[str] = (), pass_fds: Sequence[int] = ()) -> Corral:
        c = Corral(tmp_path, name)
        made.append(c)
        args = list(run_args)
        if config is not None:
            path = tmp_path / f"{name}.toml"
            path.write_text(config)
            args = ["-c", str(path), *args]
        return c.start(args, env=env, wait=wait, stdout=stdout, prefix=prefix,
                       pass_fds=pass_fds)

    yield make
    for c in made:
        c.cleanup()
