"""The image size a convolutional model takes, read from the Linear after its convolutions.

A model whose convolutions end in ``flatten`` and an ``nn.Linear`` takes one image size
only; an input of another size fails inside torch with "mat1 and mat2 shapes cannot be
multiplied (16x9216 and 16384x10)", which names neither size. :func:`size_hint` finds the
size that works (probes of one zero image, each stopped at that Linear) for the messages
of :mod:`compactnn.core.calib`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

_WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.Embedding)


class _LinearReached(Exception):
    """Stops a probe at the first ``nn.Linear`` it reaches (:func:`_first_linear_input`)."""


def _first_linear_input(model: nn.Module, x: torch.Tensor) -> tuple[str, int, int] | None:
    """``(name, in_features, features it got)`` of the first ``nn.Linear`` that ``model``
    reaches on ``x``, when that layer gets a flattened ``(N, F)`` input; None when it gets
    another rank or the forward fails before any Linear. Runs in eval mode without gradients
    (training flags restored) and stops at that layer."""
    names = {m: n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    seen: list[tuple[str, int, Any]] = []

    def hook(m: nn.Module, args: tuple) -> None:
        seen.append((names[m], m.in_features, args[0] if args else None))
        raise _LinearReached

    handles = [m.register_forward_pre_hook(hook) for m in names]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    except _LinearReached:
        pass
    except Exception:  # the input fails before any Linear: not a size the probe can judge
        return None
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    if not seen or not isinstance(seen[0][2], torch.Tensor) or seen[0][2].dim() != 2:
        return None
    name, need, t = seen[0]
    return name, need, int(t.shape[1])


def size_hint(model: nn.Module, batch: Any) -> str | None:
    """The image size a Conv2d model with a Linear after its convolutions takes, when an
    ``(N, C, H, W)`` ``batch`` with the right C gives that Linear the wrong number of
    features; None otherwise (a channel or dtype fault keeps :func:`expected_input_hint`).

    The size is the batch's scaled by ``sqrt(in_features / features given)`` (features grow
    with H x W), checked by probes of one zero image that stop at that Linear.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(256, 2))
        >>> size_hint(net, torch.zeros(2, 3, 6, 6))
        "(N, 3, 8, 8) (Linear '2' takes 256 features; 6x6 inputs give it 144)"
    """
    first = next((m for m in model.modules() if isinstance(m, _WEIGHT_LAYERS)), None)
    if not isinstance(first, nn.Conv2d) or not isinstance(batch, torch.Tensor):
        return None
    if batch.dim() != 4 or batch.shape[0] == 0 or batch.shape[1] != first.in_channels:
        return None
    if (found := _first_linear_input(model, batch[:1])) is None or found[1] == found[2]:
        return None
    name, need, got = found
    c, h, w = (int(d) for d in batch.shape[1:])
    takes = f"takes {need} features; {h}x{w} inputs give it {got}"
    size, given = (h, w), got
    for _ in range(3):  # a small image rounds off: refine from the first guess's features
        scale = math.sqrt(need / max(given, 1))
        side = round(math.sqrt(size[0] * size[1]) * scale)  # a square image, second
        guesses = dict.fromkeys([(round(size[0] * scale), round(size[1] * scale)), (side, side)])
        for base in guesses:
            for d in (0, 1, -1, 2, -2):  # padding and strides round sizes a little
                if _probe(model, batch, (base[0] + d, base[1] + d)) == need:
                    return f"(N, {c}, {base[0] + d}, {base[1] + d}) (Linear {name!r} {takes})"
        size = next(iter(guesses))
        if not (given := _probe(model, batch, size)):
            break
    return f"(N, {c}, H, W) sized for Linear {name!r} (it {takes})"


def _probe(model: nn.Module, batch: torch.Tensor, size: tuple[int, int]) -> int:
    """Features the first Linear gets from one zero image of ``size`` (0: none, or a size
    too small or above 1024 a side, not tried)."""
    if min(size) < 1 or max(size) > 1024:
        return 0
    found = _first_linear_input(model, batch.new_zeros((1, batch.shape[1], *size)))
    return 0 if found is None else found[2]
