"""The pruning-schedule engine: masks revised on a schedule while the model trains.

A method subclasses :class:`ScheduledPruner` and supplies one hook, ``update(step)``: revise
the masks (with :func:`~compactnn.prune.masks.set_mask`) at training step ``step`` (0 at
construction, then 1, 2, ... after each optimizer step). The engine attaches the masks, counts
steps and bakes the masks at the end; :func:`prune_while_distilling` is the loop that runs a
pruner inside :func:`compactnn.compress` (self-distillation on the calibration batches).

In your own loop::

    pruner = SomePruner(model, config)     # masks attached here
    opt = torch.optim.SGD(model.parameters(), lr=0.01)   # build the optimizer afterwards
    for x, y in loader:
        loss(model(x), y).backward(); opt.step(); opt.zero_grad()
        pruner.step()
    pruner.finish()                         # plain weights with exact zeros
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from compactnn.core.context import CompressContext
from compactnn.prune.masks import attach_masks, bake_masks, prunable_layers
from compactnn.prune.train import distill_steps


def weight_layer_names(model: nn.Module) -> list[str]:
    """Names of every Linear / Conv1d / Conv2d layer of ``model`` (the default to prune)."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d)
    return [n for n, m in model.named_modules() if isinstance(m, kinds)]


class ScheduledPruner:
    """Mask schedule for a training loop: call ``step()`` after every optimizer step.

    Args:
        model: pruned in place; all-ones masks are attached at construction (build the
            optimizer afterwards so it holds the dense parameters).
        names: layers to prune (default: every Linear/Conv weight layer).
        straight_through: the gradient of ``W * mask`` reaches every dense weight, pruned
            or not (DNS splices weights back); otherwise pruned weights get no gradient.

    Subclasses implement :meth:`update` and call it with step 0 once their state is set.
    """

    def __init__(
        self, model: nn.Module, names: list[str] | None = None, straight_through: bool = False
    ) -> None:
        self.model, self.t = model, 0
        self.names = list(weight_layer_names(model) if names is None else names)
        ones = {n: torch.ones_like(model.get_submodule(n).weight) for n in self.names}
        attach_masks(model, ones, straight_through=straight_through)

    def update(self, step: int) -> None:
        """The hook: revise the masks at training step ``step``."""
        raise NotImplementedError

    def mask(self, name: str) -> torch.Tensor:
        """The current mask of layer ``name``."""
        return self.model.get_submodule(name).parametrizations.weight[0].mask

    def step(self) -> None:
        """Advance one training step; the masks change on the method's schedule."""
        self.t += 1
        self.update(self.t)

    def finish(self) -> None:
        """Remove the masks, leaving plain weights with exact zeros."""
        bake_masks(self.model)


def prune_while_distilling(
    model: nn.Module,
    targets: dict[str, nn.Module],
    ctx: CompressContext,
    make_pruner: Callable[[nn.Module, list[str]], ScheduledPruner],
    steps: int,
    lr: float,
    desc: str,
) -> ScheduledPruner:
    """Prune ``model`` in place on a schedule while it learns to reproduce the unpruned
    model's outputs on the calibration batches; the masks are baked at the end.

    Args:
        model: the model to prune (a copy made by ``compress``).
        targets: the step's targeted modules; the prunable ones are pruned.
        ctx: calibration batches and bookkeeping.
        make_pruner: ``(model, layer names) -> pruner`` (attaches the masks).
        steps: Adam steps in all (schedule plus fine-tuning with the final masks).
        lr: Adam learning rate.
        desc: progress-bar label (the method's name).

    Returns:
        The finished pruner (its ``names`` are the pruned layers).
    """
    layers = prunable_layers(targets, ctx)
    teacher = copy.deepcopy(model)
    pruner = make_pruner(model, list(layers))
    distill_steps(model, teacher, ctx, steps, lr, lambda _i: pruner.step(), desc)
    pruner.finish()
    return pruner
