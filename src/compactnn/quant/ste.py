"""STE: round-to-nearest in the forward pass, straight-through gradient in the backward pass.

The plain QAT baseline (BinaryConnect's idea applied to any grid): weights are quantized
per output channel with a min-max asymmetric grid recomputed at every step; activations use
a min-max range tracked by an exponential moving average. Gradients pass through ``round``
unchanged inside the grid and are zero where values were clipped. The weight quantizer
(:class:`~compactnn.engines.qat_quantizers.STEWeight`) is shared with PACT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compactnn.core.qtype import QType
from compactnn.core.quantize import scale_zero_from_range
from compactnn.core.spec import QuantSpec
from compactnn.engines.qat import QATConfig, QATMethod
from compactnn.engines.qat_quantizers import STEWeight, check_act_bits, clipped_ste_quant
from compactnn.registry import register


def ste_fake_quant(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """``(clamp(round(x / s) + z, qmin, qmax) - z) * s``; gradient 1 inside the grid, 0 outside."""
    return clipped_ste_quant(x, scale, zero, qmin, qmax)


class STEAct(nn.Module):
    """Asymmetric per-tensor activation grid on an EMA of the batch min and max."""

    def __init__(self, bits: int, momentum: float = 0.9) -> None:
        super().__init__()
        self.spec = QuantSpec(bits=bits, symmetric=False, granularity="tensor")
        self.momentum = momentum
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.observing = False
        self.seen = False

    def start_observing(self) -> None:
        self.observing = True

    def finish_observing(self) -> None:
        self.observing = False

    def _track(self, x: torch.Tensor) -> None:
        lo, hi = x.detach().min(), x.detach().max()
        if not self.seen or self.observing:
            lo, hi = (lo, hi) if not self.seen else (self.lo.minimum(lo), self.hi.maximum(hi))
        else:
            lo = self.momentum * self.lo + (1 - self.momentum) * lo
            hi = self.momentum * self.hi + (1 - self.momentum) * hi
        self.lo.copy_(lo)
        self.hi.copy_(hi)
        self.seen = True

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return scale_zero_from_range(self.lo, self.hi, self.spec.qtype, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing or (self.training and torch.is_grad_enabled()):
            self._track(x)
        if self.observing:
            return x
        qt: QType = self.spec.qtype
        scale, zero = self.qparams()
        return ste_fake_quant(x, scale, zero, qt.qmin, qt.qmax)

    def export(self) -> tuple[QuantSpec, torch.Tensor, torch.Tensor]:
        scale, zero = self.qparams()
        return self.spec, scale.reshape(()), zero.reshape(())


@dataclass(frozen=True)
class STEConfig(QATConfig):
    """Straight-through QAT: min-max grids, the recipe's weight spec (``w4a4-ste``).

    Defaults: 3 epochs, lr 1e-3; first and last layers at 8 bits.
    """


def ste_weight_quantizer(layer: nn.Module, spec: QuantSpec, config: STEConfig) -> nn.Module:
    """Engine hook: round-to-nearest weights on the layer's spec, straight-through."""
    return STEWeight(spec)


def ste_act_quantizer(layer: nn.Module, spec: QuantSpec, config: STEConfig) -> nn.Module:
    """Engine hook: min-max activation grid on an EMA of the batch ranges."""
    check_act_bits(spec.bits, "ste")
    return STEAct(spec.bits)


register("ste", STEConfig, "straight-through QAT with min-max grids")(
    QATMethod(ste_weight_quantizer, ste_act_quantizer)
)
