"""A command worker for the command rows of the bench (run with ``python -I -S``: the same argv
for corral, supervisord, circus and the floor).

    cmd_worker.py sleeper PROBE [INDEX]     first line to the probe, then sleep
    cmd_worker.py stopper PROBE [INDEX]     the same, ignoring SIGTERM, with a `sleep` child

INDEX defaults to $CORRAL_INDEX (corral run sets it). The record format is bench_workers.RECORD:
kind (1 = first line, 4 = grandchild), index, pid, value (time.monotonic(), or the child's pid).
"""

import os
import signal
import struct
import sys
import time

t = time.monotonic()
RECORD = struct.Struct("=iiid")
mode, path = sys.argv[1], sys.argv[2]
index = int(sys.argv[3]) if len(sys.argv) > 3 else int(os.environ.get("CORRAL_INDEX", "0"))
if mode == "stopper":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
fd = os.open(path, os.O_WRONLY)
os.write(fd, RECORD.pack(1, index, os.getpid(), t))
if mode == "stopper":
    pid = os.posix_spawn("/bin/sleep", ["sleep", "600"], os.environ)
    os.write(fd, RECORD.pack(4, index, os.getpid(), float(pid)))
os.close(fd)
while True:
    time.sleep(3600)
