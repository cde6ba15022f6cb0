"""Bi-Real Net (Liu et al., 2018): a real-valued shortcut around every binary conv, and a
piecewise-polynomial approximation of ``sign`` for its gradient::

    F(x) = -1 (x < -1),  2x + x^2 (-1 <= x < 0),  2x - x^2 (0 <= x < 1),  1 (x >= 1)
    dF/dx = 2 + 2x (-1 <= x < 0),  2 - 2x (0 <= x < 1),  0 elsewhere

The forward pass is ``sign``. Weights are binary with a per-filter scale (magnitude-aware).
The block (shortcut, fixed shift before the sign) and ``approx_sign`` live in
:mod:`compactnn.engines.binary`.
"""

from __future__ import annotations

from dataclasses import dataclass

from compactnn.engines.binary import BinaryConfig, binary_method
from compactnn.registry import register


@dataclass(frozen=True)
class BiRealConfig(BinaryConfig):
    """Bi-Real Net (recipe ``w1a1-bireal``).

    Defaults: 10 epochs but at least 600 optimizer steps, lr 3e-3, distillation 0.5 at T=4
    from the float model, batch norms re-estimated before freezing; first and last layers at
    8 bits (LSQ). Measured across nets in docs/lowbit-training.md.
    """

    epochs: int = 10
    lr: float = 3e-3
    min_steps: int = 600
    distill: float = 0.5


register("bireal", BiRealConfig, "Bi-Real Net: binary convs with real shortcuts")(
    binary_method("bireal")
)
