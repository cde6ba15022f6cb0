"""Range estimation: min-max, percentile, and MSE search of the clipping range.

All functions take a grouped tensor ``(rows, ngroups, group)`` and return ``(xmin, xmax)``
of shape ``(rows, ngroups)``.
"""

from __future__ import annotations

import torch

from compactnn.core.qtype import QType
from compactnn.core.quantize import dequantize, quantize, scale_zero_from_range


def minmax_range(xg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return xg.amin(dim=-1), xg.amax(dim=-1)


def percentile_range(xg: torch.Tensor, percentile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip to the ``percentile``-th upper and ``100 - percentile``-th lower order statistic."""
    n = xg.shape[-1]
    hi_idx = min(n - 1, max(0, round(percentile / 100.0 * (n - 1))))
    lo_idx = n - 1 - hi_idx
    srt = torch.sort(xg, dim=-1).values
    return srt[..., lo_idx], srt[..., hi_idx]


def mse_range(
    xg: torch.Tensor,
    qtype: QType,
    symmetric: bool,
    grid: int = 80,
    min_shrink: float = 0.2,
    norm: float = 2.4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Search a shrink factor per group that minimises the ``norm``-error of quantization.

    The min-max range is scaled by factors in ``[min_shrink, 1]`` and the best per group is
    kept (the same search GPTQ's reference code uses, with its L2.4 error).
    """
    xmin, xmax = minmax_range(xg)
    best_err = torch.full_like(xmin, float("inf"))
    best_min, best_max = xmin.clone(), xmax.clone()
    for i in range(grid):
        shrink = 1.0 - (1.0 - min_shrink) * i / max(grid - 1, 1)
        cmin, cmax = xmin * shrink, xmax * shrink
        scale, zero = scale_zero_from_range(cmin, cmax, qtype, symmetric)
        err = (dequantize(quantize(xg, scale, zero, qtype), scale, zero) - xg).abs_()
        err = err.pow_(norm).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_min = torch.where(better, cmin, best_min)
        best_max = torch.where(better, cmax, best_max)
    return best_min, best_max


def estimate_range(
    xg: torch.Tensor, method: str, qtype: QType, symmetric: bool, percentile: float = 99.99
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch to one range estimator by name."""
    xg = xg.detach().float()
    if method == "minmax":
        return minmax_range(xg)
    if method == "percentile":
        return percentile_range(xg, percentile)
    return mse_range(xg, qtype, symmetric)
