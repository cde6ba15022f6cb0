"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint holds the wrapped model's state, the optimizer and scheduler states, the torch
RNG state, the position (epoch, batch within the epoch, global step), the history so far,
and what defines the run (the recipe's YAML, epochs, batch size, seed). It is written with
``atomic_write`` (temporary file, fsync, rename), so an interruption never leaves a broken
checkpoint, and read with ``torch.load(weights_only=True)`` (no arbitrary unpickling).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from compactnn.errors import CompactnnError
from compactnn.export.fs import atomic_write

CHECKPOINT = "qat-checkpoint.pt"


def checkpoint_path(directory: str | os.PathLike) -> Path:
    return Path(directory) / CHECKPOINT


def save_checkpoint(directory: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically to ``directory/qat-checkpoint.pt``."""
    path = checkpoint_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    return path


def load_checkpoint(directory: str | os.PathLike, run: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint in ``directory`` if there is one, after checking it belongs to ``run``.

    Raises:
        CompactnnError: the checkpoint was written by another recipe or another run
            configuration (its schedule would not continue this one), or is unreadable.
    """
    path = checkpoint_path(directory)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=True)
    except Exception as exc:
        raise CompactnnError(f"checkpoint {str(path)!r} cannot be read: {exc}") from exc
    theirs = state.get("run", {})
    if theirs.get("recipe_yaml") != run["recipe_yaml"]:
        raise CompactnnError(
            f"checkpoint {str(path)!r} was written by recipe {theirs.get('recipe')!r}, not "
            f"{run['recipe']!r}: its quantizers and weights do not fit this recipe. Use another "
            "checkpoint directory, or pass resume=False (--no-resume) to start over."
        )
    for key in ("epochs", "batch_size", "seed"):
        if theirs.get(key) != run[key]:
            raise CompactnnError(
                f"checkpoint {str(path)!r} was written with {key}={theirs.get(key)}, this run "
                f"has {key}={run[key]}: resuming would not continue the same schedule. Use the "
                "same settings, another checkpoint directory, or pass resume=False "
                "(--no-resume) to start over."
            )
    return state
