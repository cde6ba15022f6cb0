"""Cheap operations on codes as plan-runner calls (``deployment/runner.py``), on the compiled
extension's ``kernels/csrc/codes.cpp`` and ``head.cpp``: the quantization and dequantization
of a value (``quantize_codes``, ``dequantize_codes``), a max-pool of codes
(``maxpool_codes``), a global average pool with its quantization (``pool_quantize``) and the
gated quantization of a squeeze-excitation tail (``gate_quantize``). Each closure gives the
outputs of the modules it replaces, bit for bit, and falls back to them for other inputs.
The layers themselves (convolutions, linear layers) are in :mod:`compactnn.deployment.direct`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from compactnn.deployment.lowbit import QuantizeGrid
from compactnn.deployment.onednn import CL, Dequantize, MaxPoolU8
from compactnn.kernels import bitconv


def code_grid(m: nn.Module) -> tuple[float, int, int, int]:
    """``(scale, zero, lo, hi)`` of a ``Quantize`` / ``QuantizeGrid`` (codes 0..255 or its own)."""
    lo, hi = (m.lo, m.hi) if isinstance(m, QuantizeGrid) else (0, 255)
    return m.qp[0], int(m.qp[1]), lo, hi


def pool_quantize_call(pool: nn.Module, quant: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``quant(pool(x))`` for a global average pool: one pass of the extension's
    ``pool_quantize`` (the same float operations, equal codes) on float32 channels-last
    input, the two modules otherwise."""
    ext = bitconv.load_extension()
    scale, zero, lo, hi = code_grid(quant)

    def fused(x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and x.dtype == torch.float32 and x.is_contiguous(memory_format=CL):
            return ext.pool_quantize(x, scale, zero, lo, hi)
        return quant(pool(x))

    return fused


def quantize_call(m: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``Quantize`` / ``QuantizeGrid`` on the extension's ``quantize_codes`` for 4-D float32
    input (one pass, any layout in, channels-last codes out, equal codes) and for 2-D float32
    input (a classifier's hidden features, as (N, C, 1, 1): MobileNetV3's head quantization
    took 27 us through the six PyTorch ops, 2 us here); ``m`` otherwise."""
    ext = bitconv.load_extension()
    scale, zero, lo, hi = code_grid(m)

    def quantize(x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            if x.dim() == 4:
                return ext.quantize_codes(x, scale, zero, lo, hi)
            if x.dim() == 2:
                n, c = x.shape
                return ext.quantize_codes(x.reshape(n, c, 1, 1), scale, zero, lo, hi).view(n, c)
        return m(x)

    return quantize


def gate_quantize_call(
    quant: nn.Module, unfused: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The tail of a squeeze-excitation block, ``quant(Hardsigmoid(pre) * x)``, as one pass of
    the extension's ``gate_quantize`` (PyTorch's Hardsigmoid order, one float multiply, the
    quantizer's rounding: equal codes) for float32 ``x`` (N, C, H, W) and ``pre`` (N, C, 1, 1);
    ``unfused(pre, x)`` (the three calls) otherwise. MobileNetV3-Small has nine such tails,
    each a float map written by the multiply and read again by the quantization."""
    ext = bitconv.load_extension()
    scale, zero, lo, hi = code_grid(quant)

    def gated(pre: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if (
            x.dim() == 4
            and x.dtype == torch.float32
            and pre.dtype == torch.float32
            and pre.shape == (x.shape[0], x.shape[1], 1, 1)
        ):
            return ext.gate_quantize(x, pre, scale, zero, lo, hi)
        return unfused(pre, x)

    return gated


def dequantize_call(m: Dequantize) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``Dequantize`` on the extension's ``dequantize_codes`` for 4-D codes (one pass,
    channels-last float out, the same float operations); ``m`` otherwise."""
    ext = bitconv.load_extension()
    scale, zero = m.qp[0], int(m.qp[1])

    def dequantize(q: torch.Tensor) -> torch.Tensor:
        if q.dim() == 4 and q.dtype == torch.uint8:
            return ext.dequantize_codes(q, scale, zero)
        return m(q)

    return dequantize


def maxpool_call(m: MaxPoolU8) -> Callable[[torch.Tensor], torch.Tensor]:
    """``MaxPoolU8`` on the extension's ``maxpool_codes`` (channels-last codes; the same
    maxima), or ``m`` for ``ceil_mode`` and other layouts."""
    ext = bitconv.load_extension()
    kw = m.kwargs

    def pair(v: Any) -> tuple[int, int]:
        return (v, v) if isinstance(v, int) else (int(v[0]), int(v[-1]))

    k = pair(kw["kernel_size"])
    stride = kw.get("stride")
    s = k if stride is None or stride == [] or stride == () else pair(stride)
    p, d = pair(kw.get("padding", 0)), pair(kw.get("dilation", 1))
    if kw.get("ceil_mode", False) or 2 * p[0] > k[0] or 2 * p[1] > k[1]:
        return m

    def pool(q: torch.Tensor) -> torch.Tensor:
        if q.dim() == 4 and q.dtype == torch.uint8 and q.is_contiguous(memory_format=CL):
            return ext.maxpool_codes(q, *k, *s, *p, *d)
        return m(q)

    return pool
