"""Low-precision CPU linear layers built from a ``QuantLinear``'s integer codes.

* :class:`Int8WeightLinear`: int8 weights, float activations (``torch._weight_int8pack_mm``).
* :class:`Int4WeightLinear`: 2-, 3- or 4-bit group-wise weights on the int4 packed kernel
  (``aten._convert_weight_to_int4pack_for_cpu`` + ``torch._weight_int4pack_mm_for_cpu``);
  codes below 4 bits are valid int4 codes, so W3/W2 run on the same kernel.
* :class:`W8A8Linear`: per-token dynamic uint8 activations times int8 weights with int32
  accumulation (``torch._int_mm``), the grid of
  :class:`compactnn.quant.smoothquant.DynamicActQuantizer`.

Each layer keeps exactly the codes, scales and zero points of the simulated layer, so its
output matches the simulated (dequantized) layer up to float summation order.
"""

from __future__ import annotations

import torch
from torch import nn

from compactnn.core.qlayers import QuantLinear

INT4_GROUPS = (32, 64, 128, 256)


def _signed_codes(layer: QuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes as int8 and zero points ``(out, ngroups)`` in the same signed frame."""
    qt = layer.weight_spec.qtype
    shift = 0 if qt.signed else 128 if qt.bits == 8 else 0
    codes = (layer.weight_codes.to(torch.int16) - shift).to(torch.int8)
    return codes, layer.weight_zero - shift


class Int8WeightLinear(nn.Module):
    """``y = x @ ((q - z) * s)^T + b`` with int8 ``q`` and per-output-channel ``s``, ``z``."""

    def __init__(self, layer: QuantLinear) -> None:
        super().__init__()
        if layer.weight_spec.bits != 8 or layer.weight_scale.shape[1] != 1:
            raise ValueError("Int8WeightLinear needs 8-bit per-channel weights")
        codes, zero = _signed_codes(layer)
        self.register_buffer("codes", codes.contiguous())  # (out, in) int8
        self.register_buffer("scale", layer.weight_scale[:, 0].float().contiguous())  # (out,)
        zs = (zero[:, 0] * layer.weight_scale[:, 0]).float()
        self.register_buffer("zero_scale", zs if bool(zs.any()) else None)  # (out,) or None
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        self.in_features, self.out_features = layer.in_features, layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        y = torch._weight_int8pack_mm(x2, self.codes, self.scale.to(x.dtype))
        if self.zero_scale is not None:
            y = y - x2.sum(-1, keepdim=True) * self.zero_scale.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


class Int4WeightLinear(nn.Module):
    """Group-wise ``(q - z) * s`` weights (``q`` in 0..15) on the packed int4 CPU kernel."""

    def __init__(self, layer: QuantLinear) -> None:
        super().__init__()
        spec = layer.weight_spec
        k = layer.in_features
        group = spec.group_size if spec.granularity == "group" else k
        if spec.bits > 4 or group not in INT4_GROUPS:
            raise ValueError(f"Int4WeightLinear needs <= 4 bits and a group in {INT4_GROUPS}")
        codes = layer.weight_codes.to(torch.int32)
        zero = layer.weight_zero.float()
        if spec.qtype.signed:  # signed grid: shift into 0..15
            codes, zero = codes + 8, zero + 8
        scale = layer.weight_scale.float()  # (out, ngroups)
        self.register_buffer(
            "packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
        )
        # the kernel computes (q - 8) * scale + offset per group: offset = (8 - z) * scale
        sz = torch.stack([scale.T, ((8 - zero) * scale).T], dim=-1)  # (ngroups, out, 2)
        self.register_buffer("scales_zeros", sz.contiguous())
        self.group = group
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        self.in_features, self.out_features = k, layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).contiguous()
        sz = self.scales_zeros.to(x.dtype)
        y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group, sz)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)


class W8A8Linear(nn.Module):
    """Per-token dynamic uint8 activations x int8 per-channel weights, int32 accumulation.

    With ``x = s_x (q_x - z_x)`` and ``w = s_w q_w``: ``y = s_x s_w (q_x' q_w^T + (128 - z_x)
    colsum(q_w))`` where ``q_x' = q_x - 128`` is int8.
    """

    def __init__(self, layer: QuantLinear) -> None:
        super().__init__()
        if layer.weight_spec.bits != 8 or not layer.weight_spec.symmetric:
            raise ValueError("W8A8Linear needs symmetric 8-bit weights")
        if layer.weight_scale.shape[1] != 1:
            raise ValueError("W8A8Linear needs per-channel weights")
        qt = layer.input_quantizer.qtype
        if qt.signed or qt.bits != 8:
            raise ValueError("W8A8Linear needs uint8 activations")
        wq = layer.weight_codes.to(torch.int8)
        self.register_buffer("codes_t", wq.T.contiguous())  # (in, out) int8
        self.register_buffer("colsum", wq.to(torch.int32).sum(1).float())  # (out,)
        self.register_buffer("scale", layer.weight_scale[:, 0].float().contiguous())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        self.in_features, self.out_features = layer.in_features, layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()  # (M, K)
        lo = x2.amin(-1, keepdim=True).clamp(max=0)
        hi = x2.amax(-1, keepdim=True).clamp(min=0)
        sx = ((hi - lo) / 255.0).clamp(min=1e-8)  # (M, 1), as DynamicActQuantizer
        zx = torch.round(-lo / sx)
        q = torch.clamp(torch.round(x2 / sx) + zx, 0, 255)
        acc = torch._int_mm((q - 128).to(torch.int8), self.codes_t)  # (M, N) int32
        y = (acc.float() + (128 - zx) * self.colsum) * (sx * self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def kernel_layer(layer: QuantLinear) -> nn.Module | None:
    """The fastest kernel layer for ``layer``, or None when no kernel takes its format."""
    from compactnn.quant.smoothquant import DynamicActQuantizer

    spec = layer.weight_spec
    aq = layer.input_quantizer
    try:
        if isinstance(aq, DynamicActQuantizer):
            return W8A8Linear(layer)
        if aq is not None:
            return None  # static activation grids: no kernel here
        if spec.bits == 8:
            return Int8WeightLinear(layer)
        return Int4WeightLinear(layer)
    except ValueError:
        return None
