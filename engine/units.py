"""Human sizes and durations on the command line and in challenge files: "2g", "512MiB", "90s"."""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(text: str | int) -> int:
    """Bytes from "2g", "2G", "2GiB", "2gb" (all binary, as Docker reads them) or a plain number."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size: use a number with an optional unit "
                         "k, m, g or t (e.g. 512m, 2g)")
    number, unit, _ = match.groups()
    value = float(number) * 1024 ** _POWERS[unit.lower()]
    if value < 1:
        raise ValueError(f"{text!r} is smaller than one byte")
    return int(value)

