"""Wanda (Sun et al., 2023): prune by |weight| x ||input activation||, no weight update.

Each weight's score is ``|W_ij| * ||X_j||_2`` (the norm of its input feature over the
calibration tokens). Unstructured pruning compares scores within each output row, as the
paper does; N:M keeps the ``n`` best of every ``m`` inputs.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from compactnn.core.config import MethodConfig
from compactnn.core.context import CompressContext
from compactnn.errors import CompactnnError
from compactnn.prune.layerwise import in_order, input_sq_norms, supported
from compactnn.prune.masks import apply_masks, check_sparsity, prunable_layers
from compactnn.prune.nm import check_divides, check_nm, nm_mask
from compactnn.prune.stats import record_sparsity
from compactnn.registry import register


@dataclasses.dataclass(frozen=True)
class OneShotConfig(MethodConfig):
    """Shared fields of calibration-based one-shot pruning.

    Args:
        sparsity: unstructured fraction removed, in [0, 1) (ignored when ``n`` is set).
        n: N of an N:M pattern (0: unstructured).
        m: M of an N:M pattern.
    """

    sparsity: float = 0.5
    n: int = 0
    m: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_sparsity(self.sparsity)
        if self.n or self.m:
            check_nm(self.n, self.m)


@dataclasses.dataclass(frozen=True)
class WandaConfig(OneShotConfig):
    """Wanda pruning; see :class:`OneShotConfig` for the fields."""


def wanda_mask(
    weight2d: torch.Tensor, sq_norms: torch.Tensor, config: OneShotConfig
) -> torch.Tensor:
    """Mask of a ``(out, K)`` weight from per-input ``||x||^2`` ``(K,)``."""
    score = weight2d.abs() * sq_norms.sqrt().unsqueeze(0)  # (out, K)
    if config.n:
        return nm_mask(score, config.n, config.m)
    k = round(config.sparsity * score.shape[1])  # pruned per output row
    low = torch.argsort(score, dim=1, stable=True)[:, :k]
    return torch.ones_like(score).scatter_(1, low, 0.0)


def check_layers(layers: dict[str, nn.Module], config: OneShotConfig) -> None:
    if config.n:
        for name, layer in layers.items():
            check_divides(name, layer.weight, config.m)


@register("wanda", WandaConfig, "Wanda one-shot pruning: |w| x ||x|| from calibration data")
def apply_wanda(
    model: nn.Module, targets: dict[str, nn.Module], config: WandaConfig, ctx: CompressContext
) -> nn.Module:
    """Prune each layer in execution order from its calibration input norms."""
    ctx.require_calibration("wanda", 64)
    layers = {n: m for n, m in prunable_layers(targets, ctx).items() if supported(n, m, ctx)}
    check_layers(layers, config)
    if not layers:
        raise CompactnnError("wanda: no Linear or Conv2d layer among the step's targets.")
    for name in ctx.bar(in_order(model, list(layers), ctx), desc="wanda"):
        w = layers[name].weight.detach()
        mask = wanda_mask(w.reshape(w.shape[0], -1), input_sq_norms(model, name, ctx), config)
        apply_masks(model, {name: mask.reshape(w.shape)})
    record_sparsity(ctx, "wanda", layers)
    return model
