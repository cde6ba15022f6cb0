"""ReActNet (Liu et al., 2020): learned shifts before the sign and RPReLU after the block.

* RSign: ``sign(x - beta_c)`` with a learned per-channel ``beta`` (gradient of the sign:
  Bi-Real's polynomial approximation).
* RPReLU: ``PReLU(y - gamma_c) + zeta_c`` with learned per-channel ``gamma``, ``zeta`` and
  slope.
* Trained with a distributional loss against the float network: distillation at ``T = 1``
  with weight 1 by default.

Shortcuts and weights as in Bi-Real Net.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from compactnn.quant.qat import apply_qat
from compactnn.quant.xnor import BinaryConfig
from compactnn.registry import register


def rprelu(
    y: torch.Tensor, gamma: torch.Tensor, zeta: torch.Tensor, slope: torch.Tensor, dim: int
) -> torch.Tensor:
    """``PReLU(y - gamma) + zeta`` with per-channel parameters along ``dim``."""
    shape = [1] * y.dim()
    shape[dim] = -1
    z = y - gamma.reshape(shape)
    return torch.where(z >= 0, z, slope.reshape(shape) * z) + zeta.reshape(shape)


class RPReLU(nn.Module):
    """Per-channel shifted PReLU; ``dim``: the channel dimension (1 for convs, -1 for linear)."""

    def __init__(self, channels: int, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim
        self.gamma = nn.Parameter(torch.zeros(channels))
        self.zeta = nn.Parameter(torch.zeros(channels))
        self.slope = nn.Parameter(torch.full((channels,), 0.25))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return rprelu(y, self.gamma, self.zeta, self.slope, self.dim)


def rprelu_reference(y: torch.Tensor, gamma, zeta, slope) -> torch.Tensor:
    """The same through ``F.prelu`` (channels on dim 1), for checking."""
    return F.prelu(y - gamma.reshape(1, -1, *[1] * (y.dim() - 2)), slope) + zeta.reshape(
        1, -1, *[1] * (y.dim() - 2)
    )


@dataclass(frozen=True)
class ReActNetConfig(BinaryConfig):
    """ReActNet (recipe ``w1a1-reactnet``).

    Defaults: 10 epochs, lr 1e-3, shift lr 1e-2, distillation 1.0 at T=1 (the
    distributional loss); first and last layers at 8 bits (LSQ).
    """

    epochs: int = 10
    distill: float = 1.0
    temperature: float = 1.0
    binary_block = "reactnet"


register("reactnet", ReActNetConfig, "ReActNet: learned shifts, RPReLU, distillation")(apply_qat)
