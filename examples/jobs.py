"""The Python target of examples/corral.toml's [program.jobs]: a worker that reports readiness
and proves progress, as a corral.Supervisor target does."""

import time

import corral


def run(index: int, queue: str) -> None:
    corral.set_status(f"warming up for {queue}")
    time.sleep(0.5)  # load a model, open connections...
    corral.ready()
    done = 0
    while True:
        time.sleep(1.0)  # one unit of work
        done += 1
        corral.beat()  # silent for more than heartbeat_timeout = hung, restarted
        corral.set_status(f"{queue}: {done} jobs")
        print(f"jobs worker {index}: job {done} from {queue}", flush=True)
