"""Bi-Real Net (Liu et al., 2018): a real-valued shortcut around every binary conv, and a
piecewise-polynomial approximation of ``sign`` for its gradient::

    F(x) = -1 (x < -1),  2x + x^2 (-1 <= x < 0),  2x - x^2 (0 <= x < 1),  1 (x >= 1)
    dF/dx = 2 + 2x (-1 <= x < 0),  2 - 2x (0 <= x < 1),  0 elsewhere

The forward pass is ``sign``. Weights are binary with a per-filter scale (magnitude-aware).
The block itself (shortcut, shift before the sign) lives in :mod:`compactnn.quant.binary`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compactnn.quant.qat import apply_qat
from compactnn.quant.xnor import BinaryConfig, SignSTE
from compactnn.registry import register


def approx_sign_grad(x: torch.Tensor) -> torch.Tensor:
    """Bi-Real's ``dF/dx``: ``2 - 2|x|`` inside ``(-1, 1)``, 0 outside."""
    return torch.clamp(2 - 2 * x.abs(), min=0.0)


class ApproxSign(SignSTE):
    """``sign_pm1(x)`` forward (inherited), the polynomial approximation's derivative backward."""

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * approx_sign_grad(x)


def approx_sign(x: torch.Tensor) -> torch.Tensor:
    return ApproxSign.apply(x)


@dataclass(frozen=True)
class BiRealConfig(BinaryConfig):
    """Bi-Real Net (recipe ``w1a1-bireal``).

    Defaults: 10 epochs, lr 1e-3, distillation 0.5 at T=4 from the float model; first and
    last layers at 8 bits (LSQ).
    """

    epochs: int = 10
    distill: float = 0.5
    binary_block = "bireal"


register("bireal", BiRealConfig, "Bi-Real Net: binary convs with real shortcuts")(apply_qat)
