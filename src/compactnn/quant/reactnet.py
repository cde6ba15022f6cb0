"""ReActNet (Liu et al., 2020): learned shifts before the sign and RPReLU after the block.

* RSign: ``sign(x - beta_c)`` with a learned per-channel ``beta`` (gradient of the sign:
  Bi-Real's polynomial approximation).
* RPReLU: ``PReLU(y - gamma_c) + zeta_c`` with learned per-channel ``gamma``, ``zeta`` and
  slope.
* Trained with a distributional loss against the float network: distillation at ``T = 1``
  with weight 1 by default.

Shortcuts and weights as in Bi-Real Net. The block and ``RPReLU`` live in
:mod:`compactnn.engines.binary`.
"""

from __future__ import annotations

from dataclasses import dataclass

from compactnn.engines.binary import BinaryConfig, binary_method
from compactnn.registry import register


@dataclass(frozen=True)
class ReActNetConfig(BinaryConfig):
    """ReActNet (recipe ``w1a1-reactnet``).

    Defaults: 10 epochs but at least 600 optimizer steps, lr 3e-3, shift lr 1e-2,
    distillation 1.0 at T=1 (the distributional loss), batch norms re-estimated before
    freezing; first and last layers at 8 bits (LSQ). Measured across nets in
    docs/lowbit-training.md.
    """

    epochs: int = 10
    lr: float = 3e-3
    min_steps: int = 600
    distill: float = 1.0
    temperature: float = 1.0


register("reactnet", ReActNetConfig, "ReActNet: learned shifts, RPReLU, distillation")(
    binary_method("reactnet")
)
