"""Training loops the pruning methods share.

``distill_steps`` recovers accuracy inside :func:`compactnn.compress` without labels: the
pruned model learns to reproduce the float model's outputs on the calibration batches (a
self-distillation loss), while a callback updates masks on the method's schedule.
``finetune`` is the labelled loop for users who bring their own data; pass any pruner with a
``step()`` method (gradual, DNS) or none to keep the current zeros fixed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from compactnn.core.calib import main_output
from compactnn.core.context import CompressContext
from compactnn.prune.masks import attach_masks, bake_masks, zero_masks

output_tensor = main_output  # the main tensor of a model output


def distill_steps(
    student: nn.Module,
    teacher: nn.Module,
    ctx: CompressContext,
    steps: int,
    lr: float,
    on_step: Callable[[int], None] | None = None,
    desc: str = "fine-tune",
) -> None:
    """Train ``student`` for ``steps`` Adam steps to match ``teacher``'s outputs (MSE) on the
    calibration batches, cycling through them. ``on_step(i)`` runs after each update.

    Batch norm and dropout stay in eval mode: calibration sets are small, and re-estimating
    running statistics on a few batches would cost more accuracy than it buys.
    """
    if steps <= 0:
        return
    ctx.require_calibration(desc, 64)
    teacher.eval()
    with torch.no_grad():
        targets = [output_tensor(ctx.run(teacher, b)).detach() for b in ctx.batches]
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    student.eval()
    for i in ctx.bar(range(steps), desc=desc, leave=False):
        k = i % len(ctx.batches)
        loss = nn.functional.mse_loss(output_tensor(ctx.run(student, ctx.batches[k])), targets[k])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(i)


def finetune(
    model: nn.Module,
    loader: Iterable,
    epochs: int = 1,
    lr: float = 1e-3,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    pruner: Any = None,
) -> nn.Module:
    """Fine-tune ``model`` in place on ``(inputs, labels)`` batches, keeping its sparsity.

    Without ``pruner`` the current zeros of every weight layer are frozen as masks (zero
    weights stay exactly zero); with a pruner (``GradualPruner``, ``DNSPruner``) its ``step()``
    runs after each optimizer step and it owns the masks. Masks are baked at the end.

    Example:
        >>> from compactnn.prune.train import finetune
        >>> sparse = compactnn.compress(model, "sp90")          # doctest: +SKIP
        >>> finetune(sparse, train_loader)                      # doctest: +SKIP
    """
    loss_fn = loss_fn or nn.functional.cross_entropy
    if pruner is None:
        attach_masks(model, {n: m for n, m in zero_masks(model).items() if m.min() == 0})
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if pruner is not None:
                pruner.step()
    model.eval()
    if pruner is not None and hasattr(pruner, "finish"):
        pruner.finish()
    bake_masks(model)
    return model
