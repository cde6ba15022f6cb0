"""TWN: ternary weight networks (Li et al., 2016).

Per layer, weights below the threshold ``delta = 0.7 * mean|w|`` become 0, the rest
``+-alpha`` with ``alpha`` the mean magnitude of the kept weights::

    w_t = alpha * sign(w) * [|w| > delta],   alpha = mean(|w| : |w| > delta)

The gradient reaches the latent float weights straight through. Frozen, a TWN layer is a
standard signed 2-bit layer: codes ``{-1, 0, +1}``, one scale ``alpha`` per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from compactnn.core.spec import QuantSpec
from compactnn.engines.qat import QATConfig, QATMethod
from compactnn.engines.qat_quantizers import WeightExport, check_ternary_bits, fp16
from compactnn.errors import CompactnnError
from compactnn.quant.base import short_act_spec, short_weight_spec
from compactnn.registry import register


def twn_ternary(w: torch.Tensor, ratio: float = 0.7) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, alpha)``: codes in ``{-1, 0, 1}`` (float, ``w``'s shape) and the scale."""
    w = w.detach()
    delta = ratio * w.abs().mean()
    keep = w.abs() > delta
    alpha = w.abs()[keep].mean() if keep.any() else w.new_zeros(())
    return torch.sign(w) * keep, alpha


class TWNWeight(nn.Module):
    """Ternary weights with TWN's threshold and per-layer scale."""

    spec = QuantSpec(bits=2, symmetric=True, granularity="tensor")

    def __init__(self, ratio: float = 0.7) -> None:
        super().__init__()
        self.ratio = ratio

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        codes, alpha = twn_ternary(w, self.ratio)
        alpha = fp16(alpha.clamp(min=2.0**-14))  # the scale the artifact stores
        return w + (alpha * codes - w).detach()

    def export(self, w: torch.Tensor) -> WeightExport:
        codes, alpha = twn_ternary(w, self.ratio)
        scale = fp16(alpha.clamp(min=2.0**-14)).reshape(1, 1)
        return WeightExport(codes.to(torch.int8), scale, torch.zeros(1, 1), self.spec)


@dataclass(frozen=True)
class TWNConfig(QATConfig):
    """TWN ternary weights, LSQ activations (recipe ``w2a8-twn``).

    Defaults: the specs of ``w2a8-twn``, 4 epochs, lr 1e-3, distillation 0.5 at T=4; first
    and last layers at 8 bits.

    Args:
        ratio: threshold as a multiple of the layer's mean |w| (0.7 in the paper).
    """

    weight: QuantSpec = field(default_factory=lambda: short_weight_spec(2))
    act: QuantSpec | None = field(default_factory=lambda: short_act_spec(8))
    epochs: int = 4
    distill: float = 0.5
    ratio: float = 0.7

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ternary_bits(self.weight.bits, "twn")
        if not 0.0 < self.ratio < 2.0:
            raise CompactnnError(f"ratio={self.ratio} must lie in (0, 2).")


def twn_weight_quantizer(layer: nn.Module, spec: QuantSpec, config: TWNConfig) -> nn.Module:
    """Engine hook: ternary weights at the config's threshold ratio (activations: LSQ)."""
    return TWNWeight(config.ratio)


register("twn", TWNConfig, "TWN: ternary weights, threshold 0.7 mean|w|, per-layer scale")(
    QATMethod(twn_weight_quantizer)
)
