"""Write to /output until something stops us."""

import os

block = os.urandom(1 << 20)
with open("/output/huge.bin", "wb") as handle:
    while True:
        handle.write(block)
        handle.flush()
