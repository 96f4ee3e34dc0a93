"""List every file under the given roots, to prove what a container can and cannot see."""

import os
import sys

from report import write

seen = []
for root in sys.argv[1:] or ["/input"]:
    for directory, _, files in os.walk(root):
        seen.extend(os.path.join(directory, name) for name in files)
write("files.json", {"files": sorted(seen)})
