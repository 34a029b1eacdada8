"""A stand-in for Prometheus: ``python scraper.py HOST PORT PATH INTERVAL COUNT [close]``.

Prints ``ready`` once it runs, then waits for a line on stdin (so that the caller's
measurement window leaves out this process's start), then GETs ``PATH`` ``COUNT`` times, one
every ``INTERVAL`` seconds, on one kept-alive connection as Prometheus does (``close``: a new
connection each time, as the kubelet's probes do), and prints a JSON object: each answer's time
in seconds (request sent -> body read), the body size and the status codes. Only the standard
library: it runs in a process of its own, so its CPU is not the supervisor's.
"""

from __future__ import annotations

import http.client
import json
import sys
import time


def main() -> int:
    host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    interval, count = float(sys.argv[4]), int(sys.argv[5])
    close = len(sys.argv) > 6 and sys.argv[6] == "close"
    times, statuses, size = [], set(), 0
    conn = http.client.HTTPConnection(host, port, timeout=30)
    print("ready", flush=True)
    sys.stdin.readline()
    next_at = time.monotonic()
    for _ in range(count):
        next_at += interval
        t0 = time.monotonic()
        conn.request("GET", path, headers={"Connection": "close"} if close else {})
        r = conn.getresponse()
        size = len(r.read())
        times.append(time.monotonic() - t0)
        statuses.add(r.status)
        if close:
            conn.close()
        time.sleep(max(0.0, next_at - time.monotonic()))
    conn.close()
    json.dump({"times": times, "size": size, "statuses": sorted(statuses)}, sys.stdout)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
