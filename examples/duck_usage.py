"""The usage example from the module docstring of Duck's ``WorkerProcessManager``, on corral.

Unchanged but for the import line and three fixes it needed to run at all:

- ``import time`` at module level: the monitoring loop below uses ``time.sleep``, which the
  original only imported inside ``sample_worker``;
- the ``if __name__ == "__main__":`` guard: under the spawn and forkserver start methods (the
  default on macOS, and on Linux from Python 3.14) each worker imports this module, and without
  the guard every worker would start a pool of its own;
- ``DUCK_EXAMPLE_ROUNDS`` (default 20, as in the original) so the tests can run it shortened.

``args_fn=lambda idx: (...)`` is kept: it passes ``Ellipsis`` to each worker as one argument,
which ``sample_worker(idx, *args)`` accepts. The lambdas run in the parent process, so they work
under every start method; ``sample_worker`` is module-level, so it can be sent to any child.

Run: ``python examples/duck_usage.py`` (about 40 s), or ``DUCK_EXAMPLE_ROUNDS=3 python ...``.
"""

import os
import time

from corral import WorkerProcessManager

ROUNDS = int(os.environ.get("DUCK_EXAMPLE_ROUNDS", "20"))


def sample_worker(idx, *args):
    import random
    import time

    print(f"Worker {idx} started...")

    while True:
        time.sleep(1)
        print(f"[Worker {idx}] Sleeping")

        # Simulate random crash; restart will occur
        if random.random() < 0.03:
            print(f"[Worker {idx}] Simulating crash")
            exit(1)


def health_check_fn(proc, idx):
    # Returns True if alive; override for custom checks
    return proc.is_alive()


if __name__ == "__main__":
    manager = WorkerProcessManager(
        worker_fn=sample_worker,
        num_workers=4,
        args_fn=lambda idx: (...),
        worker_name_fn=lambda idx: f"duck-worker-{idx}",
        health_check_fn=health_check_fn,  # Or use HeartbeatHeathCheck object.
        restart_timeout=2,
        enable_logs=True, verbose_logs=False,
        enable_monitoring=True,
        process_stop_timeout=3,
    )

    try:
        manager.start()
        for _ in range(ROUNDS):  # Monitor for a while
            print("Worker status:", manager.status())
            time.sleep(2)
    finally:
        manager.stop()
