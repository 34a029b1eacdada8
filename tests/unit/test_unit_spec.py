"""PoolSpec: validation of every parameter, picklability per start method, derived values."""

from __future__ import annotations

import dataclasses
import functools
import math
import signal
import sys
import threading
import types
from collections.abc import Callable
from typing import Any

import pytest

import corral
from corral.errors import NotPicklable
from corral.policy import Backoff, RestartBudget, RestartPolicy
from corral.spec import PoolSpec, check_picklable

pytestmark = pytest.mark.timeout(10)

PICKLING = ("spawn", "forkserver")


def work(index: int, *args: Any) -> None:
    """A module-level target: picklable by reference."""


def args_pair(index: int) -> tuple[Any, ...]:
    return (index, f"x{index}")


def args_list(index: int) -> Any:
    return [index]


def args_single(index: int) -> Any:
    return index


def args_unpicklable(index: int) -> tuple[Any, ...]:
    return (index, threading.Lock())


def args_lambda(index: int) -> tuple[Any, ...]:
    return (lambda: index,)


def name_int(index: int) -> Any:
    return index


def name_fancy(index: int) -> str:
    return f"shard-{index:02d}"


class CallableWorker:
    def __call__(self, index: int) -> None:
        pass


def _make_closure() -> Callable[[int], None]:
    captured = 3

    def inner(index: int) -> None:
        print(captured)

    return inner


def _make_nested() -> Callable[[int], None]:
    def nested(index: int) -> None:
        pass

    return nested


_UNPICKLABLE_TARGETS: dict[str, Callable[..., Any]] = {
    "lambda": lambda index: None,
    "closure": _make_closure(),
    "nested": _make_nested(),
    "partial-of-lambda": functools.partial(lambda index, x: None, x=1),
}


# --- defaults and normalisation -----------------------------------------------------------------


def test_defaults() -> None:
    spec = PoolSpec(work)
    assert spec.workers == 1
    assert spec.name == "work"  # from the target
    assert spec.start_method == "forkserver"
    assert spec.restart is RestartPolicy.ALWAYS
    assert spec.restart_policy is RestartPolicy.ALWAYS
    assert spec.backoff == Backoff()
    assert spec.budget == RestartBudget()
    assert spec.stop_signal is signal.SIGTERM
    assert spec.heartbeat_timeout is None
    assert spec.startup_timeout is None
    assert spec.ready_when == "started"
    assert spec.daemon is False


def test_normalises_restart_and_stop_signal() -> None:
    spec = PoolSpec(work, restart="on_failure", stop_signal=int(signal.SIGINT), name="p")
    assert spec.restart is RestartPolicy.ON_FAILURE
    assert spec.restart_policy is RestartPolicy.ON_FAILURE
    assert spec.stop_signal is signal.SIGINT
    assert isinstance(spec.stop_signal, signal.Signals)
    assert spec.name == "p"


def test_name_falls_back_when_target_has_no_name() -> None:
    assert PoolSpec(CallableWorker()).name == "pool"


def test_accepts_edge_values() -> None:
    PoolSpec(work, workers=0, stop_timeout=0, kill_grace=0, heartbeat_timeout=0.001,
             startup_timeout=1e6, ready_when="beat", daemon=True, restart=RestartPolicy.NEVER,
             backoff=Backoff(initial=0, cap=0), budget=RestartBudget(max_restarts=None))
    for method in ("fork", "spawn", "forkserver"):
        PoolSpec(work, start_method=method)
    for ready_when in ("started", "ready", "beat"):
        PoolSpec(work, ready_when=ready_when)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1):
        assert PoolSpec(work, stop_signal=sig).stop_signal is sig


def test_spec_is_frozen() -> None:
    spec = PoolSpec(work, workers=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.workers = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.target = print  # type: ignore[misc]
    assert spec.workers == 2


def test_replace_revalidates() -> None:
    spec = PoolSpec(work, workers=2)
    assert dataclasses.replace(spec, workers=5).workers == 5
    with pytest.raises(ValueError, match=r"^workers must be >= 0"):
        dataclasses.replace(spec, workers=-1)


# --- validation: every parameter names itself ---------------------------------------------------


@pytest.mark.parametrize(("kwargs", "exc", "pattern"), [
    ({"workers": -1}, ValueError, r"^workers must be >= 0, got -1"),
    ({"workers": "3"}, TypeError, r"^workers must be an int, got '3' \(str\)"),
    ({"workers": True}, TypeError, r"^workers must be an int, got True \(bool\)"),
    ({"workers": 2.0}, TypeError, r"^workers must be an int"),
    ({"workers": None}, TypeError, r"^workers must be an int"),
    ({"args": (1, 2)}, TypeError, r"^args must be a callable or None"),
    ({"names": "w"}, TypeError, r"^names must be a callable or None"),
    ({"name": 3}, TypeError, r"^name must be a str"),
    ({"name": None}, TypeError, r"^name must be a str"),
    ({"start_method": "thread"}, ValueError,
     r"^start_method must be one of 'fork', 'spawn', 'forkserver', got 'thread'"),
    ({"start_method": "Fork"}, ValueError, r"^start_method must be one of"),
    ({"start_method": None}, ValueError, r"^start_method must be one of"),
    ({"restart": "sometimes"}, ValueError, r"^restart must be one of .*got 'sometimes'"),
    ({"restart": None}, ValueError, r"^restart must be one of"),
    ({"restart": True}, ValueError, r"^restart must be one of"),
    ({"backoff": {"initial": 1.0}}, TypeError, r"^backoff must be a corral\.Backoff"),
    ({"backoff": None}, TypeError, r"^backoff must be a corral\.Backoff"),
    ({"budget": {"max_restarts": 3}}, TypeError, r"^budget must be a corral\.RestartBudget"),
    ({"budget": 5}, TypeError, r"^budget must be a corral\.RestartBudget"),
    ({"stop_signal": signal.SIGKILL}, ValueError,
     r"^stop_signal must be catchable \(not SIGKILL\)"),
    ({"stop_signal": signal.SIGSTOP}, ValueError, r"^stop_signal must be catchable"),
    ({"stop_signal": signal.SIGCONT}, ValueError, r"^stop_signal must be catchable"),
    ({"stop_signal": signal.SIGCHLD}, ValueError, r"^stop_signal must be catchable"),
    ({"stop_signal": 9}, ValueError, r"^stop_signal must be catchable \(not SIGKILL\)"),
    ({"stop_signal": 99999}, ValueError, r"^stop_signal must be a valid signal, got 99999"),
    ({"stop_signal": 0}, ValueError, r"^stop_signal must be a valid signal, got 0"),
    ({"stop_signal": -15}, ValueError, r"^stop_signal must be a valid signal"),
    ({"stop_signal": "SIGTERM"}, TypeError, r"^stop_signal must be a signal number"),
    ({"stop_signal": True}, TypeError, r"^stop_signal must be a signal number"),
    ({"stop_signal": 15.0}, TypeError, r"^stop_signal must be a signal number"),
    ({"stop_timeout": -1}, ValueError, r"^stop_timeout must be >= 0, got -1"),
    ({"stop_timeout": math.nan}, ValueError, r"^stop_timeout must be a finite number"),
    ({"stop_timeout": math.inf}, ValueError, r"^stop_timeout must be a finite number"),
    ({"stop_timeout": "5"}, TypeError, r"^stop_timeout must be a number"),
    ({"stop_timeout": None}, TypeError, r"^stop_timeout must be a number"),
    ({"stop_timeout": False}, TypeError, r"^stop_timeout must be a number"),
    ({"heartbeat_timeout": 0}, ValueError, r"^heartbeat_timeout must be > 0, got 0"),
    ({"heartbeat_timeout": -1.0}, ValueError, r"^heartbeat_timeout must be > 0"),
    ({"heartbeat_timeout": math.nan}, ValueError, r"^heartbeat_timeout must be a finite"),
    ({"heartbeat_timeout": math.inf}, ValueError, r"^heartbeat_timeout must be a finite"),
    ({"heartbeat_timeout": "1"}, TypeError, r"^heartbeat_timeout must be a number"),
    ({"heartbeat_timeout": True}, TypeError, r"^heartbeat_timeout must be a number"),
    ({"startup_timeout": 0}, ValueError, r"^startup_timeout must be > 0"),
    ({"startup_timeout": -3}, ValueError, r"^startup_timeout must be > 0"),
    ({"startup_timeout": [1]}, TypeError, r"^startup_timeout must be a number"),
    ({"ready_when": "x"}, ValueError,
     r"^ready_when must be one of 'started', 'ready', 'beat', got 'x'"),
    ({"ready_when": None}, ValueError, r"^ready_when must be one of"),
    ({"kill_grace": -0.5}, ValueError, r"^kill_grace must be >= 0"),
    ({"kill_grace": math.nan}, ValueError, r"^kill_grace must be a finite number"),
    ({"kill_grace": "1"}, TypeError, r"^kill_grace must be a number"),
    ({"daemon": 1}, TypeError, r"^daemon must be a bool, got 1 \(int\)"),
    ({"daemon": None}, TypeError, r"^daemon must be a bool"),
], ids=lambda x: repr(x) if isinstance(x, dict) else "")
def test_rejects_bad_parameter(kwargs: dict[str, Any], exc: type[Exception],
                               pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        PoolSpec(work, **kwargs)


@pytest.mark.parametrize("target", [3, "work", ("work",)])
def test_rejects_non_callable_target(target: object) -> None:
    with pytest.raises(TypeError, match=r"^target must be a callable, got"):
        PoolSpec(target)  # type: ignore[arg-type]


def test_needs_a_target_or_a_command() -> None:
    with pytest.raises(TypeError, match=r"needs a target \(a callable\) or a command"):
        PoolSpec(None)
    with pytest.raises(TypeError, match="either target or command"):
        PoolSpec(work, command=["true"])


@pytest.mark.parametrize("command", ["sleep 1", [], ["sleep", 1], [b"sleep"]])
def test_rejects_a_bad_command(command: object) -> None:
    with pytest.raises(TypeError, match=r"^command must be a non-empty list of str"):
        PoolSpec(command=command)  # type: ignore[arg-type]


def test_command_options() -> None:
    spec = PoolSpec(command=["sleep", "10"], env={"A": "1"}, cwd="/", umask=0o22)
    assert spec.command == ("sleep", "10") and spec.name == "sleep" and spec.env == {"A": "1"}
    with pytest.raises(TypeError, match="env must be a mapping of str to str"):
        PoolSpec(command=["true"], env={"A": 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="umask must be in"):
        PoolSpec(command=["true"], umask=0o1777)
    spec = PoolSpec(work, cwd="/", env={"A": "1"}, umask=0o77, user="nobody")
    assert (spec.cwd, spec.env, spec.umask, spec.user) == ("/", {"A": "1"}, 0o77, "nobody")
    with pytest.raises(TypeError, match="user must be a name, an id or None"):
        PoolSpec(work, user=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="does not apply with backend='ray'"):
        PoolSpec(work, backend="ray", cwd="/")


def test_target_settings_are_resolved_and_checked_up_front(tmp_path: Any) -> None:
    from corral._identity import worker_settings

    assert worker_settings(PoolSpec(work)) is None
    s = worker_settings(PoolSpec(work, cwd=str(tmp_path), env={"A": "1"}, umask=0o27))
    assert s is not None and (s.cwd, s.env, s.umask, s.uid) == (str(tmp_path), {"A": "1"},
                                                                 0o27, None)
    with pytest.raises(ValueError, match="cwd must be an existing directory"):
        corral.Supervisor(work, workers=1, cwd=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="user must name a user of this system"):
        corral.Supervisor(work, workers=1, user="no-such-user-here")
    with pytest.raises(ValueError, match="group must name a group of this system"):
        corral.Supervisor(work, workers=1, group="no-such-group-here")


def test_validation_errors_are_not_notpicklable() -> None:
    # NotPicklable is a TypeError too; plain type errors must not be mistaken for it.
    with pytest.raises(TypeError) as info:
        PoolSpec(work, workers="3")  # type: ignore[arg-type]
    assert not isinstance(info.value, NotPicklable)


# --- picklability -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", PICKLING)
@pytest.mark.parametrize("kind", list(_UNPICKLABLE_TARGETS))
def test_unpicklable_target_raises_notpicklable(method: str, kind: str) -> None:
    target = _UNPICKLABLE_TARGETS[kind]
    with pytest.raises(NotPicklable) as info:
        PoolSpec(target, start_method=method)
    err = info.value
    assert isinstance(err, TypeError)
    assert isinstance(err, corral.CorralError)
    assert corral.NotPicklable is NotPicklable
    msg = str(err)
    assert msg.startswith("target ")
    assert f"start_method={method!r}" in msg
    assert "module-level function" in msg
    assert "start_method='fork'" in msg
    assert err.__cause__ is not None  # the pickling error is kept


def test_notpicklable_message_names_the_function() -> None:
    with pytest.raises(NotPicklable, match=r"_make_closure\.<locals>\.inner"):
        PoolSpec(_UNPICKLABLE_TARGETS["closure"], start_method="spawn")
    with pytest.raises(NotPicklable, match=r"<lambda>"):
        PoolSpec(_UNPICKLABLE_TARGETS["lambda"], start_method="forkserver")


def test_default_start_method_checks_picklability() -> None:
    with pytest.raises(NotPicklable):
        PoolSpec(lambda index: None)


@pytest.mark.parametrize("kind", list(_UNPICKLABLE_TARGETS))
def test_unpicklable_target_accepted_under_fork(kind: str) -> None:
    target = _UNPICKLABLE_TARGETS[kind]
    spec = PoolSpec(target, start_method="fork")
    assert spec.target is target


@pytest.mark.parametrize("method", PICKLING)
def test_picklable_targets_accepted(method: str) -> None:
    PoolSpec(work, start_method=method)
    PoolSpec(CallableWorker(), start_method=method)
    PoolSpec(functools.partial(work, 1), start_method=method)
    PoolSpec(print, start_method=method)


@pytest.mark.parametrize("method", PICKLING)
def test_target_from_interactive_main_raises(method: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # A function pickles by reference to __main__, but a REPL's __main__ has no file that a
    # spawn/forkserver child could import.
    fake_main = types.ModuleType("__main__")
    fn = types.FunctionType(work.__code__, {}, "repl_worker")
    fn.__module__ = "__main__"
    fn.__qualname__ = "repl_worker"
    fake_main.repl_worker = fn  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "__main__", fake_main)
    with pytest.raises(NotPicklable, match=r"interactive __main__") as info:
        PoolSpec(fn, start_method=method)
    assert "start_method='fork'" in str(info.value)
    PoolSpec(fn, start_method="fork")  # fine: nothing is imported by the child
    fake_main.__file__ = "/srv/app/main.py"
    PoolSpec(fn, start_method=method)  # a script's __main__ is importable by spawn


def test_check_picklable_directly() -> None:
    check_picklable("x", threading.Lock(), "fork")  # skipped under fork
    with pytest.raises(NotPicklable, match=r"^x <unlocked _thread\.lock object"):
        check_picklable("x", threading.Lock(), "spawn")


# --- worker_args / worker_name ------------------------------------------------------------------


def test_worker_args() -> None:
    assert PoolSpec(work).worker_args(3) == ()
    assert PoolSpec(work, args=args_pair, start_method="spawn").worker_args(2) == (2, "x2")


@pytest.mark.parametrize("fn", [args_list, args_single])
def test_worker_args_must_be_a_tuple(fn: Callable[[int], Any]) -> None:
    spec = PoolSpec(work, args=fn, start_method="fork")
    with pytest.raises(TypeError, match=r"^args\(5\) must return a tuple") as info:
        spec.worker_args(5)
    assert "(value,)" in str(info.value)


@pytest.mark.parametrize("method", PICKLING)
@pytest.mark.parametrize("fn", [args_unpicklable, args_lambda])
def test_worker_args_unpicklable_under_spawn(method: str, fn: Callable[[int], Any]) -> None:
    spec = PoolSpec(work, args=fn, start_method=method)
    with pytest.raises(NotPicklable, match=r"^args\(4\) ") as info:
        spec.worker_args(4)
    assert f"start_method={method!r}" in str(info.value)


@pytest.mark.parametrize("fn", [args_unpicklable, args_lambda])
def test_worker_args_unpicklable_fine_under_fork(fn: Callable[[int], Any]) -> None:
    args = PoolSpec(work, args=fn, start_method="fork").worker_args(4)
    assert isinstance(args, tuple)
    assert len(args) in (1, 2)


def test_worker_name() -> None:
    assert PoolSpec(work).worker_name(0) == "work-0"
    assert PoolSpec(work, name="web").worker_name(12) == "web-12"
    assert PoolSpec(work, names=name_fancy).worker_name(7) == "shard-07"


def test_worker_name_must_be_str() -> None:
    spec = PoolSpec(work, names=name_int)
    with pytest.raises(TypeError, match=r"^names\(3\) must return a str, got 3"):
        spec.worker_name(3)


def test_backend_and_ray_options_are_validated() -> None:
    with pytest.raises(ValueError, match="backend"):
        PoolSpec(work, backend="dask")
    with pytest.raises(ValueError, match="ray_options go with backend='ray'"):
        PoolSpec(work, ray_options={"num_cpus": 1})
    with pytest.raises(ValueError, match="not commands"):
        PoolSpec(command=["true"], backend="ray")
    with pytest.raises(ValueError, match="standby_init"):
        PoolSpec(work, backend="ray", standby=1, standby_init="os:getpid")
    spec = PoolSpec(work, backend="ray", standby=1, ray_options={"num_cpus": 0.5})
    assert spec.standby == 1 and spec.ray_options == {"num_cpus": 0.5}
    with pytest.raises((TypeError, ValueError), match="ray_options"):
        PoolSpec(work, backend="ray", ray_options={"max_restarts": 3})


HUGE = 10**400  # an int past any float: math.isnan() on it raises OverflowError


@pytest.mark.parametrize(("name", "make"), [
    ("stop_timeout", lambda: corral.Supervisor(work, stop_timeout=HUGE)),
    ("heartbeat_timeout", lambda: corral.Supervisor(work, heartbeat_timeout=-HUGE)),
    ("restart_timeout", lambda: corral.WorkerProcessManager(work, 1, restart_timeout=HUGE)),
    ("process_stop_timeout",
     lambda: corral.WorkerProcessManager(work, 1, process_stop_timeout=HUGE)),
    ("heartbeat_timeout", lambda: corral.HeartbeatHealthCheck(HUGE)),
    ("stop_timeout", lambda: corral.ProcessPool(1, stop_timeout=HUGE)),
    ("memory_check_interval", lambda: corral.ProcessPool(1, memory_check_interval=HUGE)),
    ("Backoff.initial", lambda: Backoff(initial=HUGE)),
    ("RestartBudget.window", lambda: RestartBudget(window=HUGE)),
], ids=lambda x: x if isinstance(x, str) else "")
def test_an_int_past_any_float_is_a_value_error_naming_the_parameter(
        name: str, make: Callable[[], object]) -> None:
    with pytest.raises(ValueError, match=rf"^{name} must be a finite number, got an int of "
                                         r"1329 bits$"):
        make()


def test_an_int_past_any_float_means_no_limit_where_inf_does() -> None:
    assert Backoff(reset_after=HUGE).reset_after == HUGE
    assert Backoff(reset_after=math.inf).reset_after == math.inf
