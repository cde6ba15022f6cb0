"""When a latency under 1 ms may not be the model's (longer calls are judged by
:func:`compactnn.measure.timing.suspect_reasons`, which hands these to :func:`sub_ms_reasons`).

Below ``MIN_JUDGED_S`` one preempted call (a 4 ms time slice) spreads the runs 30x without
moving the median, and waking PASSIVE threads is off-CPU time of the call itself; what shows a
median that is not the model's is the median sitting well above the fastest call, or one
block of calls (a round) disagreeing with the others. Measured on a 2-CPU EPYC (digits-resnet
batch 16, 30-call blocks): unslowed rows sit 2-10% above their fastest call, their block
medians within 2-19%; rows slowed by a busy neighbour 19-140% above, blocks 34% to 30x apart.

Example:
    >>> sub_ms_reasons(0.55e-3, 0.33e-3, ())[0][:41]
    'median 0.55 ms is 67% above the fastest c'
"""

from __future__ import annotations

from collections.abc import Sequence

MIN_JUDGED_S = 1e-3  # below 1 ms: judged by its median and block medians, not single calls
MAX_MEDIAN_OVER_MIN = 0.2  # (median - min) / min above this, under MIN_JUDGED_S: most calls slowed
MAX_BLOCK_SPREAD = 0.25  # (max - min block median) / median above this, under MIN_JUDGED_S


def _ms(seconds: float) -> str:
    """Milliseconds with two decimals, four below 10 us (``"0.0042"``)."""
    return f"{seconds * 1e3:.{2 if seconds >= 1e-5 else 4}f}"


def sub_ms_reasons(median_s: float, min_s: float, block_medians_s: Sequence[float]) -> list[str]:
    """Why a call whose median is ``median_s`` (under ``MIN_JUDGED_S``), fastest call ``min_s``
    and blocks' medians ``block_medians_s`` may not show the model's speed: the median more
    than ``MAX_MEDIAN_OVER_MIN`` (20%) above the fastest call, or the block medians more than
    ``MAX_BLOCK_SPREAD`` (25%) apart (empty when neither).

    Example:
        >>> sub_ms_reasons(0.2e-3, 0.19e-3, (0.19e-3, 0.2e-3, 0.3e-3))[0][:38]
        'block medians 0.19-0.30 ms spread 55% '
    """
    reasons: list[str] = []
    if min_s > 0 and median_s - min_s > MAX_MEDIAN_OVER_MIN * min_s:
        reasons.append(
            f"median {_ms(median_s)} ms is {median_s / min_s - 1:.0%} above the "
            f"fastest call ({_ms(min_s)} ms): most calls were slowed by something else"
        )
    blocks = block_medians_s
    if len(blocks) > 1 and median_s > 0:
        gap = (max(blocks) - min(blocks)) / median_s
        if gap > MAX_BLOCK_SPREAD:
            reasons.append(
                f"block medians {_ms(min(blocks))}-{_ms(max(blocks))} ms spread "
                f"{gap:.0%} around the median: a block ran while something else did"
            )
    return reasons
