"""Write a flood of log lines (1 GiB by default) to stdout."""

import os
import sys

total = int(sys.argv[1]) if len(sys.argv) > 1 else 1 << 30
line = b"flood " + b"x" * 1017 + b"\n"  # 1 KiB a line
block = line * 256
written = 0
while written < total:
    written += os.write(1, block)
os.write(1, b"flood done\n")
