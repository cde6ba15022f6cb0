"""Batches of one sample through a batch norm in training mode, found before training.

A batch norm in training mode normalises each channel with the batch's own mean and
variance; where it sees one value per channel per sample (``BatchNorm1d`` after a
``Linear``, a binary linear block's batch norm, a ``BatchNorm2d`` on a 1x1 map), a batch
of one sample has no variance and PyTorch refuses it ("Expected more than 1 value per
channel when training"). :func:`fit_batches` finds such a batch norm in the model being
trained (one forward of two samples in eval mode, without gradients: nothing changes),
refuses a ``batch_size`` or a data set too small for it before any training, and drops the
epoch's last batch when it would hold too few samples (said once, with a warning).

The same rule keeps every process of a distributed run busy: each trains on its own slice of
every batch, so a batch needs one sample per process (two per process for such a batch
norm): a smaller ``batch_size`` is refused, a last batch with fewer samples is dropped.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from compactnn.core.modules import eval_mode
from compactnn.errors import CompactnnError, user_stacklevel
from compactnn.training.data import TrainData, rows


def single_value_norm(model: nn.Module, x: torch.Tensor) -> str | None:
    """The name of the first batch norm of ``model`` that sees one value per channel per
    sample when ``model`` runs on ``x`` (so a batch of one sample cannot train it), or None.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
        >>> single_value_norm(net, torch.zeros(2, 4))
        '1'
        >>> conv = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3))
        >>> single_value_norm(conv, torch.zeros(2, 1, 4, 4)) is None
        True
    """
    n = max(rows(x), 1)
    found: list[str] = []

    def hook(name: str):
        def look(_module: nn.Module, args: tuple) -> None:
            t = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if t is not None and t.dim() >= 2 and t.numel() // (t.shape[1] * n) <= 1:
                found.append(name)

        return look

    norms = [
        (k, m) for k, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    handles = [m.register_forward_pre_hook(hook(k)) for k, m in norms]
    try:
        with eval_mode(model), torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def fit_batches(
    model: nn.Module, data: TrainData, batch_size: int, x: torch.Tensor, world_size: int = 1
) -> int:
    """The optimizer steps of an epoch of ``data`` for training ``model`` (example inputs
    ``x``) with batches of ``batch_size`` over ``world_size`` processes; sets
    ``data.min_batch`` when a batch needs more than one sample: one per process (each trains
    on its own slice), two per process for a batch norm that needs them.

    Raises:
        CompactnnError: ``batch_size`` (or a loader's) or the data is too small for it.
    """
    name = single_value_norm(model, x[:2])
    need = (1 if name is None else 2) * world_size  # the fewest samples of a batch
    if need <= 1:
        return data.steps(batch_size) or 1
    why, other = _why_needed(name, need, world_size)
    size, where, n = batch_size, "batch_size", None
    fix = f"set batch_size: {need} or more in the recipe's config"
    if data.loader is not None:  # its own batch size, else its first batch's
        size, where = getattr(data.loader, "batch_size", None), "the DataLoader's batch_size"
        fix = f"build the loader with batch_size={need} or more"
        if not isinstance(size, int):
            size, where = rows(x), "the loader's first batch size"
        elif not getattr(data.loader, "drop_last", True) and hasattr(data.loader, "dataset"):
            n = len(data.loader.dataset)  # a DataLoader's last batch: n % its batch_size
    else:
        size, n = batch_size, data.x.shape[0]
    held = "a loader" if n is None else f"{n} training sample{'s' * (n != 1)}"
    if size < need:
        raise CompactnnError(f"{where}={size} with {held}: {why}; {fix}, or {other}.")
    if n is not None and n < need:
        raise CompactnnError(
            f"the training data holds {held} ({where}={size}): {why}; "
            f"pass at least {need} training samples."
        )
    data.min_batch = need
    left = 0 if n is None else n % size
    if 0 < left < need:
        drop = "drop_last=True or " if data.loader is not None else ""
        warnings.warn(
            f"{where}={size} leaves {left} of the {held} for the last batch of each epoch, "
            f"and {why}: that batch is dropped (a shuffle picks other samples each epoch); "
            f"{drop}a batch size that leaves 0 or {need}+ over uses them all.",
            stacklevel=user_stacklevel(),
        )
    return data.steps(batch_size) or 1


def _why_needed(name: str | None, need: int, world_size: int) -> tuple[str, str]:
    """Why a batch needs ``need`` samples (``name``: the batch norm that needs two per
    process, or None), and the other way out than a larger batch.

    Example:
        >>> _why_needed(None, 2, 2)[0]
        'each of the 2 processes trains on its own slice of every batch, so a batch needs at \
least 2 samples (1 per process)'
    """
    if name is None:
        return (
            f"each of the {world_size} processes trains on its own slice of every batch, so a "
            f"batch needs at least {need} samples (1 per process)",
            "run fewer processes",
        )
    per = f" ({world_size} processes: 2 per process)" if world_size > 1 else ""
    return (
        f"batch norm {name!r} normalises one value per channel per sample, so in training "
        f"mode it needs batches of at least {need} samples{per}",
        "fold or remove that batch norm",
    )
