"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with second-order reconstruction.

Per layer, with ``H = 2/N X^T X`` from calibration inputs, columns are visited left to
right in blocks; within a block the weights with the lowest ``w^2 / [H^-1]_jj^2`` are pruned
(adaptive mask per block, or the ``m - n`` lowest of every ``m`` for N:M), and each pruned
or kept column's error is pushed onto the columns not yet visited through the Cholesky
factor of ``H^-1`` (the OBS update), so the layer output is reconstructed.
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

import torch
from torch import nn

from compactnn.core.context import CompressContext
from compactnn.core.hessian import drop_dead_inputs, inverse_hessian_factor
from compactnn.errors import CompactnnError
from compactnn.prune.layerwise import (
    OneShotConfig,
    in_order,
    input_hessian,
    oneshot_layers,
    warn_if_oneshot_collapsed,
)
from compactnn.prune.shortnames import percent_fraction
from compactnn.prune.stats import model_counts, record_sparsity
from compactnn.prune.train import output_summary
from compactnn.recipe import Recipe, Step
from compactnn.registry import register, register_short_name


@dataclasses.dataclass(frozen=True)
class SparseGPTConfig(OneShotConfig):
    """SparseGPT pruning.

    Args:
        block_size: columns per lazy-update block (also the adaptive-mask block).
        damp: dampening added to H's diagonal, as a fraction of its mean diagonal.
    """

    needs_calibration: ClassVar[bool] = True

    config_version: ClassVar[int] = 2  # 2: ``blocksize`` renamed ``block_size``
    renamed_fields: ClassVar[dict[str, str]] = {"blocksize": "block_size"}

    block_size: int = 128
    damp: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block_size < 1 or not 0.0 < self.damp < 1.0:
            raise CompactnnError("SparseGPTConfig: block_size >= 1 and 0 < damp < 1.")
        if self.n and self.block_size % self.m:
            raise CompactnnError(f"SparseGPTConfig: block_size must be a multiple of m={self.m}.")


def sparsegpt_prune(w: torch.Tensor, h: torch.Tensor, config: SparseGPTConfig) -> torch.Tensor:
    """Pruned and reconstructed copy of a ``(out, K)`` weight, given ``(K, K)`` Hessian."""
    w = w.detach().double().clone()
    h = h.double().clone()
    drop_dead_inputs(h, w)  # inputs that never fire: zero columns, H_jj = 1
    hinv = inverse_hessian_factor(h, config.damp, "SparseGPT")  # (K, K) upper
    cols = w.shape[1]
    prune_per_group = config.m - config.n if config.n else 0
    for i1 in range(0, cols, config.block_size):
        i2 = min(i1 + config.block_size, cols)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        d = torch.diag(hinv1)  # (block,)
        if prune_per_group:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        else:
            score = w1**2 / d.unsqueeze(0) ** 2
            k = round(score.numel() * config.sparsity)
            mask1 = torch.zeros_like(w1, dtype=torch.bool).reshape(-1)
            mask1[torch.argsort(score.reshape(-1), stable=True)[:k]] = True
            mask1 = mask1.reshape(w1.shape)
        for i in range(i2 - i1):
            if prune_per_group and i % config.m == 0:
                score = w1[:, i : i + config.m] ** 2 / d[i : i + config.m].unsqueeze(0) ** 2
                low = torch.topk(score, prune_per_group, dim=1, largest=False).indices
                mask1.scatter_(1, i + low, True)
            col = w1[:, i]
            q = torch.where(mask1[:, i], torch.zeros_like(col), col)
            e = (col - q) / d[i]
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w


@register("sparsegpt", SparseGPTConfig, "SparseGPT one-shot pruning with OBS reconstruction")
def apply_sparsegpt(
    model: nn.Module, targets: dict[str, nn.Module], config: SparseGPTConfig, ctx: CompressContext
) -> nn.Module:
    """Prune and reconstruct each layer in execution order from its calibration Hessian.

    One-shot: warns below ``ONE_SHOT_AGREEMENT`` top-1 agreement with the float model
    (:func:`~compactnn.prune.layerwise.warn_if_oneshot_collapsed`).
    """
    ctx.require_calibration("sparsegpt", 64)
    layers = oneshot_layers(model, targets, config, ctx, "sparsegpt")
    if not layers:
        raise CompactnnError("sparsegpt: no Linear or Conv2d layer among the step's targets.")
    counts = model_counts(model, ctx)  # params and MACs before, for the record
    reference = output_summary(model, ctx)  # the float outputs, for the collapse check
    for name in ctx.bar(in_order(model, list(layers), ctx), desc="sparsegpt"):
        layer = layers[name]
        w = layer.weight.detach()
        h = input_hessian(model, name, ctx)
        new = sparsegpt_prune(w.reshape(w.shape[0], -1), h, config)
        with torch.no_grad():
            layer.weight.copy_(new.reshape(w.shape).to(w.dtype))
    record_sparsity(ctx, "sparsegpt", layers, model, counts)
    warn_if_oneshot_collapsed(model, reference, config, ctx, "sparsegpt")
    return model


@register_short_name(r"sp(?P<p>\d+)-sparsegpt", "sp<P>-sparsegpt", ("sp50-sparsegpt",))
def _sparse_name(m: re.Match[str]) -> Recipe:
    config = SparseGPTConfig(sparsity=percent_fraction(m["p"], m.string))
    return Recipe(m.string, (Step("sparsegpt", config),))


@register_short_name(
    r"nm(?P<n>\d+):(?P<m>\d+)-sparsegpt", "nm<N>:<M>-sparsegpt", ("nm2:4-sparsegpt",)
)
def _nm_name(m: re.Match[str]) -> Recipe:
    return Recipe(m.string, (Step("sparsegpt", SparseGPTConfig(n=int(m["n"]), m=int(m["m"]))),))
