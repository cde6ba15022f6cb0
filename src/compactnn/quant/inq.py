"""INQ: incremental network quantization to powers of two (Zhou et al., 2017).

With ``b`` bits a layer's weights take values in ``{0} U {+-2**k : n2 <= k <= n1}``, where
``n1 = floor(log2(4 max|w| / 3))`` and ``n2 = n1 + 1 - 2**(b-1) / 2``; a weight goes to the
nearest level (midpoints between neighbours; ties upward, the paper's rule).

Training is incremental: at each stage the largest-magnitude weights (a growing portion,
0.5, 0.75, 0.875 by default) are quantized and frozen; the rest keep training to make up
for them. Freezing at the end quantizes what is left. Frozen weights live in a buffer, so
no optimizer state can move them. Frozen, the layer stores ``b``-bit codes with a per-layer
codebook of those powers of two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from compactnn.core.spec import QuantSpec
from compactnn.engines.qat import QATConfig, QATMethod
from compactnn.engines.qat_quantizers import WeightExport, apply_due_stages
from compactnn.errors import CompactnnError
from compactnn.registry import register


def pow2_exponents(max_abs: float, bits: int) -> tuple[int, int]:
    """``(n1, n2)``: the largest and smallest exponent of a layer with peak ``max_abs``."""
    n1 = math.floor(math.log2(4 * max(max_abs, 1e-30) / 3))
    return n1, n1 + 1 - 2 ** (bits - 1) // 2


def pow2_levels(n1: int, n2: int) -> torch.Tensor:
    """``[0, 2**n2, ..., 2**n1]`` (ascending magnitudes)."""
    return torch.cat([torch.zeros(1), 2.0 ** torch.arange(n2, n1 + 1, dtype=torch.float32)])


def pow2_quantize(w: torch.Tensor, n1: int, n2: int) -> torch.Tensor:
    """Each weight to the nearest of ``0, +-2**n2 .. +-2**n1`` (midpoints go up)."""
    levels = pow2_levels(n1, n2).to(w.device)
    mids = (levels[:-1] + levels[1:]) / 2
    idx = torch.bucketize(w.detach().abs(), mids, right=True)
    return levels[idx] * torch.sign(w.detach())


def pow2_codebook(n1: int, n2: int, bits: int) -> torch.Tensor:
    """Codebook ``[0, +2**n2 .. +2**n1, -2**n2 .. -2**n1, 0 ...]`` of ``2**bits`` entries."""
    mags = pow2_levels(n1, n2)[1:]
    book = torch.zeros(2**bits)
    book[1 : 1 + mags.numel()] = mags
    book[1 + mags.numel() : 1 + 2 * mags.numel()] = -mags
    return book


class INQWeight(nn.Module):
    """Incrementally frozen powers-of-two weights."""

    def __init__(self, weight: torch.Tensor, bits: int, portions: tuple[float, ...]) -> None:
        super().__init__()
        self.bits = bits
        self.portions = portions
        self.spec = QuantSpec(bits=bits, symmetric=False, granularity="tensor")
        self.n1, self.n2 = pow2_exponents(float(weight.detach().abs().max()), bits)
        self.register_buffer("frozen", torch.zeros(weight.shape, dtype=torch.bool))
        self.register_buffer("frozen_values", torch.zeros(weight.shape))
        self.register_buffer("stage", torch.zeros((), dtype=torch.long))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return torch.where(self.frozen, self.frozen_values, w)

    def freeze_portion(self, w: torch.Tensor, portion: float) -> None:
        """Freeze the largest-|w| free weights until ``portion`` of all weights are frozen."""
        n_target = round(portion * w.numel())
        n_new = n_target - int(self.frozen.sum())
        if n_new <= 0:
            return
        mags = w.detach().abs().masked_fill(self.frozen, -1.0).reshape(-1)
        idx = torch.topk(mags, n_new).indices
        new = torch.zeros(w.numel(), dtype=torch.bool)
        new[idx] = True
        new = new.reshape(w.shape)
        q = pow2_quantize(w, self.n1, self.n2)
        self.frozen_values.copy_(torch.where(new, q, self.frozen_values))
        self.frozen.logical_or_(new)

    def start_epoch(self, w: torch.Tensor, epoch: int, epochs: int) -> None:
        """Apply every stage due by ``epoch`` (stages spread evenly over the epochs)."""
        apply_due_stages(self, w, epoch, epochs)

    def values(self, w: torch.Tensor) -> torch.Tensor:
        """Every weight as a power of two or zero (frozen ones as frozen)."""
        return torch.where(self.frozen, self.frozen_values, pow2_quantize(w, self.n1, self.n2))

    def export(self, w: torch.Tensor) -> WeightExport:
        v = self.values(w)
        m = self.n1 - self.n2 + 1
        k = torch.log2(v.abs().clamp(min=2.0**self.n2)).round() - self.n2  # 0..m-1
        codes = torch.where(v > 0, 1 + k, torch.where(v < 0, 1 + m + k, torch.zeros_like(k)))
        levels = pow2_codebook(self.n1, self.n2, self.bits).reshape(1, 1, -1)
        one = torch.ones(1, 1)
        return WeightExport(codes.to(torch.uint8), one, torch.zeros(1, 1), self.spec, levels)


@dataclass(frozen=True)
class INQConfig(QATConfig):
    """INQ powers-of-two weights (recipe ``w5-inq``; weights only).

    Defaults: 4 epochs, lr 5e-4; portions 0.5, 0.75, 0.875 frozen at the starts of epochs
    0, 1 and 2, the rest quantized when freezing; every layer at ``b`` bits (no 8-bit
    exception).

    Args:
        portions: cumulative fractions of each layer frozen at the start of each stage.
    """

    epochs: int = 4
    lr: float = 5e-4
    first_last_bits: int | None = None
    portions: tuple[float, ...] = (0.5, 0.75, 0.875)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 3 <= self.weight.bits <= 8:
            raise CompactnnError(
                f"INQ needs 3..8 weight bits (1 for zero and sign, the rest for exponents), "
                f"got {self.weight.bits}."
            )
        p = list(self.portions)
        if not p or p != sorted(p) or not all(0.0 < x < 1.0 for x in p):
            raise CompactnnError(f"portions={self.portions} must increase within (0, 1).")


def inq_weight_quantizer(layer: nn.Module, spec: QuantSpec, config: INQConfig) -> nn.Module:
    """Engine hook: incrementally frozen powers of two (stages on ``start_epoch``)."""
    return INQWeight(layer.weight, spec.bits, config.portions)


register("inq", INQConfig, "INQ: incremental quantization to powers of two")(
    QATMethod(inq_weight_quantizer)
)
