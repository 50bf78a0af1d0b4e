"""Parsing of human-readable byte sizes such as ``2GiB`` or ``512MB``."""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | float | str) -> int:
    """Convert ``2GiB``, ``512 MB``, ``1e6`` or an integer to a number of bytes."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("expected a size such as 2GiB")
    if isinstance(value, (int, float)):
        size = int(value)
    else:
        match = _SIZE.match(value)
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"'{value}' is not a size; use e.g. 512MiB or 2GiB")
        size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size <= 0:
        raise ValueError("must be a positive size")
    return size


def format_bytes(size: float) -> str:
    """Format a byte count with binary units (``1.5 MiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
