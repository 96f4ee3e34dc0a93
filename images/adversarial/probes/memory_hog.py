"""Eat memory page by page. With --child the hog is a child, and the parent survives it."""

import subprocess
import sys

if "--child" in sys.argv:
    code = subprocess.run([sys.executable, __file__]).returncode
    print(f"child exited with {code}", flush=True)
    sys.exit(3)

chunks = []
while True:
    chunk = bytearray(16 * 1024 * 1024)
    for offset in range(0, len(chunk), 4096):  # touch every page: real, charged memory
        chunk[offset] = 1
    chunks.append(chunk)
