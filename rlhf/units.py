"""Byte sizes: the binary units, a size as a user writes it (24GiB, 2GB), and a size as a person reads it."""

from __future__ import annotations

import re

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": KiB, "mib": MiB, "gib": GiB, "tib": TiB}


def parse_size(size: str | int, *, bare_bytes: bool = False) -> int | None:
    """'24GiB' -> 24 * 2**30, '24GB' -> 24 * 10**9 (decimal, as transformers' max_shard_size), '1.5GiB', '500 MiB';
    None when `size` is not a positive size.

    A number without a unit is bytes only with `bare_bytes` (merge.max_shard_size, which transformers reads that
    way); for --gpu a forgotten unit is likelier than a card of 24 bytes, so '24' is not a size there.
    """
    if isinstance(size, int):
        return size if size > 0 else None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", size)
    if not match:
        return None
    unit = match.group(2).lower() or ("b" if bare_bytes else "")
    if unit not in _UNITS:
        return None
    n = int(float(match.group(1)) * _UNITS[unit])
    return n if n > 0 else None


def format_bytes(n: int | float) -> str:
    """2.00 GiB, 512.00 MiB, 0 B: two decimals in the largest binary unit up to GiB."""
    n = int(n)
    sign, n = ("-" if n < 0 else ""), abs(n)
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            return f"{sign}{n / size:.2f} {unit}"
    return f"{sign}{n} B"
