"""Shared plumbing of the image-classifier references: train-or-load, calibration, top-1."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import ModuleType

import torch
from torch import nn

from compactnn.data import split as split_module
from compactnn.data.split import Split
from compactnn.models import cache, fit
from compactnn.models.reference import Reference


def seeded(make: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``make()`` with its initial weights drawn from ``seed``; the global RNG is restored."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def image_reference(
    name: str,
    make: Callable[[], nn.Module],
    split: Split,
    sources: list[ModuleType],
    *,
    seed: int,
    cfg: fit.FitConfig,
    progress: bool,
    n_calib: int = 512,
    calib_batch: int = 64,
) -> Reference:
    """Train ``make()`` on ``split`` (or load it from the cache) and wrap it as a Reference.

    Calibration: the first ``n_calib`` training images in batches of ``calib_batch``.
    Quality: top-1 percent on the test split. Example batch: the first 64 test images.
    """
    # the key covers the caller's model and data modules plus the shared training code
    files = cache.module_sources(*sources, sys.modules[__name__], fit, split_module)
    key = cache.cache_key(name, files, seed=seed, fit=repr(cfg), data=split_desc(split))

    def train(model: nn.Module) -> dict[str, str]:
        start, cpu_start = time.perf_counter(), time.process_time()
        score = fit.train_classifier(model, split, cfg, seed, f"training {name}", progress)
        return {
            "seed": str(seed),
            "top1": f"{score:.2f}",
            "train_seconds": f"{time.perf_counter() - start:.1f}",
            # one training thread: CPU time is the wall time on an idle core
            "train_cpu_seconds": f"{time.process_time() - cpu_start:.1f}",
        }

    model, _ = cache.load_or_train(name, key, seeded(make, seed), train)
    model.eval()
    x_calib = split.x_train[:n_calib]
    return Reference(
        name=name,
        model=model,
        calib=list(torch.split(x_calib, calib_batch)),
        evaluate=lambda m: fit.top1(m, split.x_test, split.y_test),
        metric="top1",
        example=split.x_test[:64],
        kind="cnn",
        skeleton=lambda: make().eval(),
    )


def split_desc(split: Split) -> str:
    """A short fingerprint of a split (sizes and normalisation) for cache keys."""
    shapes = f"{tuple(split.x_train.shape)}/{tuple(split.x_test.shape)}"
    return f"{shapes}/{split.mean:.6f}/{split.std:.6f}"
