"""Sizes for people: bytes in the binary unit that keeps them readable."""

from __future__ import annotations


def human_bytes(value: int) -> str:
    """Format a byte count as 236 B, 17.2 KiB, 18.4 MiB or 2.0 GiB, up to TiB."""
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{value} B"
