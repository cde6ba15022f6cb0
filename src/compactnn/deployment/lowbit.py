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
run as ONE int8 kernel whose output channels are the two terms stacked (each channel with its
own scale), followed by one combine that adds the halves and quantizes
(:class:`SplitConv2d`, :class:`SplitLinear`): exact up to float rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from compactnn.core.spec import QuantSpec
from compactnn.deployment.onednn import Int8Conv2d, Int8Linear, Quantize
from compactnn.kernels import bitconv
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
    """A layer-like view of int8 weights for the kernel modules.

    It has what :class:`~compactnn.deployment.onednn.Int8Conv2d` / ``Int8Linear`` read from
    a quantized layer: the input quantizer, int8 codes with zero point 0 and per-channel
    scales, the bias and the convolution geometry. Given several terms, it stacks them along
    the output channels (``(T * out, ...)`` codes and scales; the bias on the first term's
    channels, zeros on the others): one kernel then computes every term.
    """

    def __init__(self, layer: nn.Module, term: WeightTerm | list[WeightTerm], with_bias: bool):
        terms = [term] if isinstance(term, tuple) else list(term)
        order = _stack_order(terms[0][0].shape[0], len(terms), getattr(layer, "groups", 1))
        codes = torch.cat([c for c, _ in terms])[order]
        scale = torch.cat([s.reshape(-1).float() for _, s in terms])[order]
        self.weight_spec = QuantSpec(bits=8, symmetric=True, granularity="channel")
        self.input_quantizer = layer.input_quantizer
        self.weight_codes = codes
        self.weight = codes  # shape only
        self.weight_scale = scale.reshape(-1, 1)
        self.weight_zero = torch.zeros_like(self.weight_scale)
        self.bias = None
        if with_bias and layer.bias is not None:
            rest = torch.zeros(codes.shape[0] - terms[0][0].shape[0])
            self.bias = torch.cat([layer.bias.detach().float(), rest])[order]
        for attr in ("stride", "padding", "dilation", "groups", "padding_mode", "in_channels",
                     "kernel_size", "in_features"):  # fmt: skip
            if hasattr(layer, attr):
                setattr(self, attr, getattr(layer, attr))
        self.out_channels = self.out_features = codes.shape[0]


def _stack_order(out: int, n_terms: int, groups: int) -> torch.Tensor:
    """Order of the concatenated terms' ``n_terms * out`` channels in the stacked kernel.

    A grouped convolution computes output channel block ``g`` from input group ``g``, so each
    group's block holds that group's channels of every term: ``(groups, n_terms, out /
    groups)``. With one group this is the plain concatenation.
    """
    idx = torch.arange(n_terms * out).reshape(n_terms, groups, out // groups)
    return idx.transpose(0, 1).reshape(-1)


def code_bounds(unary: Unary, form: QParams) -> tuple[int, int]:
    """Code bounds that apply ``unary`` (ReLU / Hardtanh) and the grid's clamp at once.

    ``round(y / scale)`` is monotone in ``y``, so ``q(clamp(y, a, b)) = clamp(q(y), q(a),
    q(b))``: clamping the codes gives the codes of the clamped value exactly. (An empty
    range clamps everything to its upper end, as ``torch.clamp`` does.)
    """
    lo, hi = grid = code_range(form)
    scale, zero = form[0], form[1]
    if unary is not None and unary[0] in ("relu", "hardtanh"):
        a, b = (0.0, float("inf")) if unary[0] == "relu" else unary[1]
        ends = torch.tensor([a, b], dtype=torch.float32).div_(scale).round_().add_(zero)
        lo = max(lo, int(ends[0].clamp(-1, 256)))
        hi = max(grid[0], min(hi, int(ends[1].clamp(-1, 256))))
    return min(lo, hi), hi


class _Stacked(nn.Module):
    """Shared combine of the stacked two-term layers: ``y = y[..., :out] + y[..., out:]``,
    then the ReLU-like op and the output grid's quantization in one clamp of the codes."""

    def _setup(self, out: QParams | None, unary: Unary, channels: int, groups: int = 1) -> None:
        self.channels, self.groups, self.unary, self.out = channels, groups, unary, out
        self.quant = None if out is None else quantize_to(out)  # kept for inspection
        self.bounds = None if out is None else code_bounds(unary, out)
        bitconv.available()  # compile or find the fused combine now (None: PyTorch ops)

    def combine(self, y: torch.Tensor, dim: int) -> torch.Tensor:
        o, g = self.channels, self.groups
        ext = bitconv.loaded()
        if self.out is not None and ext is not None and y.dtype == torch.float32:
            rows = y.movedim(dim, -1)  # (..., 2 * out): channels-last / linear rows
            if rows.is_contiguous():
                scale, zero = self.out[0], self.out[1]
                q = ext.stacked_quantize(rows.reshape(-1, 2 * o), g, scale, zero, *self.bounds)
                return q.reshape(*rows.shape[:-1], o).movedim(-1, dim)
        if g == 1:
            y = torch.add(y.narrow(dim, 0, o), y.narrow(dim, o, o))  # the two terms' sum
        else:  # channels (groups, 2, out / groups): see _stack_order
            y = y.unflatten(dim, (g, 2, o // g))
            y = torch.add(y.select(dim + 1, 0), y.select(dim + 1, 1)).flatten(dim, dim + 1)
        if self.out is None:
            return _post(y, self.unary, None, None)
        # the simulation's quantization of the (ReLU'd) sum: division, round-half-even, zero
        # point, clamp; the ReLU / Hardtanh and the grid's ends are one clamp of the codes
        q = y.div_(self.out[0]).round_()
        if self.out[1]:
            q = q.add_(self.out[1])
        return q.clamp_(*self.bounds).to(torch.uint8)


def _post(y: torch.Tensor, unary: Unary, out: QParams | None, quant: nn.Module | None):
    """Apply a ReLU-like op to a float output, then quantize it when ``out`` is a grid."""
    if unary is not None and unary[0] == "relu":
        y = y.relu_()
    elif unary is not None and unary[0] == "hardtanh":
        y = y.clamp_(unary[1][0], unary[1][1])
    return y if quant is None else quant(y)


class SplitConv2d(_Stacked):
    """A convolution whose weight is the sum of two int8 terms, as ONE int8 kernel call.

    The terms are stacked as ``2 * out`` output channels, each with its own per-channel scale
    (the first ``out`` carry the bias); the kernel writes float32 ``(N, 2 * out, H, W)`` and
    :meth:`combine` adds the halves, applies the ReLU-like op and quantizes to the output
    grid. Each half is an exact int32 dot product times its scale, so the sum equals the
    simulation's convolution up to float rounding, as two separate kernels would.
    """

    def __init__(self, layer, terms: list[WeightTerm], out: QParams | None, unary: Unary):
        super().__init__()
        self.kernel = Int8Conv2d(TermView(layer, terms, True), None, None)
        self._setup(out, unary, terms[0][0].shape[0], layer.groups)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return self.combine(self.kernel(q), 1)


class SplitLinear(_Stacked):
    """A linear layer whose weight is the sum of two int8 terms, as one stacked int8 kernel
    (see :class:`SplitConv2d`)."""

    def __init__(self, layer, terms: list[WeightTerm], out: QParams | None, unary: Unary):
        super().__init__()
        self.kernel = Int8Linear(TermView(layer, terms, True), None, None)
        self._setup(out, unary, terms[0][0].shape[0])

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return self.combine(self.kernel(q), -1)


__all__ = [
    "ClampU8",
    "QuantizeGrid",
    "SplitConv2d",
    "SplitLinear",
    "TermView",
    "clamped_unary",
    "code_bounds",
    "quantize_to",
]
