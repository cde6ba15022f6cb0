"""Counting what pruning saves: parameters, non-zeros and multiply-accumulates."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compactnn.core.calib import call_model
from compactnn.core.context import CompressContext


def count_params(model: nn.Module) -> int:
    """Number of parameters (every tensor in ``model.parameters()``)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example: Any) -> int:
    """Multiply-accumulates of Linear and Conv layers for one call on ``example``.

    Conv: ``out.numel() * in_channels / groups * prod(kernel)``; Linear:
    ``out.numel() * in_features``. Other ops (norms, activations, attention products) are
    not counted: they are the same before and after channel pruning or scale with it.
    """
    total = [0]

    def hook(m, _args, out):
        if isinstance(m, nn.Linear):
            total[0] += out.numel() * m.in_features
        else:
            k = int(torch.tensor(m.kernel_size).prod())
            total[0] += out.numel() * (m.in_channels // m.groups) * k

    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            call_model(model, example)
    finally:
        for h in handles:
            h.remove()
    return total[0]


def record_sparsity(ctx: CompressContext, method: str, layers: dict[str, nn.Module]) -> None:
    """Note the achieved per-layer sparsity in the artifact's ``extra`` (for the report)."""
    stats = {}
    for name, m in layers.items():
        w = m.weight.detach()
        stats[name] = round(1.0 - float((w != 0).sum()) / w.numel(), 4)
    ctx.extra.setdefault("pruning", {})[method] = stats
