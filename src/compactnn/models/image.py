"""Shared plumbing of the image-classifier references: train-or-load, calibration, top-1."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

from torch import nn

from compactnn.data.split import Split
from compactnn.models import fit
from compactnn.models.lazy import lazy_image_reference, seeded, split_desc
from compactnn.models.reference import Reference

__all__ = ["image_reference", "seeded", "split_desc"]


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
    :func:`compactnn.models.lazy.lazy_image_reference` with a split already in memory.
    """
    return lazy_image_reference(
        name, make, lambda: split, split_desc(split), sources, seed=seed, cfg=cfg,
        progress=progress, n_calib=n_calib, calib_batch=calib_batch,
    )  # fmt: skip
