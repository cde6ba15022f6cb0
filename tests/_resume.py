"""Shared by the exact-resume tests of the training-aware methods (BAP, PE-wise, sub-bit):
a small CNN on 4x4 inputs and the check that a run stopped at a step and resumed from its
checkpoint ends with the uninterrupted run's logits, bit for bit."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import compactnn
from compactnn.recipe import Recipe


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16, 4),
    ).eval()  # fmt: skip


def assert_resume_is_exact(recipe: Recipe, stops: tuple[int, ...], tmp_path: Path) -> None:
    """Train ``recipe`` (64 samples, seed 3) uninterrupted, then for each step in ``stops``
    stopped there (``max_steps``) and resumed: the logits must be equal."""
    x = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    y = torch.arange(64) % 4

    def run(**kw) -> nn.Module:
        return compactnn.train(small_cnn(), recipe, (x, y), seed=3, progress=False, **kw)

    want = run()(x).detach()
    for stop in stops:
        ckpt = tmp_path / f"ck{stop}"
        run(checkpoint_dir=str(ckpt), max_steps=stop)
        got = run(checkpoint_dir=str(ckpt))(x).detach()
        assert torch.equal(got, want), f"stopped at step {stop}: {(got - want).abs().max()}"
