"""Probe Pruning's sliced products: a linear layer run on a subset of its rows or columns.

The weights are sliced (not masked), so the products really shrink; a layer's
``input_quantizer`` (a quantized layer) still rounds its input first.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def sliced_linear(layer: nn.Linear, x: torch.Tensor, rows=None, cols=None) -> torch.Tensor:
    """``layer(x)`` restricted to output ``rows`` or input ``cols`` (weights sliced, not masked)."""
    quantizer = getattr(layer, "input_quantizer", None)
    if quantizer is not None:
        x = quantizer(x)
    w, b = layer.weight, layer.bias
    if rows is not None:
        w = w.index_select(0, rows)
        b = None if b is None else b.index_select(0, rows)
    if cols is not None:
        w = w.index_select(1, cols)
    return F.linear(x, w, b)


def rows_per_sample(layer: nn.Linear, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Sample ``b`` of ``x`` ``(B, T, C)`` through ``layer``'s output rows ``keep[b]`` only."""
    quantizer = getattr(layer, "input_quantizer", None)
    if quantizer is not None:
        x = quantizer(x)
    out = torch.bmm(x, layer.weight[keep].transpose(1, 2))  # (B, T, K)
    return out if layer.bias is None else out + layer.bias[keep].unsqueeze(1)


def cols_per_sample(layer: nn.Linear, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Sample ``b`` of ``h`` ``(B, T, K)`` through ``layer``'s input columns ``keep[b]`` only."""
    quantizer = getattr(layer, "input_quantizer", None)
    if quantizer is not None:
        h = quantizer(h)
    w = layer.weight.t()[keep]  # (B, K, C_out)
    out = torch.bmm(h, w)
    return out if layer.bias is None else out + layer.bias
