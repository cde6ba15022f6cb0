"""The optimizer's parameter groups and the learning-rate schedule of ``compactnn.train``."""

from __future__ import annotations

import math

import torch
from torch import nn

_QUANT_PARAM_MARKS = (".weight_quantizer.", ".input_quantizer.", ".post.")


def param_groups(model: nn.Module, lr: float, lr_quant: float) -> list[dict]:
    """Weights and biases at ``lr``; quantizer parameters (steps, clips, scales, shifts,
    RPReLU) at ``lr_quant``."""
    quant, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_quant = any(m in f".{name}" for m in _QUANT_PARAM_MARKS) or name.endswith(
            ("shift", "gain")
        )
        (quant if is_quant else rest).append(p)
    groups = [{"params": rest, "lr": lr}]
    if quant:
        groups.append({"params": quant, "lr": lr_quant})
    return groups


def epochs_for_min_steps(epochs: int, steps_per_epoch: int, min_steps: int) -> int:
    """The recipe's ``epochs``, raised so that training makes at least ``min_steps``
    optimizer steps (binary recipes on small datasets: ``docs/lowbit-training.md``).

    Example:
        >>> epochs_for_min_steps(10, 23, 600)  # digits-resnet: 23 steps per epoch
        27
    """
    if min_steps <= 0 or epochs == 0:
        return epochs
    return max(epochs, -(-min_steps // max(steps_per_epoch, 1)))


def lr_schedule(opt: torch.optim.Optimizer, total: int, warmup: int = 0):
    """Cosine decay to 0 over ``total`` steps; with ``warmup``, a linear ramp from
    ``1/warmup`` of the learning rate over the first ``warmup`` steps, then the cosine over
    the rest."""
    if warmup <= 0:
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    warmup = min(warmup, max(total - 1, 1))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
