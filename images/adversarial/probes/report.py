"""Shared by the probes: record what was attempted and how the kernel answered."""

import errno
import json
import os
import sys


def attempt(action):
    """'ok' if `action` ran, else the errno name it failed with."""
    try:
        action()
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))


def write(name, data):
    text = json.dumps(data, sort_keys=True)
    print(text, flush=True)
    try:
        with open(os.path.join("/output", name), "w") as handle:
            handle.write(text)
    except OSError as exc:
        print(f"cannot write report: {exc}", file=sys.stderr)
