"""GPTQ's solver (Frantar et al. 2022): quantize a weight column by column, pushing each
column's rounding error onto the columns not yet quantized through the inverse Hessian of the
layer's calibration inputs; and the Hessian-weighted clipping-range search it fits each
group's grid with (also AWQ's clip search).

Grid per group: asymmetric (below 8 bits) with a clipping range searched to minimise the
Hessian-diagonal-weighted squared error of the group, computed lazily from the
error-compensated weights when GPTQ reaches the group's first column (also with act-order).
Pure functions on tensors; the block-sequential engine feeds them.
"""

from __future__ import annotations

import torch

from compactnn.core.hessian import drop_dead_inputs, inverse_hessian_factor
from compactnn.core.qtype import QType
from compactnn.core.quantize import dequantize, quantize, scale_zero_from_range
from compactnn.core.spec import QuantSpec
from compactnn.errors import CompactnnError


def weighted_mse_range(
    wg: torch.Tensor,
    qtype: QType,
    symmetric: bool,
    weight: torch.Tensor | None = None,
    grid: int = 40,
    min_shrink: float = 0.3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip range per group minimising ``sum(weight * (dequant(quant(w)) - w)^2)``.

    Searches the low and high ends of the min-max range separately (asymmetric grids) or one
    shrink factor (symmetric).

    Args:
        wg: grouped weights ``(rows, ngroups, G)``.
        qtype: target grid.
        symmetric: symmetric grid.
        weight: per-element importance broadcastable to ``wg`` (e.g. Hessian diagonal
            ``(1, ngroups, G)``); None weighs all equally.
        grid: number of shrink factors tried for each end.
        min_shrink: smallest fraction of the min-max range tried.

    Returns:
        ``(lo, hi)`` each ``(rows, ngroups)``.
    """
    rows = wg.shape[0]
    per_row = _candidates(grid, symmetric) * wg[:1].numel()
    step = max(1, CLIP_CHUNK_ELEMENTS // max(per_row, 1))
    if rows <= step:
        return _mse_range_rows(wg, qtype, symmetric, weight, grid, min_shrink)
    parts = []
    for r in range(0, rows, step):  # rows are independent: chunking bounds the temporaries
        w = weight
        if w is not None and w.dim() == wg.dim() and w.shape[0] == rows:
            w = w[r : r + step]
        parts.append(_mse_range_rows(wg[r : r + step], qtype, symmetric, w, grid, min_shrink))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# Elements of one candidate tensor (candidates x rows x group) in the clip search: about 2 MB
# of float32 per temporary, whatever the layer's width (a 2,816-row layer would otherwise hold
# several 200 MB temporaries at once); measured faster than one pass too (it stays in cache).
CLIP_CHUNK_ELEMENTS = 1 << 19


def _candidates(grid: int, symmetric: bool) -> int:
    return grid if symmetric else min(grid, 10) ** 2 + grid


def _mse_range_rows(
    wg: torch.Tensor,
    qtype: QType,
    symmetric: bool,
    weight: torch.Tensor | None,
    grid: int,
    min_shrink: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`weighted_mse_range` on a slice of rows (all candidates at once)."""
    wmin, wmax = wg.amin(-1), wg.amax(-1)  # (rows, ngroups)
    shrinks = torch.linspace(1.0, min_shrink, grid)
    if symmetric:
        a = b = shrinks
    else:  # coarse joint grid of both ends, plus the diagonal at full resolution
        coarse = torch.linspace(1.0, min_shrink, min(grid, 10))
        a = torch.cat([coarse.repeat_interleave(len(coarse)), shrinks])
        b = torch.cat([coarse.repeat(len(coarse)), shrinks])
    lo = wmin.unsqueeze(0) * a.view(-1, 1, 1)  # (P, rows, ngroups)
    hi = wmax.unsqueeze(0) * b.view(-1, 1, 1)
    scale, zero = scale_zero_from_range(lo, hi, qtype, symmetric)
    x = wg.unsqueeze(0)  # (1, rows, ngroups, G)
    q = torch.clamp(
        torch.round(x / scale.unsqueeze(-1)) + zero.unsqueeze(-1), qtype.qmin, qtype.qmax
    )
    err = ((q - zero.unsqueeze(-1)) * scale.unsqueeze(-1) - x).pow_(2)
    if weight is not None:
        err = err * weight
    best = err.sum(-1).argmin(0, keepdim=True)  # (1, rows, ngroups)
    return lo.gather(0, best)[0], hi.gather(0, best)[0]


def group_qparams(
    w: torch.Tensor, spec: QuantSpec, hdiag: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero ``(rows,)`` of one group of columns ``w`` ``(rows, G)`` under ``spec``."""
    wg = w.unsqueeze(1)  # (rows, 1, G)
    if spec.range_method == "mse":
        weight = None if hdiag is None else hdiag.reshape(1, 1, -1)
        lo, hi = weighted_mse_range(wg, spec.qtype, spec.symmetric, weight)
    else:
        lo, hi = wg.amin(-1), wg.amax(-1)
    scale, zero = scale_zero_from_range(lo, hi, spec.qtype, spec.symmetric)
    return scale[:, 0], zero[:, 0]


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    damp: float = 0.01,
    act_order: bool = True,
    block_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ codes, scales and zero points of a 2-D weight.

    Args:
        weight: ``(rows, cols)`` float weight.
        hessian: ``(cols, cols)``, ``sum_n x_n x_n^T`` over calibration inputs (any scale).
        spec: weight grid; per-channel or per-group (groups stay contiguous in the original
            column order, so the stored format does not depend on ``act_order``).
        damp: Hessian dampening, fraction of the mean diagonal.
        act_order: process columns by decreasing Hessian diagonal.
        block_size: lazy-update block width.

    Returns:
        ``codes`` ``(rows, cols)`` and ``scale``/``zero`` ``(rows, ngroups)``.
    """
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    rows, cols = w.shape
    gsize = spec.group_size if spec.granularity == "group" else cols
    if spec.granularity == "tensor" or cols % gsize:
        raise CompactnnError(f"GPTQ needs channel or group granularity dividing {cols} columns.")
    drop_dead_inputs(h, w)
    hdiag = h.diagonal().clone()
    perm = torch.argsort(hdiag, descending=True) if act_order else torch.arange(cols)
    w, h = w[:, perm], h[perm][:, perm]
    pos = torch.argsort(perm)  # original column -> processing position
    hinv = inverse_hessian_factor(h, damp, "GPTQ")
    ngroups = cols // gsize
    scale = torch.zeros(rows, ngroups)
    zero = torch.zeros(rows, ngroups)
    done = torch.zeros(ngroups, dtype=torch.bool)
    qw = torch.zeros_like(w)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(rows, i2 - i1), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = int(perm[i1 + i]) // gsize
            if not done[g]:  # lazily fit the group's grid on its error-compensated weights
                w[:, i1:i2] = w1
                idx = pos[g * gsize : (g + 1) * gsize]
                scale[:, g], zero[:, g] = group_qparams(w[:, idx], spec, hdiag[g * gsize :][:gsize])
                done[g] = True
            col = w1[:, i]
            q = quantize(col.view(rows, 1, 1), scale[:, g : g + 1], zero[:, g : g + 1], spec.qtype)
            qcol = dequantize(q, scale[:, g : g + 1], zero[:, g : g + 1]).view(rows)
            qw[:, i1 + i] = qcol
            e = (col - qcol) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    qw = qw[:, pos]  # back to the original column order
    grouped = qw.reshape(rows, ngroups, gsize)
    codes = quantize(grouped, scale, zero, spec.qtype).reshape(rows, cols)
    return codes, scale, zero
