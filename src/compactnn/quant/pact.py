"""PACT: parameterized clipping activation (Choi et al., 2018).

Activations are clipped to a learned ``[0, alpha]`` and quantized on ``2**k - 1`` steps::

    y = clamp(x, 0, alpha),   y_hat = round(y * n / alpha) * alpha / n,   n = 2**k - 1

with the straight-through gradient ``dy_hat/dalpha = 1`` where ``x >= alpha`` and 0 elsewhere
(plus an L2 penalty on ``alpha``, folded into the optimizer's weight decay here: none by
default). Signed inputs use ``[-alpha * |qmin| / qmax, alpha]`` on a signed grid. Weights use
straight-through min-max quantization per output channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compactnn.core.spec import QuantSpec
from compactnn.engines.qat import QATConfig, QATMethod
from compactnn.engines.qat_quantizers import ObservingAct, STEWeight
from compactnn.registry import register


def pact_quantize(x: torch.Tensor, alpha: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Clip to ``[alpha * qmin / qmax, alpha]``, round to steps of ``alpha / qmax``.

    Gradients: to ``x`` 1 inside the clip, 0 outside; to ``alpha`` 1 above the clip,
    ``qmin / qmax`` below it, 0 inside (PACT's straight-through rule).
    """
    hi = alpha
    y = torch.minimum(x, hi)
    if qmin < 0:
        y = torch.maximum(y, alpha * (qmin / qmax))
    else:
        y = torch.clamp(y, min=0.0)
    step = alpha / qmax
    return y + (step * torch.round(y / step) - y).detach()


class PACTAct(ObservingAct):
    """Learned clip ``alpha`` (initialised to the calibrated max |x|)."""

    def __init__(self, bits: int) -> None:
        super().__init__(bits)
        self.alpha = nn.Parameter(torch.ones(()))

    def init_from_stats(self, stats: dict[str, float]) -> None:
        with torch.no_grad():
            self.alpha.fill_(max(abs(stats["min"]), abs(stats["max"]), 1e-6))

    def step_size(self) -> torch.Tensor:
        return self.alpha.detach().abs() / self.grid[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            return self.observe(x)
        qn, qp = self.grid
        return pact_quantize(x, self.alpha.abs() + 1e-12, qn, qp)


@dataclass(frozen=True)
class PACTConfig(QATConfig):
    """PACT activations with straight-through min-max weights (recipe ``w4a4-pact``).

    Defaults: 3 epochs, lr 1e-3, clip lr 1e-2, distillation 0.5 at T=4; first and last layers
    at 8 bits.
    """

    lr_quant: float = 1e-2
    distill: float = 0.5


def pact_weight_quantizer(layer: nn.Module, spec: QuantSpec, config: PACTConfig) -> nn.Module:
    """Engine hook: straight-through min-max weights on the layer's spec."""
    return STEWeight(spec)


def pact_act_quantizer(layer: nn.Module, spec: QuantSpec, config: PACTConfig) -> nn.Module:
    """Engine hook: a learned clip ``alpha``."""
    return PACTAct(spec.bits)


register("pact", PACTConfig, "PACT: learned activation clipping QAT")(
    QATMethod(pact_weight_quantizer, pact_act_quantizer)
)
