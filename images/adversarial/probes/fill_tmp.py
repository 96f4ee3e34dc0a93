"""Fill /tmp until it is full, and report how far it got."""

import errno

from report import write

written, error = 0, None
block = b"t" * (1 << 20)
try:
    with open("/tmp/fill.bin", "wb") as handle:
        while written < 4 << 30:
            handle.write(block)
            handle.flush()
            written += len(block)
except OSError as exc:
    error = errno.errorcode.get(exc.errno)
write("tmp.json", {"written": written, "error": error})
