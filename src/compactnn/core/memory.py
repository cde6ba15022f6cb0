"""Process memory, as the methods and the data generators report it."""

from __future__ import annotations

import resource
import sys


def peak_rss_mib() -> float:
    """The process's peak resident memory so far, MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)
