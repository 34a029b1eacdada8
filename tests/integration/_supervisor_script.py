"""A supervisor in its own process, for the tests that kill it or let it exit.

Usage: python _supervisor_script.py START_METHOD WORKERS [wait|return [TARGET]]

Prints one JSON line, the worker pids, once every worker has booted. Then "wait" (the default)
waits to be killed; "return" returns from main without calling stop(), as a program that forgets
to would. TARGET names a function in workers.py (default: graceful); it must call
corral.ready().
"""

from __future__ import annotations

import json
import sys
import threading


def main() -> None:
    import workers

    import corral

    method, n = sys.argv[1], int(sys.argv[2])
    then = sys.argv[3] if len(sys.argv) > 3 else "wait"
    target = getattr(workers, sys.argv[4] if len(sys.argv) > 4 else "graceful")
    # ready_when="ready": the pids are printed once every worker has fully booted.
    sup = corral.Supervisor(target, workers=n, start_method=method, name="orphans",
                            ready_when="ready")
    sup.start()
    sup.wait_ready(timeout=30)
    print(json.dumps(sup.pids()), flush=True)
    if then == "wait":
        threading.Event().wait()  # until killed


if __name__ == "__main__":
    main()
