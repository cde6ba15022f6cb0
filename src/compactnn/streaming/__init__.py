"""Streamed post-training compression under a memory budget (``compress(..., max_memory=)``)."""

from compactnn.streaming.memory import parse_memory
from compactnn.streaming.run import StreamReport, compress_streamed

__all__ = ["StreamReport", "compress_streamed", "parse_memory"]
