"""Gradual magnitude pruning on the cubic schedule of Zhu & Gupta (2017).

Sparsity rises from ``initial_sparsity`` to ``final_sparsity`` between ``begin_step`` and
``end_step``: ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** 3``, updating masks
every ``frequency`` steps. Pruned weights are masked, receive no gradient and stay pruned.

Use it in your own loop::

    pruner = GradualPruner(model, GradualConfig(final_sparsity=0.9, end_step=2000))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)   # build the optimizer after the pruner
    for x, y in loader:
        loss(model(x), y).backward(); opt.step(); opt.zero_grad()
        pruner.step()
    pruner.finish()                                       # plain weights with exact zeros
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

import torch
from torch import nn

from compactnn.core.config import MethodConfig
from compactnn.core.context import CompressContext
from compactnn.engines.prune_schedule import ScheduledPruner, prune_while_distilling
from compactnn.errors import CompactnnError
from compactnn.prune.masks import (
    check_removes_some,
    check_sparsity,
    dense_weight,
    masks_from_scores,
    set_mask,
    skip_tied,
)
from compactnn.prune.shortnames import percent_fraction
from compactnn.prune.stats import model_counts, record_sparsity
from compactnn.prune.train import collapse_words, output_summary, warn_if_collapsed
from compactnn.recipe import Recipe, Step
from compactnn.registry import register, register_short_name


@dataclasses.dataclass(frozen=True)
class GradualConfig(MethodConfig):
    """Cubic-schedule gradual pruning.

    Args:
        final_sparsity: sparsity reached at ``end_step``, in [0, 1).
        initial_sparsity: sparsity applied at ``begin_step``.
        begin_step: first pruning step.
        end_step: last pruning step (the schedule's end).
        frequency: steps between mask updates.
        scope: ``"layer"`` or ``"global"`` ranking.
        finetune_steps: extra steps after ``end_step`` with the final mask fixed
            (inside ``compress``; in your own loop just keep training).
        lr: Adam learning rate of the self-distillation loop inside ``compress``.
    """

    needs_calibration: ClassVar[bool] = True  # the schedule self-distils on the batches

    final_sparsity: float = 0.9
    initial_sparsity: float = 0.0
    begin_step: int = 0
    # 1e-4 and 200+100 steps left 90%-sparse CNNs answering one class (10% top-1); these
    # hold on mnist-cnn and a digits CNN (docs/pruning.md, "Self-distillation defaults")
    end_step: int = 600
    frequency: int = 20
    scope: str = "layer"
    finetune_steps: int = 400
    lr: float = 3e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        check_sparsity(self.final_sparsity, "final_sparsity")
        check_sparsity(self.initial_sparsity, "initial_sparsity")
        where, example = "GradualConfig(final_sparsity=0)", "final_sparsity=0.9 (sp90-gradual)"
        check_removes_some(self.final_sparsity, where, "weights", example)
        if not 0 <= self.begin_step < self.end_step:
            raise CompactnnError(
                f"GradualConfig: need 0 <= begin_step ({self.begin_step}) < end_step "
                f"({self.end_step})."
            )
        if self.frequency < 1:
            raise CompactnnError(f"GradualConfig.frequency={self.frequency} must be >= 1.")
        if self.scope not in ("layer", "global"):
            raise CompactnnError(f"GradualConfig.scope={self.scope!r}; use 'layer' or 'global'.")


def cubic_sparsity(step: int, config: GradualConfig) -> float:
    """Target sparsity at ``step`` on the Zhu & Gupta cubic schedule."""
    s_i, s_f = config.initial_sparsity, config.final_sparsity
    if step < config.begin_step:
        return 0.0
    t = min(1.0, (step - config.begin_step) / (config.end_step - config.begin_step))
    return s_f + (s_i - s_f) * (1.0 - t) ** 3


class GradualPruner(ScheduledPruner):
    """Cubic mask schedule for a training loop: call ``step()`` after every optimizer step.

    Args:
        model: the model to prune in place (masks are attached at construction; build the
            optimizer afterwards so it holds the dense parameters).
        config: the schedule.
        names: layers to prune (default: every Linear/Conv weight layer).
    """

    def __init__(
        self, model: nn.Module, config: GradualConfig, names: list[str] | None = None
    ) -> None:
        super().__init__(model, names)
        self.config = config
        self.sparsity = 0.0
        self.update(0)

    def update(self, step: int) -> None:
        """Re-rank the kept weights by magnitude when a mask update is due at ``step``."""
        target = cubic_sparsity(step, self.config)
        due = step >= self.config.begin_step and (
            (step - self.config.begin_step) % self.config.frequency == 0
            or step == self.config.end_step
        )
        if not due or step > self.config.end_step or target == self.sparsity:
            return
        with torch.no_grad():
            scores = {n: (dense_weight(self.model, n) * self.mask(n)).abs() for n in self.names}
            for n, mask in masks_from_scores(scores, target, self.config.scope).items():
                set_mask(self.model, n, mask)
        self.sparsity = target


@register("gradual", GradualConfig, "gradual magnitude pruning, cubic schedule (Zhu & Gupta)")
def apply_gradual(
    model: nn.Module, targets: dict[str, nn.Module], config: GradualConfig, ctx: CompressContext
) -> nn.Module:
    """Prune on the cubic schedule while distilling from the unpruned model on the
    calibration batches, then fine-tune with the final masks."""
    counts = model_counts(model, ctx)  # params and MACs before, for the record
    reference = output_summary(model, ctx)  # the unpruned outputs, for the collapse check
    steps = config.end_step + config.finetune_steps
    pruner = prune_while_distilling(
        model,
        skip_tied(model, targets, ctx, "gradual"),
        ctx,
        lambda m, names: GradualPruner(m, config, names),
        steps,
        config.lr,
        "gradual",
    )
    record_sparsity(
        ctx, "gradual", {n: model.get_submodule(n) for n in pruner.names}, model, counts
    )
    warn_if_collapsed(model, reference, ctx, *_collapse_words(config))
    return model


def _collapse_words(config: GradualConfig) -> tuple[str, str]:
    """The collapse warning's words for a gradual step (:func:`collapse_words`)."""
    s, a, b = config.final_sparsity, config.end_step, config.finetune_steps
    fields = {"final_sparsity": s, "end_step": 2 * max(a, 300), "finetune_steps": 2 * max(b, 200)}
    lower = [f"lower the sparsity (e.g. sp{round(50 * s)}-gradual)"]
    what, pruner = [f"final sparsity {s:g}"], " with a GradualPruner"
    return collapse_words("gradual", what, f"{a}+{b}", config.lr, lower, fields, pruner)


@register_short_name(r"sp(?P<p>\d+)-gradual", "sp<P>-gradual", ("sp90-gradual",))
def _short_name(m: re.Match[str]) -> Recipe:
    config = GradualConfig(final_sparsity=percent_fraction(m["p"], m.string))
    return Recipe(m.string, (Step("gradual", config),))
