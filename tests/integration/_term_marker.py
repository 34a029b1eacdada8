"""A grandchild for the orphan tests: ``python _term_marker.py FLAGDIR [block]``.

Writes FLAGDIR/ready-<pid> once set up. With ``block`` it blocks SIGTERM, so a SIGTERM sent to
its group stays pending (visible in /proc/<pid>/status) until a SIGKILL ends it.
"""

import os
import signal
import sys
import time
from pathlib import Path

flagdir = Path(sys.argv[1])
if sys.argv[2:] == ["block"]:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
(flagdir / f"ready-{os.getpid()}").write_text("1")
while True:
    time.sleep(3600)
