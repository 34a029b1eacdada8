"""A pool's first fork workers come from a single-threaded start template (corral._template):
they are the supervisor's own children all the same, and a template that fails falls back."""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing.process
import multiprocessing.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import template_workers
from _helpers import pool, start_supervisor_script, wait_gone

from corral import _forkchild, _template
from corral.events import EventKind, StopReason
from corral.exitstatus import ExitStatus
from support import wait_for

pytestmark = [pytest.mark.timeout(60), pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning")]

N = 6

needs_template = pytest.mark.skipif(_template.unavailable() is not None,
                                    reason=f"no start template here: {_template.unavailable()}")


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, str | None]]]:
    """Every fork_batch call: (how many processes, the reason it failed or None)."""
    calls: list[tuple[int, str | None]] = []
    real = _template.fork_batch

    def spy(procs: Any, take: Any, prepare: Any = None) -> str | None:
        reason = real(procs, take, prepare)
        calls.append((len(procs), reason))
        return reason

    monkeypatch.setattr(_template, "fork_batch", spy)
    yield calls


def _back(batches: list[tuple[int, str | None]]) -> list[tuple[int, str | None]]:
    """``batches`` once a fork_batch call has returned: the workers run (and report) before the
    spawner thread has their batch back."""
    wait_for(lambda: batches, 30, "the template's batch to come back")
    return batches


def _reports(outdir: Path, n: int) -> dict[int, dict[str, Any]]:
    paths = [outdir / f"worker-{i}.json" for i in range(n)]
    wait_for(lambda: all(p.exists() for p in paths), 30, f"{n} worker reports")
    return {i: json.loads(p.read_text()) for i, p in enumerate(paths)}


def _wait_pids(sup: Any, reports: dict[int, dict[str, Any]]) -> None:
    """The supervisor knows exactly the processes that reported (it learns of them a moment
    after they run: the spawner hands them over in batches)."""
    want = sorted(r["pid"] for r in reports.values())
    wait_for(lambda: sorted(sup.pids()) == want, 30, f"the supervisor's pids to be {want}")


def _check_children(reports: dict[int, dict[str, Any]]) -> None:
    for r in reports.values():
        assert r["ppid"] == os.getpid(), r  # the supervisor's own child, not the template's
        assert r["pgid"] == r["pid"], r
        assert r["pdeathsig"] == signal.SIGKILL, r
        assert r["glibc"] is None, r  # glibc's thread id and robust list are the worker's
        assert r["blocked"] == [], r  # born with every signal blocked, then unblocked
        # Every fork child's stdin is hidden from multiprocessing (which would close it and
        # open /dev/null again in each worker) and given back before the target runs.
        assert r["stdin"] is not None and r["stdin"][1:] == [False, os.devnull, ""], r
        # Its own stack-dump memfd, and no other (a template's worker replaces the template's
        # with its own, at the number the template registered the handler on).
        assert [d[0] for d in r["dumps"]] == [f"/memfd:corral-dump-{r['index']} (deleted)"], r
        assert r["threads"] == 1, r
    inodes = [d[1] for r in reports.values() for d in r["dumps"]]
    assert len(set(inodes)) == len(inodes), reports


@needs_template
def test_a_pools_first_workers_come_from_the_template_as_the_supervisors_children(
        no_leaks: set[int], tmp_path: Path, batches: list[tuple[int, str | None]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(template_workers, "STATE", "set before start()")
    monkeypatch.setattr(_template, "CHUNK_MIN", 3)  # forked by two processes on two CPUs
    with pool(no_leaks, template_workers.report, workers=N, start_method="fork",
              args=lambda i: (str(tmp_path),)) as (sup, _):
        reports = _reports(tmp_path, N)
        assert _back(batches) == [(N, None)]
        _check_children(reports)
        assert {r["state"] for r in reports.values()} == {"set before start()"}
        assert len({r["pid"] for r in reports.values()}) == N
        _wait_pids(sup, reports)
        # A restart forks from the supervisor as before, and is just as much its child.
        victim = reports[1]["pid"]
        (tmp_path / "worker-1.json").unlink()
        os.kill(victim, signal.SIGKILL)
        again = _reports(tmp_path, N)[1]
        assert again["pid"] != victim
        _check_children({1: again})
        assert len(batches) == 1
        # No fd of the template's (its socket, the pipes it made ahead for its siblings) is
        # left in a worker:
        # each holds the same fds as one forked from the supervisor.
        for r in reports.values():
            assert len(r["fds"]) == len(again["fds"]), (r["fds"], again["fds"])


@needs_template
@pytest.mark.parametrize("chunks", ["one", "per-cpu"])
def test_workers_reported_in_several_groups_hold_only_their_own_pipes(
        no_leaks: set[int], tmp_path: Path, batches: list[tuple[int, str | None]],
        monkeypatch: pytest.MonkeyPatch, chunks: str) -> None:
    # Groups of 2: each forker makes its pipes and reports in three or more rounds.
    monkeypatch.setattr(_template, "_PER_MSG", 2)
    monkeypatch.setattr(_template, "CHUNK_MIN", 10_000 if chunks == "one" else 3)
    n = 7
    with pool(no_leaks, template_workers.report, workers=n, start_method="fork",
              args=lambda i: (str(tmp_path),)) as (sup, _):
        reports = _reports(tmp_path, n)
        assert _back(batches) == [(n, None)]
        _check_children(reports)
        _wait_pids(sup, reports)
        assert len({len(r["fds"]) for r in reports.values()}) == 1, reports


@needs_template
def test_a_template_short_of_fds_forks_in_smaller_groups(no_leaks: set[int],
                                                          tmp_path: Path) -> None:
    # The program's own fds leave room for the pipes of about 15 of the 19 workers the
    # template forks: it makes what fits, forks those, and goes on (it used to give up, and
    # boot as worker 0 with every fd of its limit taken).
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "_template_emfile.py"), str(tmp_path),
         "20", "70"], capture_output=True, timeout=60, cwd=Path(__file__).parent)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    pids = json.loads(proc.stdout)
    no_leaks.update(pids)
    assert len(pids) == 20, (pids, err)
    assert "start template failed" not in err, err
    fds = {json.loads(p.read_text())["fds"] for p in tmp_path.glob("w*.json")}
    assert len(fds) == 1, fds  # worker 0 (the template) holds what the others hold
    wait_gone(pids, 10, "the workers of the stopped pool")


@needs_template
def test_a_pool_inside_a_template_worker_gets_a_fresh_stdin(
        no_leaks: set[int], tmp_path: Path) -> None:
    with pool(no_leaks, template_workers.nested, workers=3, start_method="fork",
              args=lambda i: (str(tmp_path),)):
        inner = tmp_path / "inner.json"
        wait_for(inner.exists, 30, "the inner pool's worker")
        report = json.loads(inner.read_text())
        no_leaks.add(report["pid"])
        # Not the template's stdin (closed by worker 0): a fresh /dev/null of worker 0's.
        assert report["stdin"] == [os.devnull, False], report


@needs_template
@pytest.mark.parametrize("who", [0, 2])  # the template itself, and a worker it forked
def test_a_hung_template_worker_is_dumped_into_its_own_memfd(
        no_leaks: set[int], tmp_path: Path, batches: list[tuple[int, str | None]],
        who: int) -> None:
    with pool(no_leaks, template_workers.hangs, workers=4, start_method="fork",
              args=lambda i: (str(tmp_path), who), heartbeat_timeout=1.0,
              startup_timeout=30, ready_when="beat", kill_grace=0.5) as (sup, log):
        wait_for(lambda: list(tmp_path.glob("hanging-*")), 30, "the hang")
        hung = int(next(tmp_path.glob("hanging-*")).name.split("-")[1])
        no_leaks.add(hung)
        exited = log.wait(lambda ev: [e for e in ev if e.kind is EventKind.EXITED], 30,
                          "the hung worker's exit")
        record = exited[0].exit
        assert batches == [(4, None)]
        assert record is not None and record.pid == hung, record
        assert record.reason is StopReason.HUNG, record
        detail = record.detail or ""
        assert "most recent call first" in detail and "in hang_in_template_worker" in detail, (
            detail)
        # Only the hung worker's stack: no other worker's (a shared memfd would mix them).
        assert detail.count("in hang_in_template_worker") == 1, detail
        sup.stop()


@pytest.mark.parametrize("how", [pytest.param("template", marks=needs_template), "ordinary"])
def test_a_template_without_a_dump_handler_gives_its_workers_none(
        no_leaks: set[int], tmp_path: Path, batches: list[tuple[int, str | None]],
        monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    # Mocked: faulthandler.register cannot be made to fail for a real signal number. The
    # template inherits the patch (a fork of this process); it must then hand out no dump fd,
    # else the supervisor would send a signal that nothing handles and that ends the worker.
    # A worker forked the ordinary way runs without a handler too (it used to die at boot).
    import faulthandler

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("refused by the test")
    monkeypatch.setattr(faulthandler, "register", refuse)
    if how == "ordinary":
        monkeypatch.setenv(_template.OFF_VARIABLE, "0")
    with pool(no_leaks, template_workers.hangs, workers=4, start_method="fork",
              args=lambda i: (str(tmp_path), 2), heartbeat_timeout=1.0,
              startup_timeout=30, ready_when="beat", kill_grace=0.5) as (sup, log):
        wait_for(lambda: list(tmp_path.glob("hanging-*")), 30, "the hang")
        hung = int(next(tmp_path.glob("hanging-*")).name.split("-")[1])
        no_leaks.add(hung)
        exited = log.wait(lambda ev: [e for e in ev if e.kind is EventKind.EXITED], 30,
                          "the hung worker's exit")
        record = exited[0].exit
        assert batches == ([(4, None)] if how == "template" else [])
        assert record is not None and record.pid == hung, record
        assert record.reason is StopReason.HUNG, record
        assert "no stack dump: the worker has no dump handler" in (record.detail or ""), record
        assert record.exit.signal in (signal.SIGTERM, signal.SIGKILL), record
        sup.stop()


_FD0_SCRIPT = """
import sys
import corral, template_workers
sup = corral.Supervisor(template_workers.fd0, workers=4, start_method="fork",
                        args=lambda i: (sys.argv[1],))
sup.start()
print("started", flush=True)
sys.stdin.readline()  # the test's go: its pipe, still the supervisor's
sup.stop()
"""


@needs_template
def test_fork_workers_fd_0_is_dev_null_not_the_supervisors_stdin(
        no_leaks: set[int], tmp_path: Path) -> None:
    # A subprocess a worker starts inherits fd 0: it must not read the supervisor's pipe.
    proc = subprocess.Popen([sys.executable, "-c", _FD0_SCRIPT, str(tmp_path)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            cwd=Path(template_workers.__file__).parent)
    no_leaks.add(proc.pid)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        def reports(n: int) -> dict[int, str] | None:
            got = {int(f.name.split("-")[1]): f.read_text() for f in tmp_path.glob("fd0-*")}
            return got if len(got) == n else None
        first = wait_for(lambda: reports(4), 30, "the 4 template workers' reports")
        no_leaks.update(first)
        os.kill(min(first), signal.SIGKILL)  # its replacement is forked by the spawner
        after = wait_for(lambda: reports(5), 30, "the replacement's report")
        no_leaks.update(after)
        assert set(after.values()) == {os.devnull}, after
        assert os.readlink(f"/proc/{proc.pid}/fd/0").startswith("pipe:")
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdin.close()
        proc.stdout.close()


@needs_template
def test_template_workers_are_reaped_with_their_exit_statuses(
        no_leaks: set[int], tmp_path: Path, batches: list[tuple[int, str | None]]) -> None:
    with pool(no_leaks, template_workers.report, workers=N, start_method="fork",
              restart="never", args=lambda i: (str(tmp_path), 10 + i)) as (sup, _):
        reports = _reports(tmp_path, N)
        assert _back(batches) == [(N, None)]
        os.kill(reports[0]["pid"], signal.SIGTERM)  # before "go": killed by the signal
        wait_for(lambda: any(r.pid == reports[0]["pid"] for r in sup.history()), 30,
                 "worker 0's exit")
        (tmp_path / "go").write_text("")
        wait_for(lambda: len(sup.history()) == N, 30, "every exit")
        by_index = {r.index: r for r in sup.history()}
        assert by_index[0].exit == ExitStatus(signal=signal.SIGTERM)
        assert by_index[0].reason is StopReason.KILLED
        for i in range(1, N):
            assert by_index[i].pid == reports[i]["pid"]
            assert by_index[i].exit == ExitStatus(code=10 + i), by_index[i]
            assert by_index[i].reason is StopReason.EXITED


@needs_template
def test_template_workers_die_with_a_killed_supervisor(no_leaks: set[int]) -> None:
    proc, pids = start_supervisor_script("fork", N)
    no_leaks.update([proc.pid, *pids])
    try:
        assert len(pids) == N
        for pid in pids:  # the script's children, not a template's
            with open(f"/proc/{pid}/stat", "rb") as fh:
                assert int(fh.read().rsplit(b")", 1)[1].split()[1]) == proc.pid
        proc.kill()
        proc.wait(10)
        wait_gone(pids, 10, "workers after their supervisor's SIGKILL")
    finally:
        assert proc.stdout is not None
        proc.stdout.close()


@needs_template
@pytest.mark.parametrize("chunks", ["one", "per-cpu"])
def test_a_template_that_fails_half_way_falls_back_to_ordinary_forks(
        no_leaks: set[int], tmp_path: Path, batches: list[tuple[int, str | None]],
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        chunks: str) -> None:
    # One forking process, or one per CPU (two chunks of three workers on two CPUs).
    monkeypatch.setattr(_template, "CHUNK_MIN", 10_000 if chunks == "one" else 3)
    real = _template._clone
    made = [0]

    def clone(facts: Any) -> int:  # (in the template, and in a helper that forks a chunk)
        if made[0] == 2:
            raise OSError(11, "injected: the template cannot fork")
        made[0] += 1
        return real(facts)

    monkeypatch.setattr(_template, "_clone", clone)
    caplog.set_level(logging.WARNING, logger="corral")
    with pool(no_leaks, template_workers.report, workers=N, start_method="fork",
              args=lambda i: (str(tmp_path),)) as (sup, _):
        reports = _reports(tmp_path, N)
        assert len(batches) == 1 and batches[0][1] is not None
        assert "start template failed (a fork failed" in caplog.text, caplog.text
        _check_children(reports)
        _wait_pids(sup, reports)


def _hang_after_second_clone(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Make the template hang right after its second clone, which it never reports (its pid
    goes to the file returned), and give up on a silent template after 1 s."""
    monkeypatch.setattr(_template, "TIMEOUT", 1.0)
    real = _template._clone
    made = [0]
    unreported = tmp_path / "unreported"

    def clone(facts: Any) -> int:
        pid = real(facts)
        if pid:
            made[0] += 1
            if made[0] == 2:  # forked, never reported: the template hangs
                unreported.write_text(str(pid))
                time.sleep(3600)
        return pid

    monkeypatch.setattr(_template, "_clone", clone)
    return unreported


@needs_template
def test_a_silent_template_is_killed_and_what_it_forked_unreported_is_swept(
        no_leaks: set[int], tmp_path: Path, batches: list[tuple[int, str | None]],
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(_template, "CHUNK_MIN", 10_000)  # one forking process: deterministic
    unreported = _hang_after_second_clone(monkeypatch, tmp_path)
    caplog.set_level(logging.WARNING, logger="corral")
    began = time.monotonic()
    with pool(no_leaks, template_workers.report, workers=N, start_method="fork",
              args=lambda i: (str(tmp_path),)) as (sup, _):
        reports = _reports(tmp_path, N)
        assert time.monotonic() - began < 30
        assert len(batches) == 1 and "no word from the template" in (batches[0][1] or "")
        orphan = int(unreported.read_text())
        no_leaks.add(orphan)
        assert "a start template that did not finish" in caplog.text, caplog.text
        assert f"killing pid {orphan}, forked by a failed" in caplog.text, caplog.text
        wait_gone([orphan], 10, "the unreported worker")
        assert orphan not in sup.pids()
        _check_children(reports)
        _wait_pids(sup, reports)


@needs_template
def test_a_failed_templates_sweep_spares_what_its_thread_had_forked_before(
        no_leaks: set[int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # fork_batch reads its thread's children before the template's fork only on a thread that
    # has forked before (a pool's new spawner thread has none): here one has, and that child
    # must outlive the sweep of a template that hangs with one clone unreported.
    import multiprocessing
    import threading

    from corral.process import forked_here, forking

    unreported = _hang_after_second_clone(monkeypatch, tmp_path)
    caplog.set_level(logging.WARNING, logger="corral")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=time.sleep, args=(60,)) for _ in range(4)]
    taken: list[int] = []
    out: dict[str, Any] = {}

    def on_a_thread() -> None:
        out["fresh"] = forked_here()
        with forking():
            earlier = os.fork()
        if earlier == 0:
            time.sleep(60)
            os._exit(0)
        out["earlier"] = earlier
        out["forked"] = forked_here()
        out["reason"] = _template.fork_batch(procs, lambda i, p: taken.append(p.pid))

    thread = threading.Thread(target=on_a_thread)
    thread.start()
    thread.join(30)
    try:
        assert not thread.is_alive()
        assert out["fresh"] is False and out["forked"] is True
        assert "no word from the template" in (out["reason"] or "")
        orphan = int(unreported.read_text())
        no_leaks.add(orphan)
        wait_gone([orphan], 10, "the unreported clone")
        os.kill(out["earlier"], 0)  # still there: not swept
        assert f"killing pid {out['earlier']}" not in caplog.text, caplog.text
    finally:
        for pid in [out.get("earlier"), *taken]:
            if pid:
                no_leaks.add(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)


def test_spawn_and_forkserver_pools_use_no_template(
        no_leaks: set[int], tmp_path: Path, batches: list[tuple[int, str | None]]) -> None:
    with pool(no_leaks, template_workers.report, workers=3, start_method="spawn",
              args=lambda i: (str(tmp_path),)):
        _reports(tmp_path, 3)
    assert batches == []


@pytest.mark.parametrize("why", ["unavailable", "turned off"])
def test_without_a_template_every_worker_is_forked_the_ordinary_way(
        why: str, no_leaks: set[int], tmp_path: Path, batches: list[tuple[int, str | None]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    if why == "unavailable":
        monkeypatch.setattr(_template, "unavailable", lambda: "not on this machine (test)")
    else:  # the escape hatch, CORRAL_START_TEMPLATE=0
        monkeypatch.setenv(_template.OFF_VARIABLE, "0")
        assert _template.unavailable() == f"turned off by {_template.OFF_VARIABLE}=0"
    with pool(no_leaks, template_workers.report, workers=4, start_method="fork",
              args=lambda i: (str(tmp_path),)) as (sup, _):
        reports = _reports(tmp_path, 4)
        assert batches == []
        _check_children(reports)
        _wait_pids(sup, reports)


@pytest.mark.parametrize("how", ["template", "template, multiprocessing's bootstrap",
                                 "ordinary fork"])
def test_a_template_worker_ends_as_a_multiprocessing_fork_child_does(
        how: str, no_leaks: set[int], tmp_path: Path, batches: list[tuple[int, str | None]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The template runs its workers' bootstrap itself (corral._forkchild): the same process
    facts, exit codes, stderr and atexit handlers as multiprocessing's fork Popen gives (which
    runs the child's atexit handlers from Python 3.13 on, and never before); so does the
    fallback to multiprocessing's own bootstrap (on a Python corral's was not checked on)."""
    if how.startswith("template") and _template.unavailable() is not None:
        pytest.skip(f"no start template here: {_template.unavailable()}")
    if how == "ordinary fork":
        monkeypatch.setenv(_template.OFF_VARIABLE, "0")
    if how == "template, multiprocessing's bootstrap":
        monkeypatch.setattr(_forkchild, "_OWN_BOOTSTRAP", False)
    elif how == "template":
        assert _forkchild._OWN_BOOTSTRAP  # every Python corral is tested on
    # Two chunks: worker 2 forks worker 3 before it runs (a chunk's first worker's path).
    monkeypatch.setattr(_template, "CHUNK_MIN", 2)
    monkeypatch.setattr(_template, "usable_cpus", lambda: 2)
    n = 4
    with pool(no_leaks, template_workers.ends, workers=n, start_method="fork",
              restart="never", args=lambda i: (str(tmp_path),)) as (sup, _):
        wait_for(lambda: len(sup.history()) == n, 30, "every worker's exit")
        codes = {r.index: r.exit for r in sup.history()}
    assert batches == ([(n, None)] if how.startswith("template") else [])
    assert codes == {0: ExitStatus(code=0), 1: ExitStatus(code=7), 2: ExitStatus(code=1),
                     3: ExitStatus(code=1)}
    for i in range(n):
        facts = json.loads((tmp_path / f"mp-{i}.json").read_text())
        assert facts == {"name": facts["name"], "pid": True, "parent": os.getpid(),
                         "parent_alive": True, "children": 0}, facts
        assert facts["name"].endswith(f"-{i}"), facts
        assert (tmp_path / f"atexit-{i}").exists() == (sys.version_info >= (3, 13)), i
    stderr = {i: (tmp_path / f"stderr-{i}").read_text() for i in range(n)}
    assert stderr[0] == stderr[1] == "", stderr
    assert stderr[2] == "bye\n", stderr
    assert stderr[3].startswith("Process "), stderr
    assert "ValueError: a worker's own error" in stderr[3], stderr


@pytest.mark.parametrize("how", ["template", "template, bootstrap patched", "ordinary fork"])
def test_a_template_worker_whose_exit_function_raises_exits_as_multiprocessing_says(
        how: str, no_leaks: set[int], tmp_path: Path, batches: list[tuple[int, str | None]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """multiprocessing's exit function raising after the target ended: exit code 1 on Python
    3.11/3.12 (the bootstrap calls it), the target's own from 3.13 (an atexit handler, whose
    error is printed); and a bootstrap wrapped by a tool (as coverage.py does) is the one
    that runs."""
    if how.startswith("template") and _template.unavailable() is not None:
        pytest.skip(f"no start template here: {_template.unavailable()}")
    if how == "ordinary fork":
        monkeypatch.setenv(_template.OFF_VARIABLE, "0")
    real_bootstrap = multiprocessing.process.BaseProcess._bootstrap  # type: ignore[attr-defined]
    if how == "template, bootstrap patched":
        def wrapped(self: Any, *args: Any, **kwargs: Any) -> int:
            (tmp_path / f"wrapped-{os.getpid()}").write_text("")
            return int(real_bootstrap(self, *args, **kwargs))

        monkeypatch.setattr(multiprocessing.process.BaseProcess, "_bootstrap", wrapped)

    def failing_exit() -> None:
        raise RuntimeError("the exit function failed")

    monkeypatch.setattr(multiprocessing.util, "_exit_function", failing_exit)
    n = 3
    with pool(no_leaks, template_workers.ends, workers=n, start_method="fork",
              restart="never", args=lambda i: (str(tmp_path),)) as (sup, _):
        wait_for(lambda: len(sup.history()) == n, 30, "every worker's exit")
        exits = {r.index: r.exit for r in sup.history()}
        pids = {r.index: r.pid for r in sup.history()}
    assert batches == ([(n, None)] if how.startswith("template") else [])
    if sys.version_info >= (3, 13):
        want = {0: ExitStatus(code=0), 1: ExitStatus(code=7), 2: ExitStatus(code=1)}
    else:  # its error replaces the run's outcome, SystemExit included
        want = {0: ExitStatus(code=1), 1: ExitStatus(code=1), 2: ExitStatus(code=1)}
    assert exits == want, exits
    wrapped_in = {int(p.name.split("-")[1]) for p in tmp_path.glob("wrapped-*")}
    assert wrapped_in == (set(pids.values()) if how == "template, bootstrap patched" else set())
    if sys.version_info < (3, 13):  # (from 3.13 the atexit report is left in stderr's buffer)
        assert "the exit function failed" in (tmp_path / "stderr-0").read_text()


@needs_template
def test_a_template_worker_with_an_exit_code_out_of_range_ends_there(
        no_leaks: set[int], tmp_path: Path, batches: list[tuple[int, str | None]]) -> None:
    """``sys.exit(2**40)`` in a worker: ``os._exit`` refuses the code; the worker still ends
    there (status 1). Unwinding into its forker's code instead, it would run the template's
    loop (before, that loop failed on the worker's closed socket): boot again as worker 0,
    which never exits, and fork processes the pool does not know (no_leaks finds those)."""
    n = 4
    with pool(no_leaks, template_workers.exits_huge, workers=n, start_method="fork",
              restart="never", args=lambda i: (str(tmp_path),)) as (sup, _):
        wait_for(lambda: len(sup.history()) == 1, 30, "worker 1's exit")
        wait_for(lambda: len(list(tmp_path.glob("ran-*"))) >= n, 30, "every worker's start")
        assert batches == [(n, None)]
        assert sup.history()[0].index == 1
        assert sup.history()[0].exit == ExitStatus(code=1)
        ran = sorted(p.name.split("-")[1] for p in tmp_path.glob("ran-*"))
        assert ran == [str(i) for i in range(n)], ran
