"""This process's memory as the operating system sees it: its peak resident set, and handing freed heap back."""

from __future__ import annotations

import ctypes
import resource
import sys


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except AttributeError:  # macOS, musl: nothing to call
        return None


_MALLOC_TRIM = _malloc_trim()


def release_freed_memory() -> None:
    """Give freed heap pages back to the OS. glibc keeps freed blocks under 32 MB for reuse; with tensors of many
    sizes they fragment, and the process would creep up by ~100 MB over a 1 B-parameter merge."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
