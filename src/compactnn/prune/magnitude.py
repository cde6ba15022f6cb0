"""One-shot unstructured magnitude pruning, layer-wise or global."""

from __future__ import annotations

import dataclasses
import re

from torch import nn

from compactnn.core.config import MethodConfig
from compactnn.core.context import CompressContext
from compactnn.errors import CompactnnError
from compactnn.prune.masks import (
    apply_masks,
    check_removes_some,
    check_sparsity,
    masks_from_scores,
    prunable_layers,
    skip_tied,
)
from compactnn.prune.shortnames import percent_fraction
from compactnn.prune.stats import model_counts, record_sparsity
from compactnn.prune.train import (
    ONE_SHOT_AGREEMENT,
    collapse_words,
    output_summary,
    warn_if_collapsed,
)
from compactnn.recipe import Recipe, Step
from compactnn.registry import register, register_short_name


@dataclasses.dataclass(frozen=True)
class MagnitudeConfig(MethodConfig):
    """Zero the smallest-magnitude weights.

    Args:
        sparsity: fraction of weights removed, in [0, 1).
        scope: ``"layer"`` removes that fraction from every targeted layer; ``"global"``
            ranks all targeted weights together (layers with small weights lose more), with
            a floor: each output row keeps its largest weight, so no layer is zeroed whole
            (a warning names the layers where the floor binds).
    """

    sparsity: float = 0.5
    scope: str = "layer"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_sparsity(self.sparsity)
        where, example = "MagnitudeConfig(sparsity=0)", "sparsity=0.5 (short name sp50)"
        check_removes_some(self.sparsity, where, "weights", example)
        if self.scope not in ("layer", "global"):
            raise CompactnnError(f"MagnitudeConfig.scope={self.scope!r}; use 'layer' or 'global'.")


@register("magnitude", MagnitudeConfig, "unstructured magnitude pruning (layer-wise or global)")
def apply_magnitude(
    model: nn.Module, targets: dict[str, nn.Module], config: MagnitudeConfig, ctx: CompressContext
) -> nn.Module:
    """Zero the ``sparsity`` fraction of smallest |w| in the targeted layers."""
    layers = prunable_layers(skip_tied(model, targets, ctx, "magnitude"), ctx)
    scores = {n: m.weight.detach().abs() for n, m in layers.items()}
    counts = model_counts(model, ctx)  # params and MACs before, for the record
    reference = output_summary(model, ctx) if ctx.batches else None  # for the collapse check
    apply_masks(model, masks_from_scores(scores, config.sparsity, config.scope, ctx))
    record_sparsity(ctx, "magnitude", layers, model, counts)
    if reference is not None:  # one-shot: warn below ONE_SHOT_AGREEMENT, as nm does
        s, p = config.sparsity, round(100 * config.sparsity)
        ways = [f"lower the sparsity (e.g. sp{round(50 * s)})"]
        ways.append(f"prune while self-distilling (sp{p}-gradual or sp{p}-dns)")
        words = collapse_words("magnitude", [f"sparsity {s:g}"], 0, 0.0, ways)
        warn_if_collapsed(model, reference, ctx, *words, min_agreement=ONE_SHOT_AGREEMENT)
    return model


@register_short_name(
    r"sp(?P<p>\d+)(?:-(?P<scope>magnitude|global))?",
    "sp<P>[-magnitude|-global]",
    ("sp50", "sp90-global"),
)
def _short_name(m: re.Match[str]) -> Recipe:
    scope = "global" if m["scope"] == "global" else "layer"
    config = MagnitudeConfig(sparsity=percent_fraction(m["p"], m.string), scope=scope)
    return Recipe(m.string, (Step("magnitude", config),))
