"""N:M semi-structured sparsity (e.g. 2:4): at most N non-zeros in every M consecutive
weights along the input dimension, the pattern sparse tensor cores accelerate.

The pattern is chosen by magnitude and kept exactly through the optional fine-tuning
(the mask is a parametrization, so pruned weights cannot regrow).
"""

from __future__ import annotations

import copy
import dataclasses
import re

import torch
from torch import nn

from compactnn.core.config import MethodConfig
from compactnn.core.context import CompressContext
from compactnn.errors import CompactnnError
from compactnn.prune.masks import (
    attach_masks,
    bake_masks,
    check_divides,
    check_nm,
    keep_nm_divisible,
    nm_mask,
    prunable_layers,
    skip_tied,
)
from compactnn.prune.stats import model_counts, record_sparsity
from compactnn.prune.train import (
    FINETUNE_HINT_STEPS,
    MIN_AGREEMENT,
    ONE_SHOT_AGREEMENT,
    collapse_words,
    distill_steps,
    output_summary,
    warn_if_collapsed,
)
from compactnn.recipe import Recipe, Step
from compactnn.registry import register, register_short_name


@dataclasses.dataclass(frozen=True)
class NMConfig(MethodConfig):
    """N:M sparsity by magnitude.

    Args:
        n: weights kept in each group.
        m: group length along the input dimension (layers it does not divide stay dense).
        finetune_steps: self-distillation steps on the calibration batches with the
            pattern fixed (0: one-shot).
        lr: Adam learning rate of that fine-tuning.
    """

    n: int = 2
    m: int = 4
    finetune_steps: int = 0
    lr: float = 1e-4

    def needs_data(self) -> bool:
        """Fine-tuning self-distils on the calibration batches; one-shot N:M reads none."""
        return self.finetune_steps > 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_nm(self.n, self.m)
        if self.finetune_steps < 0:
            raise CompactnnError(f"NMConfig.finetune_steps={self.finetune_steps} must be >= 0.")


def nm_masks(scores: dict[str, torch.Tensor], n: int, m: int) -> dict[str, torch.Tensor]:
    """N:M masks of each layer from its importance scores (checked for divisibility)."""
    out = {}
    for name, s in scores.items():
        check_divides(name, s, m)
        out[name] = nm_mask(s, n, m)
    return out


def holds_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of ``m`` input weights has at most ``n`` non-zeros."""
    groups = weight.detach().reshape(weight.shape[0], -1, m)
    return bool(((groups != 0).sum(-1) <= n).all())


@register("nm", NMConfig, "N:M semi-structured sparsity (e.g. 2:4) by magnitude")
def apply_nm(
    model: nn.Module, targets: dict[str, nn.Module], config: NMConfig, ctx: CompressContext
) -> nn.Module:
    """Keep the ``n`` largest |w| of every ``m``; optionally fine-tune with the pattern fixed.

    Layers whose input size ``m`` does not divide (a first conv with 1x3x3 = 9 inputs) stay
    dense, with one warning naming them (also in the model's notes); when no targeted layer
    is left, that is an error.
    """
    layers = prunable_layers(skip_tied(model, targets, ctx, "nm"), ctx)
    layers = keep_nm_divisible(layers, config.n, config.m, ctx, "nm")
    counts = model_counts(model, ctx)  # params and MACs before, for the record
    masks = nm_masks({k: v.weight.detach().abs() for k, v in layers.items()}, config.n, config.m)
    reference = output_summary(model, ctx) if ctx.batches else None  # for the collapse check
    teacher = copy.deepcopy(model) if config.finetune_steps else None
    attach_masks(model, masks)
    if teacher is not None:
        distill_steps(model, teacher, ctx, config.finetune_steps, config.lr, desc="nm fine-tune")
    bake_masks(model)
    record_sparsity(ctx, "nm", layers, model, counts)
    if reference is not None:  # one-shot: its -ft form is the cheap remedy, so warn earlier
        least = MIN_AGREEMENT if config.finetune_steps else ONE_SHOT_AGREEMENT
        warn_if_collapsed(model, reference, ctx, *_collapse_words(config), min_agreement=least)
    return model


def _collapse_words(config: NMConfig) -> tuple[str, str]:
    """The collapse warning's words for an N:M step (:func:`collapse_words`)."""
    n, m, steps, pattern = config.n, config.m, config.finetune_steps, f"{config.n}:{config.m}"
    ways = [] if steps else [f"self-distil with the pattern fixed (nm{pattern}-ft)"]
    ways += [f"keep more weights per group (e.g. nm{min(2 * n, m - 1)}:{m})"] if n < m - 1 else []
    ways += [
        f"prune from calibration data (nm{pattern}-wanda or nm{pattern}-sparsegpt)",
        "keep the sensitive layers dense (--ignore NAME)",
    ]
    fields = {"n": n, "m": m, "finetune_steps": max(2 * steps, FINETUNE_HINT_STEPS)}
    return collapse_words("nm", [pattern], steps, config.lr, ways, fields)


SHORT_FT_STEPS = 1000  # `-ft`: 98.4-98.5% on mnist-cnn at 2:4, lr 1e-4 (docs/pruning.md)


@register_short_name(
    r"nm(?P<n>\d+):(?P<m>\d+)(?P<ft>-ft)?", "nm<N>:<M>[-ft]", ("nm2:4", "nm2:4-ft")
)
def _short_name(m: re.Match[str]) -> Recipe:
    """``nm2:4``: one-shot by magnitude; ``-ft``: then :data:`SHORT_FT_STEPS`
    self-distillation steps on the calibration batches at the default lr."""
    steps = SHORT_FT_STEPS if m["ft"] else 0
    return Recipe(
        m.string, (Step("nm", NMConfig(n=int(m["n"]), m=int(m["m"]), finetune_steps=steps)),)
    )
