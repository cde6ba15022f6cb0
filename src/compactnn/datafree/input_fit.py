"""Why a generated input shape does not fit a model: its channels, or its height and width.

``generate(model, n, input_shape=(C, H, W))`` runs the model on two noise images first. When
that fails, the message should name the part of the shape at fault: the channels (the first
convolution takes another C), the size a Flatten-then-Linear model takes
(:func:`compactnn.core.input_size.size_hint`), or a size too small for the model's pooling
and strides, with the smallest square size that runs (:func:`smallest_side`, a few probes of
two zero images).
"""

from __future__ import annotations

import torch
from torch import nn

from compactnn.core.calib import expected_input_hint
from compactnn.core.input_size import size_hint

_WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.Embedding)
MAX_SIDE = 512  # larger probes cost too much for an error message


def runs_at(model: nn.Module, x: torch.Tensor, side: int) -> bool:
    """Whether ``model`` runs on two zero images of ``x``'s channels at ``side x side``."""
    try:
        with torch.no_grad():
            model(x.new_zeros((2, x.shape[1], side, side)))
    except Exception:  # any failure: this size does not run
        return False
    return True


def smallest_side(model: nn.Module, x: torch.Tensor, limit: int = MAX_SIDE) -> int | None:
    """The smallest square side above ``x``'s that ``model`` runs at (sizes doubled, then
    bisected: a model that runs at a size runs at larger ones), None up to ``limit``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.Flatten(1))
        >>> smallest_side(net, torch.zeros(2, 1, 1, 1))
        4
    """
    low = max(int(x.shape[2]), int(x.shape[3]))  # fails
    high = 2 * low
    while not runs_at(model, x, high):
        low, high = high, 2 * high
        if high > limit:
            return None
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if runs_at(model, x, mid) else (mid, high)
    return high


def misfit_message(model: nn.Module, x: torch.Tensor, cause: str) -> str:
    """The one-line refusal of ``input_shape = x.shape[1:]`` (``cause``: PyTorch's line)."""
    shape = tuple(int(d) for d in x.shape[1:])
    name = type(model).__name__
    fix = "(--input-shape C,H,W in the CLI)"
    first = next((m for m in model.modules() if isinstance(m, _WEIGHT_LAYERS)), None)
    image = x.dim() == 4 and isinstance(first, nn.Conv2d)
    if image and first.in_channels == shape[0]:  # the channels fit: the size does not
        size = f"{shape[1]}x{shape[2]}"
        if (hint := size_hint(model, x)) is not None:
            return (
                f"input_shape={shape}: {name} does not take {size} images; it takes {hint}. "
                f"Pass that per-sample (C, H, W) {fix}."
            )
        side = smallest_side(model, x)
        if side is not None:
            return (
                f"input_shape={shape}: height x width {size} is too small for {name} "
                f"({cause}); the smallest square size it runs at is {side}x{side}. Pass "
                f"the size the model was trained at, e.g. input_shape=({shape[0]}, 28, 28) "
                f"for 28x28 images, at least ({shape[0]}, {side}, {side}) {fix}."
            )
    return (
        f"input_shape={shape} does not fit the model: it expects "
        f"{expected_input_hint(model)} ({cause}). Pass the per-sample (C, H, W) the model "
        f"was built for {fix}."
    )
