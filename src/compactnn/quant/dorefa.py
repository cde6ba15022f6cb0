"""DoReFa-Net quantizers (Zhou et al., 2016).

Weights go through a tanh normalisation onto ``[0, 1]``, are rounded to ``2**k - 1`` steps
and mapped back to ``[-1, 1]``::

    t = tanh(w) / (2 max|tanh(w)|) + 1/2,    w_hat = s * (2 round(t n) / n - 1),  n = 2**k - 1

The paper uses ``s = 1`` because a batch norm follows each conv; compactnn folds batch norms
into the convs, so ``s`` is each output channel's ``max|w|`` (normalisation also per channel).
The ``2**k`` levels have no zero, so the frozen layer carries them as a codebook.
Activations are clipped to a fixed ``[0, a]`` (``a``: the calibrated maximum) and rounded to
``2**k - 1`` steps; signed inputs get ``[-a, a]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compactnn.core.spec import QuantSpec
from compactnn.engines.qat import QATConfig, QATMethod
from compactnn.engines.qat_quantizers import (
    ObservingAct,
    WeightExport,
    fp16,
    grid_fake_quant,
    round_ste,
)
from compactnn.registry import register


def dorefa_normalise(w: torch.Tensor) -> torch.Tensor:
    """``tanh(w) / (2 max|tanh(w)|) + 1/2`` per output channel, in ``[0, 1]``."""
    t = torch.tanh(w)
    dims = tuple(range(1, w.dim()))
    peak = t.abs().amax(dim=dims, keepdim=True).clamp(min=1e-12)
    return t / (2 * peak) + 0.5


def dorefa_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """DoReFa weight quantization with per-channel magnitude ``max|w|`` (gradient: STE)."""
    n = 2**bits - 1
    dims = tuple(range(1, w.dim()))
    s = w.detach().abs().amax(dim=dims, keepdim=True)
    return s * (2 * round_ste(dorefa_normalise(w) * n) / n - 1)


class DoReFaWeight(nn.Module):
    """DoReFa weights; exported as ``bits``-bit codes with a per-channel codebook."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.spec = QuantSpec(bits=bits, symmetric=False, granularity="channel")

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return dorefa_weight(w, self.bits)

    def export(self, w: torch.Tensor) -> WeightExport:
        n = 2**self.bits - 1
        w = w.detach().float()
        codes = torch.round(dorefa_normalise(w) * n).to(torch.uint8)
        s = w.abs().reshape(w.shape[0], -1).amax(dim=1)  # (out,)
        grid = 2 * torch.arange(n + 1, dtype=torch.float32) / n - 1  # (2**bits,)
        levels = fp16(s[:, None, None] * grid)  # (out, 1, 2**bits)
        ones = torch.ones(w.shape[0], 1)
        return WeightExport(codes, ones, torch.zeros_like(ones), self.spec, levels)


class DoReFaAct(ObservingAct):
    """Activations clipped to a fixed calibrated ``[0, a]`` (``[-a, a]`` if signed)."""

    def __init__(self, bits: int) -> None:
        super().__init__(bits)
        self.register_buffer("clip", torch.ones(()))

    def init_from_stats(self, stats: dict[str, float]) -> None:
        self.clip.fill_(max(abs(stats["min"]), abs(stats["max"]), 1e-6))

    def step_size(self) -> torch.Tensor:
        return self.clip / self.grid[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            return self.observe(x)
        qn, qp = self.grid
        return grid_fake_quant(x, self.step_size(), qn, qp)


@dataclass(frozen=True)
class DoReFaConfig(QATConfig):
    """DoReFa-Net weights and activations (``w4a4-dorefa``).

    Defaults: 4 epochs, lr 1e-3; first and last layers at 8 bits (LSQ).
    """

    epochs: int = 4


def dorefa_weight_quantizer(layer: nn.Module, spec: QuantSpec, config: DoReFaConfig) -> nn.Module:
    """Engine hook: DoReFa weights, frozen with a per-channel codebook."""
    return DoReFaWeight(spec.bits)


def dorefa_act_quantizer(layer: nn.Module, spec: QuantSpec, config: DoReFaConfig) -> nn.Module:
    """Engine hook: activations clipped to the calibrated range."""
    return DoReFaAct(spec.bits)


register("dorefa", DoReFaConfig, "DoReFa-Net: tanh-normalised weights, clipped activations")(
    QATMethod(dorefa_weight_quantizer, dorefa_act_quantizer)
)
