"""What only ``ProcessPool(backend="ray")`` does: its checks, lazy import, Ray's pickling, actor
options, and an idle actor's death. (The behaviour both backends share:
test_pool_backends.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

import pytest

from corral import NotPicklable
from corral.pool import ProcessPool
from ray_backend import pool_targets as tasks
from support import pid_alive, wait_for

ray = pytest.importorskip("ray")
ray.cloudpickle.register_pickle_by_value(tasks)  # Ray's workers cannot import this directory


@pytest.mark.parametrize(("options", "error", "match"), [
    ({"backend": "dask"}, ValueError, "backend must be one of 'local', 'ray', got 'dask'"),
    ({"backend": "ray", "start_method": "fork"}, ValueError,
     "start_method does not apply to backend='ray'"),
    ({"backend": "ray", "max_memory_per_worker": 10**9}, ValueError,
     "max_memory_per_worker is not supported with backend='ray'"),
    ({"ray_options": {"num_cpus": 1}}, ValueError, "ray_options go with backend='ray'"),
    ({"backend": "ray", "ray_options": {"name": "w"}}, ValueError, "must not set 'name'"),
    ({"backend": "ray", "ray_options": {"max_restarts": 3}}, ValueError,
     "must not set 'max_restarts'"),
    ({"backend": "ray", "ray_options": {"num_cpu": 1}}, ValueError, "unknown option 'num_cpu'"),
    ({"backend": "ray", "ray_options": [1]}, TypeError, "ray_options must be a dict"),
])
def test_bad_arguments_are_refused_at_once(options: dict[str, Any], error: type[Exception],
                                           match: str) -> None:
    with pytest.raises(error, match=match):
        ProcessPool(2, **options)


def test_an_initializer_ray_cannot_pickle_is_refused_at_once() -> None:
    import threading

    with pytest.raises(NotPicklable, match=r"initargs .* backend='ray'"):
        ProcessPool(2, backend="ray", initializer=tasks.init_set, initargs=(threading.Lock(),))


@pytest.mark.timeout(60)
def test_corral_and_its_pool_do_not_import_ray() -> None:
    code = ("import sys, corral, corral.pool, corral.pool.executor\n"
            "p = corral.ProcessPool(2)\n"
            "print(p.submit(abs, -3).result(timeout=30))\n"
            "p.shutdown()\n"
            "assert 'ray' not in sys.modules, 'ray was imported'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=50)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "3"


@pytest.mark.timeout(60)
def test_lambdas_travel_by_value_and_actor_options_apply(ray_cluster: Any) -> None:
    env = {"CORRAL_POOL_TEST": "from ray_options"}
    pool = ProcessPool(2, backend="ray", spare_workers=0,
                       ray_options={"num_cpus": 1, "runtime_env": {"env_vars": env}})
    with pool:
        # Ray's cloudpickle: a lambda, which the local pool's pickle refuses.
        assert pool.submit(lambda x: x + 1, 41).result(timeout=60) == 42
        assert pool.submit(tasks.env, "CORRAL_POOL_TEST").result(timeout=30) == "from ray_options"
        assert "backend='ray'" in repr(pool)
    assert pool.worker_pids() == ()


@pytest.mark.timeout(60)
def test_an_idle_worker_that_dies_is_replaced_and_counted(ray_cluster: Any) -> None:
    pool = ProcessPool(1, backend="ray", spare_workers=0)
    with pool:
        pid = pool.submit(tasks.getpid).result(timeout=30)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: pool.stats()["workers_lost"] == 1, 10, "the death to be noticed")
        new = pool.submit(tasks.getpid).result(timeout=30)
        assert new != pid
        # The dead one is listed until its process is gone (a pidfd says when).
        wait_for(lambda: pool.worker_pids() == (new,), 10, "only the new worker to be listed")
        assert not pid_alive(pid)
    assert not pid_alive(new)


_OWN_CLUSTER = """
import os, sys, time, psutil, corral
def square(x):
    return x * x
if __name__ == "__main__":
    with corral.ProcessPool(2, backend="ray") as pool:
        print(pool.submit(square, 4).result(timeout=60))
    import ray
    assert not ray.is_initialized(), "the local cluster the pool started is still up"
    deadline = time.monotonic() + 15
    while True:
        left = [p.pid for p in psutil.Process().children(recursive=True)
                if p.status() != psutil.STATUS_ZOMBIE]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    print("left:", left)
"""


@pytest.mark.timeout(90)
def test_without_a_cluster_the_pool_starts_a_local_one_and_stops_it(tmp_path: Any) -> None:
    script = tmp_path / "own_cluster.py"
    script.write_text(_OWN_CLUSTER)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=80, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:2] == ["16", "left: []"], out.stdout


@pytest.mark.timeout(60)
def test_a_stopped_actor_times_out_and_is_killed(ray_cluster: Any, tmp_path: Any) -> None:
    # Ray sees nothing wrong with a SIGSTOPped actor, and its own ray.kill SIGKILLs a stopped
    # process only ~5 s later: corral's timeout and its own SIGKILL end it.
    from corral.pool import TaskTimeout

    marker = tmp_path / "stopped"
    with ProcessPool(1, backend="ray", spare_workers=0) as pool:
        fut = pool.submit_task(tasks.stop_self_after_marker, (str(marker),), timeout=1)
        pid = int(wait_for(lambda: marker.exists() and marker.read_text(), 30, "the task"))
        with pytest.raises(TaskTimeout):  # (with no stack dump: a stopped actor cannot answer)
            fut.result(timeout=10)
        wait_for(lambda: not pid_alive(pid), 10, "the stopped actor's process to be killed")
        assert pool.submit(tasks.square, 4).result(timeout=30) == 16


@pytest.mark.timeout(60)
def test_an_actor_no_node_can_host_is_a_failed_start(ray_cluster: Any) -> None:
    from corral import RestartBudget
    from corral.pool import PoolBroken

    pool = ProcessPool(1, backend="ray", spare_workers=0, startup_timeout=1,
                       budget=RestartBudget(1, 60), ray_options={"num_gpus": 1})
    with pool:
        fut = pool.submit(tasks.square, 2)
        with pytest.raises(PoolBroken, match="startup_timeout=1s"):
            fut.result(timeout=30)


def test_an_unpicklable_argument_is_refused_at_submit() -> None:
    import threading

    pool = ProcessPool(1, backend="ray")
    with pytest.raises(NotPicklable, match=r"args cannot be pickled .*Ray's cloudpickle"):
        pool.submit(tasks.square, threading.Lock())
    pool.shutdown()  # never started: nothing to stop, no cluster needed
