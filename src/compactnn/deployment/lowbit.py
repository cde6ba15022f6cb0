"""Low-bit and codebook layers on the int8 kernels of :mod:`compactnn.deployment.onednn`.

Activations of fewer than 8 bits are uint8 codes on a narrower grid ``lo..hi`` (the
quantizer's ``[qmin, qmax]``, shifted by 128 when signed; see
:func:`compactnn.lowering.graph.act_form`). Three things keep them exact:

* float -> codes clamps to ``lo..hi`` (:class:`QuantizeGrid`), as the simulation does;
* a kernel that writes codes for a narrower grid clamps with a ``hardtanh`` post-op whose
  bounds are the grid's float ends ``(lo - zero) * scale`` and ``(hi - zero) * scale``
  (:func:`clamped_unary`): ``round(bound / scale) + zero`` is exactly ``lo`` or ``hi``;
  where that post-op is not available (after a residual sum) a uint8 clamp follows
  (:class:`ClampU8`), exact because ``lo..hi`` lies inside the kernel's 0..255 saturation;
* the kernels read the codes with the layer's ``(scale, zero)`` as any uint8 input.

Weights whose codebook needs two int8 terms (:func:`compactnn.lowering.graph.weight_terms`)
run as two int8 kernels on the same input codes, the second adding its output onto the
first's (:class:`SplitConv2d`, :class:`SplitLinear`): exact up to float rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from compactnn.core.spec import QuantSpec
from compactnn.deployment.onednn import Int8Conv2d, Int8Linear, Quantize
from compactnn.lowering.graph import QParams, WeightTerm, code_range

Unary = tuple[str, list[float]] | None


class QuantizeGrid(nn.Module):
    """Float -> uint8 codes of one grid, clamped to its codes ``lo..hi``."""

    def __init__(self, form: QParams) -> None:
        super().__init__()
        self.qp = form
        self.lo, self.hi = code_range(form)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        # the simulation's formula and op order (division, round-half-even, then clamp)
        q = (x.float() / self.qp[0]).round_().add_(self.qp[1])
        return q.clamp_(self.lo, self.hi).to(torch.uint8)

    def extra_repr(self) -> str:
        return f"scale={self.qp[0]:.4g}, zero={self.qp[1]}, codes={self.lo}..{self.hi}"


def quantize_to(form: QParams) -> nn.Module:
    """The module that quantizes float values to ``form`` (0..255 or a narrower grid)."""
    return Quantize(form) if len(form) == 2 else QuantizeGrid(form)


class ClampU8(nn.Module):
    """Clamp uint8 codes to ``lo..hi``: the codes of a narrower grid, exactly."""

    def __init__(self, lo: int, hi: int) -> None:
        super().__init__()
        self.lo, self.hi = lo, hi

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return q.clamp_(self.lo, self.hi)

    def extra_repr(self) -> str:
        return f"codes={self.lo}..{self.hi}"


def clamped_unary(unary: Unary, form: QParams | None) -> tuple[Unary, bool]:
    """The kernel post-op that also clamps to a narrow output grid, and whether a
    :class:`ClampU8` must still follow (when no single hardtanh does both)."""
    if form is None or len(form) != 4:
        return unary, False
    lo, hi = code_range(form)
    lo_f, hi_f = (lo - form[1]) * form[0], (hi - form[1]) * form[0]
    name, scalars = unary if unary is not None else ("none", [])
    if name == "none":
        return ("hardtanh", [lo_f, hi_f]), False
    if name == "relu":
        return ("hardtanh", [max(0.0, lo_f), hi_f]), False
    if name == "hardtanh":
        a, b = max(scalars[0], lo_f), min(scalars[1], hi_f)
        if a <= b:
            return ("hardtanh", [a, b]), False
    return unary, True


class TermView:
    """A layer-like view of one int8 term of a layer's weight, for the kernel modules.

    It has what :class:`~compactnn.deployment.onednn.Int8Conv2d` / ``Int8Linear`` read from
    a quantized layer: the input quantizer, int8 codes with zero point 0 and per-channel
    scales, the bias (first term only) and the convolution geometry.
    """

    def __init__(self, layer: nn.Module, term: WeightTerm, with_bias: bool) -> None:
        codes, scale = term
        self.weight_spec = QuantSpec(bits=8, symmetric=True, granularity="channel")
        self.input_quantizer = layer.input_quantizer
        self.weight_codes = codes
        self.weight = codes  # shape only
        self.weight_scale = scale.reshape(-1, 1).float()
        self.weight_zero = torch.zeros_like(self.weight_scale)
        self.bias = layer.bias if with_bias else None
        for attr in ("stride", "padding", "dilation", "groups", "padding_mode", "in_channels",
                     "out_channels", "kernel_size", "in_features", "out_features"):  # fmt: skip
            if hasattr(layer, attr):
                setattr(self, attr, getattr(layer, attr))


def _post(y: torch.Tensor, unary: Unary, out: QParams | None, quant: nn.Module | None):
    """Apply a ReLU-like op to a float output, then quantize it when ``out`` is a grid."""
    if unary is not None and unary[0] == "relu":
        y = y.relu_()
    elif unary is not None and unary[0] == "hardtanh":
        y = y.clamp_(unary[1][0], unary[1][1])
    return y if quant is None else quant(y)


class SplitConv2d(nn.Module):
    """A convolution whose weight is the sum of two int8 terms: two int8 kernels on the same
    uint8 input, the second summing onto the first's float32 output (oneDNN sum post-op)."""

    def __init__(self, layer, terms: list[WeightTerm], out: QParams | None, unary: Unary):
        super().__init__()
        self.first = Int8Conv2d(TermView(layer, terms[0], True), None, None)
        self.second = Int8Conv2d(TermView(layer, terms[1], False), None, None, accum="float")
        self.unary, self.out = unary, out
        self.quant = None if out is None else quantize_to(out)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return _post(self.second(q, self.first(q)), self.unary, self.out, self.quant)


class SplitLinear(nn.Module):
    """A linear layer whose weight is the sum of two int8 terms (two int8 kernels)."""

    def __init__(self, layer, terms: list[WeightTerm], out: QParams | None, unary: Unary):
        super().__init__()
        self.first = Int8Linear(TermView(layer, terms[0], True), None, None)
        self.second = Int8Linear(TermView(layer, terms[1], False), None, None)
        self.unary, self.out = unary, out
        self.quant = None if out is None else quantize_to(out)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return _post(self.first(q).add_(self.second(q)), self.unary, self.out, self.quant)


__all__ = [
    "ClampU8",
    "QuantizeGrid",
    "SplitConv2d",
    "SplitLinear",
    "TermView",
    "clamped_unary",
    "quantize_to",
]
