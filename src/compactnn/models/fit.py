"""The small, deterministic training loop of the image reference models, and top-1."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from compactnn.core.progress import bar
from compactnn.data.split import Split


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """How a reference classifier is trained (part of its cache key).

    Args:
        epochs: passes over the training split.
        batch_size: images per step.
        max_lr: peak learning rate of the one-cycle schedule (AdamW).
        weight_decay: AdamW weight decay.
        max_shift: random translation, as a fraction of the image side (augmentation).
        max_rotation: random rotation in radians (augmentation).
        max_scale: random zoom, ``1 +- max_scale`` (augmentation).
        limit: train on only the first ``limit`` training images (tests); None: all.
    """

    epochs: int = 8
    batch_size: int = 64
    max_lr: float = 1e-2
    weight_decay: float = 1e-4
    max_shift: float = 2 / 28
    max_rotation: float = 0.2
    max_scale: float = 0.1
    limit: int | None = None


def augment(x: torch.Tensor, background: float, cfg: FitConfig, gen: torch.Generator):
    """Random small affine warps of a batch ``(N, 1, H, W)``; the border gets ``background``."""
    n = x.shape[0]

    def uniform(*shape: int) -> torch.Tensor:  # in [-1, 1)
        return torch.rand(*shape, generator=gen) * 2 - 1

    angle = uniform(n) * cfg.max_rotation
    scale = 1 + uniform(n) * cfg.max_scale
    shift = uniform(n, 2) * cfg.max_shift * 2  # affine_grid spans [-1, 1]: a side is 2 units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )  # (N, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x - background, grid, align_corners=False) + background


def train_classifier(
    model: nn.Module, split: Split, cfg: FitConfig, seed: int, desc: str, progress: bool = True
) -> float:
    """Train ``model`` in place on ``split``'s training images; return test top-1 (percent).

    Deterministic for a given seed: the shuffling and the augmentation draw from their own
    generator (the global RNG is left as it was), and training runs on one thread, so the
    weights do not depend on the machine's core count. One thread is also the faster choice
    for these small batches, by far on a busy machine (2 threads were 2-5x slower under load).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(model, split, cfg, seed, desc, progress)
    finally:
        torch.set_num_threads(threads)


def _train(
    model: nn.Module, split: Split, cfg: FitConfig, seed: int, desc: str, progress: bool
) -> float:
    x, y = split.x_train, split.y_train
    if cfg.limit is not None:
        x, y = x[: cfg.limit], y[: cfg.limit]
    gen = torch.Generator().manual_seed(seed)
    background = (0.0 - split.mean) / split.std  # a black pixel, normalised
    steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.max_lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.max_lr, total_steps=cfg.epochs * steps_per_epoch
    )
    model.train()
    for _ in bar(range(cfg.epochs), desc=desc, unit="epoch", progress=progress):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            loss = F.cross_entropy(model(augment(x[idx], background, cfg, gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return top1(model, split.x_test, split.y_test)


def top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 250) -> float:
    """Percent of ``x`` that ``model`` classifies as ``y`` (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            logits = model(x[i : i + batch_size])
            correct += int((logits.argmax(-1) == y[i : i + batch_size]).sum())
    model.train(was_training)
    return 100.0 * correct / len(x)
