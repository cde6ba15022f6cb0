"""LSQ: learned step size quantization (Esser et al., 2020).

``v_hat = clamp(round(v / s), Qn, Qp) * s`` with the step ``s`` learned. Its gradient
(straight-through for ``round``)::

    dv_hat/dv = 1                       if Qn < v/s < Qp, else 0
    dv_hat/ds = round(v/s) - v/s        if Qn < v/s < Qp
                Qn or Qp                at or beyond the clip

and the step's gradient is multiplied by ``g = 1 / sqrt(N * Qp)`` (``N``: elements sharing
the step) so that step and weights learn at comparable rates. Weights: symmetric signed grid
per output channel, step initialised by the MSE-optimal clip. Activations: per tensor,
unsigned after ReLU and signed otherwise, step initialised to ``2 mean|x| / sqrt(Qp)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from compactnn.core.quantize import grouped_view
from compactnn.core.ranges import estimate_range
from compactnn.core.spec import QuantSpec
from compactnn.quant.qat import ObservingAct, QATConfig, WeightExport, apply_qat, fp16
from compactnn.registry import register


class LSQFunction(torch.autograd.Function):
    """``clamp(round(v / s), qn, qp) * s`` with LSQ's gradients; ``s`` broadcasts to ``v``."""

    @staticmethod
    def forward(ctx, v, s, qn: int, qp: int, g: float):
        r = v / s
        ctx.save_for_backward(r, s)
        ctx.qn, ctx.qp, ctx.g = qn, qp, g
        return torch.clamp(torch.round(r), qn, qp) * s

    @staticmethod
    def backward(ctx, grad):
        r, s = ctx.saved_tensors
        below, above = r <= ctx.qn, r >= ctx.qp
        inside = ~(below | above)
        grad_v = grad * inside
        ds = torch.where(below, float(ctx.qn), torch.where(above, float(ctx.qp), r.round() - r))
        grad_s = (grad * ds * ctx.g).sum_to_size(s.shape)
        return grad_v, grad_s, None, None, None


def lsq_quantize(v: torch.Tensor, s: torch.Tensor, qn: int, qp: int, g: float) -> torch.Tensor:
    """LSQ fake quantization (see the module docstring for the gradient)."""
    return LSQFunction.apply(v, s, qn, qp, g)


def stored_step(step: torch.Tensor) -> torch.Tensor:
    """``|step|`` as the artifact stores it (float16-representable, at least ``2**-14``),
    with the gradient of ``|step|``: training then computes exactly what the frozen layer
    computes. A binary network after an LSQ layer flips signs on the smallest difference."""
    s = step.abs().clamp(min=2.0**-14)
    return s + (fp16(s) - s).detach()


def lsq_grad_scale(numel: int, qp: int) -> float:
    """The step-size gradient scale ``1 / sqrt(N * Qp)``."""
    return 1.0 / math.sqrt(max(numel, 1) * max(qp, 1))


class LSQWeight(nn.Module):
    """Per-output-channel learned step on a symmetric signed ``bits`` grid."""

    def __init__(self, weight: torch.Tensor, bits: int) -> None:
        super().__init__()
        self.spec = QuantSpec(bits=bits, symmetric=True, granularity="channel", range_method="mse")
        qt = self.spec.qtype
        self.qn, self.qp = qt.qmin, qt.qmax
        wg = grouped_view(weight.detach().float(), "channel")  # (out, 1, K)
        _, hi = estimate_range(wg, "mse", qt, True)
        step = (hi / max(self.qp, 1)).clamp(min=1e-8)  # (out, 1)
        self.step = nn.Parameter(step.reshape(-1, *([1] * (weight.dim() - 1))))
        self.g = lsq_grad_scale(wg.shape[-1], self.qp)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return lsq_quantize(w, stored_step(self.step), self.qn, self.qp, self.g)

    def export(self, w: torch.Tensor) -> WeightExport:
        scale = fp16(self.step.abs().clamp(min=2.0**-14)).reshape(-1, 1)  # (out, 1)
        wg = grouped_view(w.detach().float(), "channel")
        codes = torch.clamp(torch.round(wg / scale.unsqueeze(-1)), self.qn, self.qp)
        codes = codes.reshape(w.shape).to(self.spec.qtype.storage_dtype)
        return WeightExport(codes, scale, torch.zeros_like(scale), self.spec)


class LSQAct(ObservingAct):
    """Per-tensor learned step on the activation entering a layer."""

    def __init__(self, bits: int) -> None:
        super().__init__(bits)
        self.step = nn.Parameter(torch.ones(()))

    def init_from_stats(self, stats: dict[str, float]) -> None:
        qp = self.grid[1]
        mean_abs = stats["abs_sum"] / stats["n"]
        # the paper's 2 mean|x| / sqrt(Qp), kept at least wide enough to reach 0.9 * max|x|
        reach = 0.9 * max(abs(stats["min"]), abs(stats["max"])) / qp
        init = max(2 * mean_abs / math.sqrt(qp), reach if self.bits >= 8 else 0.0, 1e-6)
        with torch.no_grad():
            self.step.fill_(init)

    def step_size(self) -> torch.Tensor:
        return self.step.detach().abs()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            return self.observe(x)
        qn, qp = self.grid
        g = lsq_grad_scale(x[0].numel() if x.dim() > 1 else x.numel(), qp)
        return lsq_quantize(x, stored_step(self.step), qn, qp, g)


@dataclass(frozen=True)
class LSQConfig(QATConfig):
    """LSQ for weights (per channel, signed) and activations (per tensor).

    Defaults (recipe ``w2a2-lsq``): 4 epochs, lr 1e-3, step lr 1e-3, distillation 0.5 at
    T=4 from the float model; first and last layers at 8 bits.
    """

    epochs: int = 4
    distill: float = 0.5

    def weight_quantizer(self, layer: nn.Module, spec: QuantSpec) -> nn.Module:
        return LSQWeight(layer.weight, spec.bits)


register("lsq", LSQConfig, "LSQ: learned step size QAT for weights and activations")(apply_qat)
