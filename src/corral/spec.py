"""Frozen, validated configuration of a pool: what to run, how many, and the policies.

Every field is checked in ``__post_init__``; a bad value raises TypeError/ValueError naming the
field, what was expected and what was given, before any process exists.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from corral import _validate as v
from corral.errors import NotPicklable
from corral.policy import Backoff, RestartBudget, RestartPolicy, Strategy

__all__ = ["READY_WHEN", "START_METHODS", "PoolSpec", "check_picklable"]

START_METHODS = ("fork", "spawn", "forkserver")
READY_WHEN = ("started", "ready", "beat")

# Signals whose handlers corral's worker bootstrap installs or that the OS will not let us use.
_BAD_STOP_SIGNALS = {signal.SIGKILL, signal.SIGSTOP, signal.SIGCONT, signal.SIGCHLD}


def _describe_callable(fn: Any) -> str:
    qualname = getattr(fn, "__qualname__", None) or repr(fn)
    module = getattr(fn, "__module__", None)
    return f"{module}.{qualname}" if module else str(qualname)


def check_picklable(what: str, value: Any, start_method: str) -> None:
    """Raise :class:`NotPicklable` if ``value`` cannot be sent to a ``start_method`` child.

    Args:
        what: the parameter's name, for the message.
        value: the object to check.
        start_method: "fork" skips the check (nothing is pickled).
    """
    if start_method == "fork":
        return
    try:
        pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # PicklingError, AttributeError, TypeError: all mean the same here
        shown = _describe_callable(value) if callable(value) else repr(value)[:80]
        raise NotPicklable(
            f"{what} {shown} cannot be pickled, which start_method={start_method!r} requires "
            f"({type(exc).__name__}: {exc}). Use a module-level function (not a lambda, closure "
            "or nested function) with picklable arguments, or start_method='fork'."
        ) from exc
    module = getattr(value, "__module__", None)
    if callable(value) and module == "__main__":
        main = sys.modules.get("__main__")
        if main is not None and getattr(main, "__file__", None) is None:
            raise NotPicklable(
                f"{what} {_describe_callable(value)} is defined in an interactive __main__, "
                f"which a start_method={start_method!r} child cannot import. Move it into a "
                "module, or use start_method='fork'."
            )


@dataclass(frozen=True)
class PoolSpec:
    """What a :class:`~corral.Supervisor` runs and how it keeps it running.

    Args:
        target: ``target(index, *args)`` runs in each worker process (or give ``command``).
        command: instead of a target, the argv of a program each worker runs (no shell):
            ``["python", "worker.py", "--flag"]``. It gets the same process group, stop
            deadline, keeper, backoff and budget; ``ready_when="ready"`` waits for its
            sd_notify ``READY=1`` when something provides a notify socket (the corral command).
        standby: hot standby processes kept booted (the target's module imported, the warm-up
            run), each holding no worker index: a worker that must be restarted takes one
            at once and runs user code within about a millisecond, and a new standby boots in
            the background. Costs K idle processes (their memory). 0: none. With
            backend="ray": K actors made ahead (idle, holding what ``ray_options`` ask for),
            so a restart is one call (~10 ms) instead of a new Ray worker process (~0.25 s).
        standby_init: a warm-up run in each standby before it is needed (a callable, or
            "module:function"): load a model, open pools; what it builds is inherited by
            the worker's target. A standby whose warm-up raises is reported and replaced with
            backoff; workers are then started cold meanwhile.
        backend: "local" (processes on this machine) or "ray" (each worker a Ray actor,
            anywhere in the cluster; needs ``corral[ray]``). corral's policy, backoff, budget,
            strategies, events and status apply; liveness comes from probes of the actors.
        ray_options: actor options passed to Ray (num_cpus, num_gpus, resources,
            scheduling_strategy such as "SPREAD", runtime_env, ...).
        env: the workers' whole environment (default: the supervisor's), for a command or a
            Python target (its ``os.environ``).
        cwd, user, group, umask: where and as whom the workers run (user/group need root).
            A Python target switches after corral's bootstrap, just before ``target`` runs.
        workers: how many workers, >= 0.
        args: ``args(index) -> tuple`` of extra positional arguments, or None.
        names: ``names(index) -> str``, the worker's name (default ``"<name>-<index>"``).
        name: the pool's name, used in logs and process titles.
        start_method: "fork", "spawn" or "forkserver" (default: forkserver, safe with threads).
        restart: "always", "on-failure" or "never" (a :class:`RestartPolicy`).
        strategy: which workers a failure restarts (a :class:`Strategy`): "one_for_one" (the
            failed one), "one_for_all" (all of them, together, charged once to the budget) or
            "rest_for_one" (it and every worker of a higher index).
        backoff: delays between restarts of one worker (a :class:`Backoff`).
        restart_cooldown: the least seconds between two restarts of the same worker; a
            restart the policy wants sooner waits for the rest (0: none). The first restart is
            never delayed by it; a crash loop is throttled to one restart per cool-down.
        budget: pool-wide restart limit (a :class:`RestartBudget`); past it the pool gives up.
        stop_signal: sent to each worker's process group to stop it gracefully.
        stop_timeout: seconds the whole pool gets to stop before SIGKILL.
        heartbeat_timeout: a worker silent for longer is hung (None: no heartbeat check).
        startup_timeout: grace before the first beat/ready is required (None: no limit).
        ready_when: "started" (ready once running), "ready" (``corral.ready()``) or "beat".
        kill_grace: after a hung worker's stack dump and stop signal, seconds before SIGKILL.
        daemon: multiprocessing's daemon flag for the workers.
        health_check: ``health_check(process, index) -> bool`` run off the monitor thread on
            each RUNNING worker every ``health_check_interval`` s; False, an exception or
            running past ``health_check_timeout`` is a failure, and ``failure_threshold``
            failures in a row make the worker unhealthy: it is restarted per the policy.
        max_memory: bytes of RSS (the worker and its children) past which it is recycled,
            checked every ``memory_check_interval`` s.
        max_age: seconds after which a worker is recycled, spread by +/- ``max_age_jitter``.
    """

    target: Callable[..., Any] | None = None
    workers: int = 1
    args: Callable[[int], tuple[Any, ...]] | None = None
    names: Callable[[int], str] | None = None
    name: str = ""
    start_method: str = "forkserver"
    restart: RestartPolicy | str = RestartPolicy.ALWAYS
    strategy: Strategy | str = Strategy.ONE_FOR_ONE
    backoff: Backoff = field(default_factory=Backoff)
    budget: RestartBudget = field(default_factory=RestartBudget)
    restart_cooldown: float = 0.0
    stop_signal: int = signal.SIGTERM
    stop_timeout: float = 5.0
    heartbeat_timeout: float | None = None
    startup_timeout: float | None = None
    ready_when: str = "started"
    kill_grace: float = 1.0
    daemon: bool = False
    health_check: Callable[[Any, int], bool] | None = None
    health_check_interval: float = 5.0
    health_check_timeout: float = 5.0
    failure_threshold: int = 3
    max_memory: int | None = None
    memory_check_interval: float = 1.0
    max_age: float | None = None
    max_age_jitter: float = 0.1
    backend: str = "local"
    ray_options: Mapping[str, Any] | None = None
    standby: int = 0
    standby_init: Callable[[], Any] | str | None = None
    command: Sequence[str] | None = None
    env: Mapping[str, str] | None = None
    cwd: str | None = None
    user: int | str | None = None
    group: int | str | None = None
    umask: int | None = None

    def __post_init__(self) -> None:
        if self.command is not None:
            if self.target is not None:
                raise TypeError("give either target or command, not both")
            if (isinstance(self.command, str | bytes) or not isinstance(self.command, Sequence)
                    or not self.command or not all(isinstance(a, str) for a in self.command)):
                raise TypeError(f"command must be a non-empty list of str (an argv, no "
                                f"shell), got {self.command!r}")
            object.__setattr__(self, "command", tuple(self.command))
        elif self.target is None:
            raise TypeError("PoolSpec needs a target (a callable) or a command (an argv)")
        else:
            v.callable_("target", self.target)
        if self.env is not None:
            if not isinstance(self.env, Mapping) or not all(
                    isinstance(k, str) and isinstance(x, str) for k, x in self.env.items()):
                raise TypeError(f"env must be a mapping of str to str, got {self.env!r}")
            object.__setattr__(self, "env", dict(self.env))
        if self.cwd is not None and not isinstance(self.cwd, str):
            raise TypeError(f"cwd must be a str or None, got {self.cwd!r}")
        for key in ("user", "group"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, int | str)):
                raise TypeError(f"{key} must be a name, an id or None, got {value!r}")
        if self.umask is not None:
            v.integer("umask", self.umask)
            if self.umask > 0o777:
                raise ValueError(f"umask must be in 0..0o777, got {self.umask:#o}")
        v.count("workers", self.workers)
        v.callable_("args", self.args, optional=True)
        v.callable_("names", self.names, optional=True)
        if not isinstance(self.name, str):
            raise TypeError(f"name must be a str, got {self.name!r} ({type(self.name).__name__})")
        if not self.name:
            default = (os.path.basename(self.command[0]) if self.command
                       else getattr(self.target, "__name__", "pool"))
            object.__setattr__(self, "name", default or "pool")
        v.choice("start_method", self.start_method, START_METHODS)
        object.__setattr__(self, "restart", RestartPolicy.parse(self.restart))
        object.__setattr__(self, "strategy", Strategy.parse(self.strategy))
        if not isinstance(self.backoff, Backoff):
            raise TypeError(f"backoff must be a corral.Backoff, got {self.backoff!r}")
        if not isinstance(self.budget, RestartBudget):
            raise TypeError(f"budget must be a corral.RestartBudget, got {self.budget!r}")
        v.number("restart_cooldown", self.restart_cooldown)
        if isinstance(self.stop_signal, bool) or not isinstance(self.stop_signal, int):
            raise TypeError(f"stop_signal must be a signal number, got {self.stop_signal!r}")
        try:
            sig = signal.Signals(self.stop_signal)
        except ValueError:
            raise ValueError(
                f"stop_signal must be a valid signal, got {self.stop_signal!r}") from None
        if sig in _BAD_STOP_SIGNALS:
            raise ValueError(f"stop_signal must be catchable (not {sig.name}), got {sig.name}")
        object.__setattr__(self, "stop_signal", sig)
        v.number("stop_timeout", self.stop_timeout)
        v.optional_number("heartbeat_timeout", self.heartbeat_timeout, strict=True)
        v.optional_number("startup_timeout", self.startup_timeout, strict=True)
        v.choice("ready_when", self.ready_when, READY_WHEN)
        v.number("kill_grace", self.kill_grace)
        v.boolean("daemon", self.daemon)
        v.callable_("health_check", self.health_check, optional=True)
        v.number("health_check_interval", self.health_check_interval, strict=True)
        v.number("health_check_timeout", self.health_check_timeout, strict=True)
        v.integer("failure_threshold", self.failure_threshold, minimum=1)
        if self.max_memory is not None:
            v.integer("max_memory", self.max_memory, minimum=1)
        v.number("memory_check_interval", self.memory_check_interval, strict=True)
        v.optional_number("max_age", self.max_age, strict=True)
        v.number("max_age_jitter", self.max_age_jitter)
        if self.max_age_jitter >= 1:
            raise ValueError(f"max_age_jitter must be a fraction in [0, 1), got "
                             f"{self.max_age_jitter!r}")
        v.choice("backend", self.backend, ("local", "ray"))
        if self.backend == "ray":
            if self.command is not None:
                raise ValueError("backend='ray' runs Python targets, not commands")
            for key in ("env", "cwd", "user", "group", "umask"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key} does not apply with backend='ray' (pass "
                                     "runtime_env in ray_options for the environment)")
            if self.standby_init is not None:
                raise ValueError("standby_init is not available with backend='ray' (a Ray "
                                 "standby is an actor made ahead, with no target module "
                                 "imported)")
            from corral.ray._backend import validate_options

            object.__setattr__(self, "ray_options", validate_options(self.ray_options))
        elif self.ray_options is not None:
            raise ValueError("ray_options go with backend='ray'")
        v.count("standby", self.standby)
        init = self.standby_init
        if init is not None and not callable(init) and not (
                isinstance(init, str) and init.count(":") == 1 and all(init.split(":"))):
            raise TypeError(f'standby_init must be a callable or "module:function", got '
                            f"{init!r}")
        if self.command is not None and (self.standby or init is not None):
            raise ValueError("standby is for Python targets: a command cannot be started "
                             "before it is needed")
        if self.target is not None and self.backend == "local":
            check_picklable("target", self.target, self.start_method)
            if callable(init):
                check_picklable("standby_init", init, self.start_method)

    @property
    def restart_policy(self) -> RestartPolicy:
        assert isinstance(self.restart, RestartPolicy)
        return self.restart

    @property
    def supervision_strategy(self) -> Strategy:
        assert isinstance(self.strategy, Strategy)
        return self.strategy

    def worker_name(self, index: int) -> str:
        if self.names is None:
            return f"{self.name}-{index}"
        name = self.names(index)
        if not isinstance(name, str):
            raise TypeError(f"names({index}) must return a str, got {name!r}")
        return name

    def worker_args(self, index: int) -> tuple[Any, ...]:
        if self.args is None:
            return ()
        args = self.args(index)
        if not isinstance(args, tuple):
            raise TypeError(
                f"args({index}) must return a tuple of extra arguments, got {args!r} "
                f"({type(args).__name__}); wrap a single value as (value,)"
            )
        check_picklable(f"args({index})", args, self.start_method)
        return args
