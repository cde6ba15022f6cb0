"""Streamed post-training compression under a memory budget (``compress(..., max_memory=)``)."""

from compactnn._submodules import submodule
from compactnn.streaming.memory import parse_memory
from compactnn.streaming.run import StreamReport, compress_streamed

__all__ = ["StreamReport", "compress_streamed", "parse_memory"]


def __getattr__(name: str) -> object:
    """``compactnn.streaming.<module>`` after a plain ``import compactnn``, on first use."""
    return submodule(__name__, name)
