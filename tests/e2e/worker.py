"""A command for corral's end-to-end tests: ``python worker.py [options]`` (no corral import).

Prints ``tick N pid P`` lines, and does what the options say: ignore SIGTERM, report signals,
start a grandchild (same process group) or a setsid() escapee, exit with a code, speak sd_notify,
listen on TCP/HTTP, print long lines or a fast stream of numbered lines.
"""

from __future__ import annotations

import argparse
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def notify(text: str) -> None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(text.encode(), addr)


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--every", type=float, default=0.2)
    ap.add_argument("--ignore-term", action="store_true")
    ap.add_argument("--report", default="", help="signals to report, e.g. USR1,HUP")
    ap.add_argument("--grandchild", action="store_true", help="start `sleep 600` (same group)")
    ap.add_argument("--escape", type=float, default=None,
                    help="start a setsid() `sleep S` (an escapee of the process group)")
    ap.add_argument("--print-env", default="", help="print these variables at start")
    ap.add_argument("--exit", type=int, default=None, help="exit with this code after --after")
    ap.add_argument("--kill-self", default=None, help="die of this signal after --after")
    ap.add_argument("--after", type=float, default=0.0)
    ap.add_argument("--ready-after", type=float, default=None, help="READY=1 after S")
    ap.add_argument("--watchdog", type=float, default=None, help="WATCHDOG=1 every S")
    ap.add_argument("--watchdog-for", type=float, default=None, help="then stop pinging")
    ap.add_argument("--status", default=None, help="STATUS= text")
    ap.add_argument("--listen", type=int, default=None, help="TCP port, after --listen-after")
    ap.add_argument("--http", type=int, default=None, help="HTTP port, after --listen-after")
    ap.add_argument("--listen-after", type=float, default=0.0)
    ap.add_argument("--say-after", nargs=2, default=None, metavar=("S", "TEXT"))
    ap.add_argument("--notify-after", nargs=2, default=None, metavar=("S", "TEXT"),
                    help="send TEXT (\\n between fields) to NOTIFY_SOCKET after S")
    ap.add_argument("--long-line", type=int, default=None, help="print one line of N bytes")
    ap.add_argument("--stream", nargs=2, type=float, default=None, metavar=("RATE", "SECONDS"),
                    help="numbered lines at RATE/s for SECONDS, then `done N`")
    ap.add_argument("--stderr", default=None, help="print this on stderr at start")
    args = ap.parse_args()

    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for name in filter(None, args.report.split(",")):
        sig = getattr(signal, "SIG" + name)
        signal.signal(sig, lambda s, f: say(f"got {signal.Signals(s).name}"))
    index = os.environ.get("CORRAL_INDEX", "?")
    say(f"start index {index} pid {os.getpid()} pgid {os.getpgid(0)}")
    if args.stderr:
        sys.stderr.write(args.stderr + "\n")
        sys.stderr.flush()
    if args.grandchild:
        gc = subprocess.Popen(["sleep", "600"])
        say(f"grandchild {gc.pid}")
    if args.escape is not None:
        esc = subprocess.Popen(["sleep", str(args.escape)], start_new_session=True)
        say(f"escapee {esc.pid}")
    for var in filter(None, args.print_env.split(",")):
        say(f"env {var}={os.environ.get(var)}")
    if args.long_line:
        say("L" * args.long_line)
    if args.stream:
        rate, seconds = args.stream
        total = int(rate * seconds)
        start = time.monotonic()
        n = 0
        out = sys.stdout
        while n < total:
            due = min(total, int((time.monotonic() - start) * rate) + 1)
            if n >= due:
                time.sleep(0.002)
                continue
            out.write("".join(f"seq {index} {i} {'x' * 40}\n" for i in range(n, due)))
            out.flush()
            n = due
        say(f"done {n}")
    if args.listen is not None or args.http is not None:
        def serve() -> None:
            time.sleep(args.listen_after)
            if args.http is not None:
                class H(http.server.BaseHTTPRequestHandler):
                    def do_GET(self) -> None:
                        self.send_response(200)
                        self.end_headers()
                        self.wfile.write(b"ok")

                    def log_message(self, *a: object) -> None:
                        pass

                http.server.ThreadingHTTPServer(("127.0.0.1", args.http), H).serve_forever()
            else:
                srv = socket.create_server(("127.0.0.1", args.listen))
                say(f"listening {args.listen}")
                while True:
                    conn, _ = srv.accept()
                    conn.close()

        threading.Thread(target=serve, daemon=True).start()
    if args.ready_after is not None:
        time.sleep(args.ready_after)
        notify("READY=1\nSTATUS=" + (args.status or "ready"))
    elif args.status:
        notify("STATUS=" + args.status)
    t0 = time.monotonic()
    i = 0
    next_ping = 0.0
    while True:
        now = time.monotonic() - t0
        if args.notify_after and now >= float(args.notify_after[0]):
            notify(args.notify_after[1].replace("\\n", "\n"))
            say("notified")
            args.notify_after = None
        if args.say_after and now >= float(args.say_after[0]):
            say(args.say_after[1])
            args.say_after = None
        if args.exit is not None and now >= args.after:
            say(f"exiting {args.exit}")
            sys.exit(args.exit)
        if args.kill_self and now >= args.after:
            os.kill(os.getpid(), getattr(signal, "SIG" + args.kill_self))
        if args.watchdog and now >= next_ping and (args.watchdog_for is None
                                                    or now < args.watchdog_for):
            notify("WATCHDOG=1")
            next_ping = now + args.watchdog
        say(f"tick {i} pid {os.getpid()}")
        i += 1
        step = args.every
        if args.watchdog:
            step = min(step, args.watchdog)
        time.sleep(step)


if __name__ == "__main__":
    main()
