"""Sizes: the bytes a recipe implies, and the bytes an artifact really takes on disk."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from compactnn.core.packing import packed_nbytes
from compactnn.export.artifact import pack_state


def theoretical_size(model: nn.Module) -> int:
    """Bytes implied by the recipe: packed codes (params x bits / 8), float16 scales,
    integer zero points of asymmetric grids, activation parameters, and every tensor the
    recipe keeps in float at its own width. Excludes file-format headers."""
    tensors, layers, _ = pack_state(model)
    total = 0
    for name, entry in layers.items():
        numel = 1
        for d in entry["shape"]:
            numel *= d
        bits = entry["weight_spec"]["bits"]
        groups = tensors[f"{name}.weight.scale"].numel()
        total += packed_nbytes(numel, bits) + 2 * groups
        if not entry["weight_spec"]["symmetric"]:
            total += groups  # one byte per zero point
        if entry["act_spec"] is not None:
            total += 8  # float32 scale and zero point
    packed_keys = {
        k for k in tensors if k.rsplit(".", 2)[0] in layers and (".weight." in k or ".input." in k)
    }
    for key, t in tensors.items():
        if key not in packed_keys:
            total += t.numel() * t.element_size()
    return total


def float_size(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers at their stored width (tied counted once)."""
    seen = set()
    total = 0
    for t in list(model.state_dict().values()):
        if t.data_ptr() in seen and t.numel():
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def artifact_size(path: str | os.PathLike) -> int:
    """Bytes on disk of every file in an artifact directory (``os.stat``)."""
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())
