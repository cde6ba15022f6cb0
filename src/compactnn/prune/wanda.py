"""Wanda (Sun et al., 2023): prune by |weight| x ||input activation||, no weight update.

Each weight's score is ``|W_ij| * ||X_j||_2`` (the norm of its input feature over the
calibration tokens). Unstructured pruning compares scores within each output row, as the
paper does; N:M keeps the ``n`` best of every ``m`` inputs.
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

import torch
from torch import nn

from compactnn.core.context import CompressContext
from compactnn.errors import CompactnnError
from compactnn.prune.layerwise import (
    OneShotConfig,
    in_order,
    input_sq_norms,
    oneshot_layers,
    warn_if_oneshot_collapsed,
)
from compactnn.prune.masks import apply_masks, nm_mask
from compactnn.prune.shortnames import percent_fraction
from compactnn.prune.stats import model_counts, record_sparsity
from compactnn.prune.train import output_summary
from compactnn.recipe import Recipe, Step
from compactnn.registry import register, register_short_name


@dataclasses.dataclass(frozen=True)
class WandaConfig(OneShotConfig):
    """Wanda pruning; see :class:`OneShotConfig` for the fields."""

    needs_calibration: ClassVar[bool] = True


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


@register("wanda", WandaConfig, "Wanda one-shot pruning: |w| x ||x|| from calibration data")
def apply_wanda(
    model: nn.Module, targets: dict[str, nn.Module], config: WandaConfig, ctx: CompressContext
) -> nn.Module:
    """Prune each layer in execution order from its calibration input norms.

    One-shot: warns below ``ONE_SHOT_AGREEMENT`` top-1 agreement with the float model
    (:func:`~compactnn.prune.layerwise.warn_if_oneshot_collapsed`).
    """
    ctx.require_calibration("wanda", 64)
    layers = oneshot_layers(model, targets, config, ctx, "wanda")
    if not layers:
        raise CompactnnError("wanda: no Linear or Conv2d layer among the step's targets.")
    counts = model_counts(model, ctx)  # params and MACs before, for the record
    reference = output_summary(model, ctx)  # the float outputs, for the collapse check
    for name in ctx.bar(in_order(model, list(layers), ctx), desc="wanda"):
        w = layers[name].weight.detach()
        mask = wanda_mask(w.reshape(w.shape[0], -1), input_sq_norms(model, name, ctx), config)
        apply_masks(model, {name: mask.reshape(w.shape)})
    record_sparsity(ctx, "wanda", layers, model, counts)
    warn_if_oneshot_collapsed(model, reference, config, ctx, "wanda")
    return model


@register_short_name(r"sp(?P<p>\d+)-wanda", "sp<P>-wanda", ("sp50-wanda",))
def _sparse_name(m: re.Match[str]) -> Recipe:
    config = WandaConfig(sparsity=percent_fraction(m["p"], m.string))
    return Recipe(m.string, (Step("wanda", config),))


@register_short_name(r"nm(?P<n>\d+):(?P<m>\d+)-wanda", "nm<N>:<M>-wanda", ("nm2:4-wanda",))
def _nm_name(m: re.Match[str]) -> Recipe:
    return Recipe(m.string, (Step("wanda", WandaConfig(n=int(m["n"]), m=int(m["m"]))),))
