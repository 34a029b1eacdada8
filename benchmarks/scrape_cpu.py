"""Supervisor CPU per /metrics scrape, quickly (the ``scrape`` scenario of ``make bench``, small).

``python benchmarks/scrape_cpu.py [--workers 64] [--scrapes 20] [--interval 1.0] [--rounds 1]
[--per-worker] [--rss-interval S] [--path /metrics] [--inner] [--profile N] [--answer 512]``

64 fork workers beat every 0.2 s (heartbeat timeout 5 s). Each round measures this process's
CPU over an idle window (endpoint on, nobody scraping) and over ``--scrapes`` scrapes by
benchmarks/scraper.py (a process of its own, one kept-alive connection), and prints the CPU per
scrape (scrape window minus idle rate) and per 10 s. ``--profile N``: then N scrapes in this
process under cProfile (the request handling alone, no socket). ``--answer N``: the answer time
of a scrape of an N-worker pool instead. ``--inner``: also the median CPU of the request
handling inside the endpoint's thread; each round also prints each thread's CPU.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import time

import corral

HERE = os.path.dirname(os.path.abspath(__file__))


def beater(index: int, period: float) -> None:
    while True:
        corral.beat()
        time.sleep(period)


def threads_cpu() -> dict[str, float]:
    """CPU seconds of each thread of this process by name (/proc schedstat: ns resolution)."""
    import threading

    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        name = names.get(int(tid), tid)
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as fh:
                ns = int(fh.read().split()[0])
        except OSError:
            continue
        out[name] = out.get(name, 0.0) + ns / 1e9
    return out


def _args(index: int) -> tuple[float]:
    return (0.2,)


def scrape(address: tuple[str, int], interval: float, count: int,
           path: str = "/metrics") -> tuple[float, float, dict[str, object]]:
    """(CPU seconds of this process, seconds elapsed, the scraper's report)."""
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "scraper.py"), address[0],
                             str(address[1]), path, str(interval), str(count)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    cpu0, t0 = time.process_time(), time.monotonic()
    proc.stdin.write("go\n")
    proc.stdin.flush()
    report = json.loads(proc.stdout.readline())
    elapsed, cpu = time.monotonic() - t0, time.process_time() - cpu0
    proc.wait(30)
    return cpu, elapsed, report


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--scrapes", type=int, default=20)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--per-worker", action="store_true")
    ap.add_argument("--profile", type=int, default=0)
    ap.add_argument("--answer", type=int, default=0)
    ap.add_argument("--path", default="/metrics", help="what the scraper asks for")
    ap.add_argument("--rss-interval", type=float, default=None,
                    help="an Endpoint of its own with this rss_interval (default: http=)")
    ap.add_argument("--inner", action="store_true",
                    help="also time the request handling inside the endpoint's thread")
    a = ap.parse_args()
    n = a.answer or a.workers
    own = a.per_worker or a.rss_interval is not None
    sup = corral.Supervisor(beater, workers=n, args=_args, start_method="fork",
                            heartbeat_timeout=5.0, stop_timeout=1.0,
                            http=None if own else "127.0.0.1:0")
    endpoint = None
    try:
        sup.start()
        if not sup.wait_ready(timeout=60 + n * 0.2):
            raise RuntimeError("the pool did not get ready")
        if own:
            from corral.endpoint import Endpoint

            endpoint = Endpoint("127.0.0.1:0", pools=[sup], per_worker=a.per_worker,
                                rss_interval=a.rss_interval or 10.0).start()
            address = endpoint.address
        else:
            address = sup.http_address
        time.sleep(1.0)
        import threading

        inner: list[float] = []
        if a.inner:
            ep = endpoint or sup._endpoint  # type: ignore[attr-defined]
            handle = ep._handle

            def timed(head: bytes, peer: object) -> object:
                t = time.thread_time()
                try:
                    return handle(head, peer)
                finally:
                    inner.append(time.thread_time() - t)

            ep._handle = timed

        print("threads:", {t.name: t.native_id for t in threading.enumerate()}, flush=True)
        scrape(address, 0.0, 1)  # the first one reads every RSS
        if a.answer:
            _, _, rep = scrape(address, 0.2, 20)
            times = sorted(rep["times"])  # type: ignore[arg-type]
            print(f"answer time, {n} workers{' per worker' if a.per_worker else ''}: "
                  f"median {statistics.median(times) * 1e3:.2f} ms, max {times[-1] * 1e3:.2f}"
                  f" ms, {rep['size']} bytes")
            return 0
        window = a.scrapes * a.interval
        for r in range(a.rounds):
            th0 = threads_cpu()
            cpu0, t0 = time.process_time(), time.monotonic()
            time.sleep(window)
            idle = (time.process_time() - cpu0) / (time.monotonic() - t0)
            th1 = threads_cpu()
            cpu, elapsed, rep = scrape(address, a.interval, a.scrapes, a.path)
            th2 = threads_cpu()
            if inner:
                print(f"  _handle in the endpoint thread: median "
                      f"{statistics.median(inner[-a.scrapes:]) * 1e3:.3f} ms")
            for name in sorted(th2):
                idle_t = th1.get(name, 0.0) - th0.get(name, 0.0)
                busy_t = th2[name] - th1.get(name, 0.0)
                print(f"  thread {name!r}: idle window {idle_t * 1e3:.3f} ms, scrape window "
                      f"{busy_t * 1e3:.3f} ms")
            per = (cpu - idle * elapsed) / a.scrapes
            print(f"round {r}: idle {idle * 10e3:.3f} ms/10s, scraped {cpu / elapsed * 10e3:.3f}"
                  f" ms/10s, per scrape {per * 1e3:.3f} ms (load {os.getloadavg()[0]:.2f}, "
                  f"answer median {statistics.median(rep['times']) * 1e3:.2f} ms)",  # type: ignore[arg-type]
                  flush=True)
        if a.profile:
            ep = endpoint or sup._endpoint  # type: ignore[attr-defined]
            head = (f"GET /metrics HTTP/1.1\r\nHost: {address[0]}:{address[1]}\r\n"
                    "Accept-Encoding: identity\r\n\r\n").encode()
            prof = cProfile.Profile()
            t0 = time.process_time()
            prof.enable()
            for _ in range(a.profile):
                ep._handle(head, ("127.0.0.1", 1))
                time.sleep(0.01)
            prof.disable()
            print(f"in-process _handle: {(time.process_time() - t0) / a.profile * 1e3:.3f} ms"
                  " a call (profiled)")
            pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
    finally:
        if endpoint is not None:
            endpoint.close()
        sup.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
