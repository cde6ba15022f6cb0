"""What every training-aware quantizer shares: its config base and the quantizer interfaces.

A QAT method supplies two kinds of modules that sit inside a wrapped layer during training:

* a **weight quantizer** ``forward(w) -> w_hat`` (differentiable, the method's gradient) and
  ``export(w) -> WeightExport``: the integer codes and grid that reproduce ``w_hat`` in a
  standard quantized layer (``QuantLinear``/``QuantConv2d``), so ``compactnn.save`` packs it;
* an **activation quantizer** on a ``scale * [qmin, qmax]`` grid with zero point 0, which
  freezes into the layer's ``ActQuantizer`` (binary activations are blocks instead, see
  :mod:`compactnn.quant.binary`).

Through :func:`compactnn.compress` (no labels, no training) a QAT method runs its
post-training variant: quantizers initialised from the calibration data, then frozen.
:func:`compactnn.train` trains with them first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from compactnn.core.context import CompressContext
from compactnn.core.spec import QuantSpec
from compactnn.errors import CompactnnError
from compactnn.quant.base import QuantConfig


@dataclass(frozen=True)
class QATConfig(QuantConfig):
    """Settings shared by training-aware methods (defaults are each recipe's, see
    ``docs/training.md``).

    Args:
        epochs: training epochs of :func:`compactnn.train` unless it is given ``epochs=``.
        lr: Adam learning rate of weights and biases (cosine-decayed to 0).
        lr_quant: learning rate of quantizer parameters (step sizes, clips, scales, shifts).
        batch_size: training batch size.
        distill: weight of the distillation term (0: labels only; 1: teacher only).
        temperature: distillation temperature ``T`` (the KD term is scaled by ``T**2``).
    """

    epochs: int = 3
    lr: float = 1e-3
    lr_quant: float = 1e-3
    batch_size: int = 64
    distill: float = 0.0
    temperature: float = 4.0

    # 1-bit activations need a binary block (xnor, bireal, reactnet); uniform methods refuse.
    binary_block: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise CompactnnError(f"epochs={self.epochs!r} must be a non-negative integer.")
        if not (self.lr > 0 and self.lr_quant >= 0 and self.batch_size >= 1):
            raise CompactnnError("lr must be > 0, lr_quant >= 0 and batch_size >= 1.")
        if not 0.0 <= self.distill <= 1.0 or self.temperature <= 0:
            raise CompactnnError("distill must lie in [0, 1] and temperature be > 0.")

    def weight_quantizer(self, layer: nn.Module, spec: QuantSpec) -> nn.Module:
        """The method's weight quantizer for ``layer`` (``spec.bits`` already decided)."""
        raise NotImplementedError

    def act_quantizer(self, spec: QuantSpec) -> nn.Module:
        """The method's activation quantizer (default: LSQ, learned step size)."""
        from compactnn.quant.lsq import LSQAct

        return LSQAct(spec.bits)


@dataclass
class WeightExport:
    """Integer form of a trained weight: ``codes`` (weight's shape), ``scale``/``zero``
    ``(rows, ngroups)``, the ``spec`` of the grid, and an optional codebook
    ``levels`` ``(rows, ngroups, 2**bits)`` for non-uniform grids."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    spec: QuantSpec
    levels: torch.Tensor | None = None


def fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to float16-representable float32 (artifacts store scales and levels as fp16)."""
    return x.detach().to(torch.float16).to(torch.float32)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity gradient (the straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def clipped_ste_quant(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | float, qmin: int, qmax: int
) -> torch.Tensor:
    """``(clamp(round(x / scale) + zero, qmin, qmax) - zero) * scale`` with a clipped
    straight-through gradient to ``x``: 1 where the rounded code lies on the grid (its
    bounds included), 0 where it was clipped."""
    code = torch.round(x.detach() / scale) + zero
    inside = ((code >= qmin) & (code <= qmax)).to(x.dtype)
    value = (torch.clamp(code, qmin, qmax) - zero) * scale
    return x * inside + (value - x * inside).detach()


def grid_fake_quant(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """``clamp(round(x / scale), qmin, qmax) * scale`` with a clipped straight-through
    gradient to ``x``: what ``ActQuantizer`` computes with zero point 0, so a frozen model
    reproduces training's forward."""
    return clipped_ste_quant(x, scale, 0.0, qmin, qmax)


def act_grid(bits: int, signed: bool) -> tuple[int, int]:
    """``(qmin, qmax)`` of a ``bits``-wide activation grid."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def check_act_bits(bits: int, who: str) -> None:
    """Refuse 1-bit activations on a uniform grid: they need a binary block."""
    if bits < 2:
        raise CompactnnError(
            f"{who} cannot quantize activations to {bits} bit: 1-bit activations need a "
            "binary method (w1a1-xnor, w1a1-bireal, w1a1-reactnet)."
        )


class ObservingAct(nn.Module):
    """Base of activation quantizers on a ``scale * [qmin, qmax]`` grid, zero point 0.

    Before training, ``observe`` mode collects min, max and mean |x| over calibration
    batches; ``finish_observing`` initialises the method's parameters from them. Inputs with
    negative values get a signed grid, non-negative ones (after ReLU) an unsigned grid.
    """

    def __init__(self, bits: int) -> None:
        super().__init__()
        check_act_bits(bits, type(self).__name__)
        self.bits = bits
        self.signed = False
        self.observing = False
        self.stats: dict[str, float] = {}

    @property
    def grid(self) -> tuple[int, int]:
        return act_grid(self.bits, self.signed)

    def start_observing(self) -> None:
        self.observing = True
        self.stats = {"min": float("inf"), "max": float("-inf"), "abs_sum": 0.0, "n": 0}

    def observe(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        s = self.stats
        s["min"] = min(s["min"], float(x.min()))
        s["max"] = max(s["max"], float(x.max()))
        s["abs_sum"] += float(x.abs().sum())
        s["n"] += x.numel()
        return x

    def finish_observing(self) -> None:
        if not self.stats or not self.stats["n"]:
            raise CompactnnError("no calibration data reached an activation quantizer.")
        self.observing = False
        self.signed = self.stats["min"] < 0
        self.init_from_stats(self.stats)

    def init_from_stats(self, stats: dict[str, float]) -> None:
        raise NotImplementedError

    def step_size(self) -> torch.Tensor:
        """The grid's scale (a 0-dim tensor)."""
        raise NotImplementedError

    def export(self) -> tuple[QuantSpec, torch.Tensor, torch.Tensor]:
        """``(spec, scale, zero)`` for the frozen layer's ``ActQuantizer``."""
        spec = QuantSpec(bits=self.bits, symmetric=False, granularity="tensor", signed=self.signed)
        scale = fp16(self.step_size().reshape(()).clamp(min=2.0**-14))
        return spec, scale, torch.zeros(())

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}"


def apply_qat(
    model: nn.Module, targets: dict[str, nn.Module], config: QATConfig, ctx: CompressContext
) -> nn.Module:
    """Post-training variant of a QAT method (what ``compress`` runs): wrap, initialise the
    quantizers from the calibration data, freeze. ``compactnn.train`` trains in between."""
    from compactnn.train.wrap import freeze_layers, init_quantizers, wrap_layers

    wrap_layers(model, targets, config, ctx)
    init_quantizers(model, ctx)
    freeze_layers(model, ctx)
    return model
