"""TTQ: trained ternary quantization (Zhu et al., 2017).

Weights above ``delta = t * max|w|`` become the learned ``W_p``, below ``-delta`` the learned
``-W_n``, the rest 0. Gradients (the paper's equations 7-8)::

    dL/dW_p = sum over {w > delta} of dL/dw_t
    dL/dW_n = sum over {w < -delta} of -dL/dw_t
    dL/dw   = W_p * dL/dw_t (w > delta),  1 * dL/dw_t (|w| <= delta),  W_n * dL/dw_t (w < -delta)

Frozen, the two scales do not fit one uniform grid, so the layer stores 2-bit codes with a
per-layer codebook ``[-W_n, 0, W_p, 0]``.
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


class TTQFunction(torch.autograd.Function):
    """``W_p [w > delta] - W_n [w < -delta]`` with TTQ's gradients."""

    @staticmethod
    def forward(ctx, w, wp, wn, delta):
        pos, neg = w > delta, w < -delta
        ctx.save_for_backward(pos, neg, wp, wn)
        return wp * pos - wn * neg

    @staticmethod
    def backward(ctx, grad):
        pos, neg, wp, wn = ctx.saved_tensors
        scale = torch.where(pos, wp, torch.where(neg, wn, torch.ones_like(wp)))
        return grad * scale, (grad * pos).sum(), -(grad * neg).sum(), None


def ttq_quantize(w: torch.Tensor, wp: torch.Tensor, wn: torch.Tensor, t: float) -> torch.Tensor:
    """TTQ forward with threshold ``t * max|w|`` (see the module docstring for gradients).
    The scales' values are the float16 ones the artifact stores (their gradients pass
    straight through the rounding), so the trained model computes what the frozen one does."""
    delta = t * w.detach().abs().max()
    wp, wn = wp + (fp16(wp) - wp).detach(), wn + (fp16(wn) - wn).detach()
    return TTQFunction.apply(w, wp, wn, delta)


class TTQWeight(nn.Module):
    """Learned positive and negative scales, initialised to the mean magnitudes kept."""

    spec = QuantSpec(bits=2, symmetric=False, granularity="tensor")

    def __init__(self, weight: torch.Tensor, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold
        w = weight.detach()
        delta = threshold * w.abs().max()
        pos, neg = w[w > delta], -w[w < -delta]
        self.wp = nn.Parameter(pos.mean() if pos.numel() else w.abs().mean())
        self.wn = nn.Parameter(neg.mean() if neg.numel() else w.abs().mean())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return ttq_quantize(w, self.wp, self.wn, self.threshold)

    def export(self, w: torch.Tensor) -> WeightExport:
        w = w.detach()
        delta = self.threshold * w.abs().max()
        codes = torch.ones_like(w, dtype=torch.uint8)  # code 1: zero
        codes[w > delta] = 2
        codes[w < -delta] = 0
        wp, wn = self.wp.detach(), self.wn.detach()
        levels = fp16(torch.stack([-wn, wn.new_zeros(()), wp, wp.new_zeros(())])).reshape(1, 1, 4)
        one = torch.ones(1, 1)
        return WeightExport(codes, one, torch.zeros(1, 1), self.spec, levels)


@dataclass(frozen=True)
class TTQConfig(QATConfig):
    """TTQ ternary weights, LSQ activations (recipe ``w2a8-ttq``).

    Defaults: the specs of ``w2a8-ttq``, 4 epochs, lr 1e-3, scale lr 1e-3, distillation 0.5
    at T=4; first and last layers at 8 bits.

    Args:
        threshold: ``t`` in ``delta = t * max|w|`` (0.05 in the paper).
    """

    weight: QuantSpec = field(default_factory=lambda: short_weight_spec(2))
    act: QuantSpec | None = field(default_factory=lambda: short_act_spec(8))
    epochs: int = 4
    distill: float = 0.5
    threshold: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ternary_bits(self.weight.bits, "ttq")
        if not 0.0 < self.threshold < 1.0:
            raise CompactnnError(f"threshold={self.threshold} must lie in (0, 1).")


def ttq_weight_quantizer(layer: nn.Module, spec: QuantSpec, config: TTQConfig) -> nn.Module:
    """Engine hook: learned positive and negative scales (activations: LSQ)."""
    return TTQWeight(layer.weight, config.threshold)


register("ttq", TTQConfig, "TTQ: ternary weights with learned positive/negative scales")(
    QATMethod(ttq_weight_quantizer)
)
