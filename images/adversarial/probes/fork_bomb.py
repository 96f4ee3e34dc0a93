"""Fork until the kernel says no, record how far it got, then keep bombing."""

import os
import time

from report import write


def child():
    time.sleep(3600)
    os._exit(0)


forked, error = 0, None
try:
    while True:
        if os.fork() == 0:
            child()
        forked += 1
except OSError as exc:
    error = exc.errno
write("forks.json", {"forked": forked, "errno": error})
while True:  # the bomb goes on: only the time limit ends it
    try:
        if os.fork() == 0:
            child()
    except OSError:
        time.sleep(0.01)
