"""``compactnn compress``'s summary lines of sizes and memory: the float artifact the
compressed one is compared with (its size computed, not written:
:func:`compactnn.measure.size.float_artifact_bytes`), and each step's peak resident memory.
"""

from __future__ import annotations

import sys

import torch

from compactnn.commands._common import human_bytes
from compactnn.errors import CompactnnError, cut, first_line
from compactnn.measure.size import float_artifact_bytes


def peak_lines(measured: dict) -> list[str]:
    """One line per step that measured the peak resident memory (``measured["peak_rss_mib"]``):
    the process's peak up to the end of that step (``ru_maxrss``: loading the model
    included, the steps after it not).

    Example:
        >>> peak_lines({"peak_rss_mib": {"gptq": 927.6}})[0][:55]
        '  peak resident memory up to the end of gptq: 927.6 MiB'
    """
    return [
        f"  peak resident memory up to the end of {method}: {mib} MiB (the whole process so "
        "far, model loading included; this run, not saved)"
        for method, mib in measured.get("peak_rss_mib", {}).items()
    ]


def float_size_or_reason(model: torch.nn.Module) -> int | str:
    """Bytes of ``model`` saved as a float artifact, or why it cannot be saved (a model
    ``save`` refuses, e.g. one with parametrizations): the compressed artifact is written
    already, so the comparison must not fail the command. A refusal of compactnn's own is
    kept whole (its advice ends the message); another library's first line is cut at
    ``REASON_CHARS``, saying so."""
    try:
        return float_artifact_bytes(model)
    except CompactnnError as exc:
        return " ".join(str(exc).split())  # one line, its advice whole
    except (OSError, RuntimeError, ValueError, TypeError) as exc:
        return cut(first_line(exc, limit=sys.maxsize), REASON_CHARS)


REASON_CHARS = 300  # of another library's error quoted as the float size's reason


def float_comparison(size: int, float_size: int | str) -> str:
    """``float artifact 1.2 MiB, 3.40x smaller`` (``1.05x larger`` when it is), or ``float
    artifact size unknown (why)``.

    Example:
        >>> float_comparison(18_900, 17_900)
        'float artifact 17.5 KiB, 1.06x larger'
    """
    if isinstance(float_size, str):
        return f"float artifact size unknown ({float_size})"
    if size > float_size:
        return f"float artifact {human_bytes(float_size)}, {size / float_size:.2f}x larger"
    return f"float artifact {human_bytes(float_size)}, {float_size / size:.2f}x smaller"
