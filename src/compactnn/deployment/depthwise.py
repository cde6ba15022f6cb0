"""Depthwise convolutions on the compiled extension's direct kernel, alone (``DwConvPlan``)
and as a whole inverted-residual block with the 1x1 convolutions around them
(``DwBlockPlan``, ``kernels/csrc/dwblock.cpp``), as plan-runner calls.

Split from :mod:`compactnn.deployment.direct` (whose 1x1 tiles and output arguments it
uses); the same contract: ``*_fits`` say whether a module runs here, ``*_call`` return a
closure with every constant bound that gives the replaced modules' outputs bit for bit
(``tests/deployment/test_depthwise.py``, ``tests/kernels/test_dwblock.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from compactnn.deployment.direct import (
    hardswish_out,
    out_args,
    plain_conv_fits,
    pointwise,
    term_conv_plan,
)
from compactnn.deployment.onednn import Int8Conv2d
from compactnn.kernels import bitconv


def depthwise_fits(m: nn.Module) -> bool:
    """Whether Int8Conv2d ``m`` is a depthwise convolution the direct ``dw_conv`` kernel runs:
    one channel per group in and out, at most 49 taps, no residual sum, a ReLU / Hardtanh or
    no post-op, symmetric weights."""
    if not isinstance(m, Int8Conv2d) or m.accum is not None:
        return False
    o, c, kh, kw = m.w_int8.shape
    if c != 1 or m.groups != o or kh * kw > 49 or m.unary not in ("none", "relu", "hardtanh"):
        return False
    return not bool(m.w_zero.any()) and bitconv.available()


# Per-call size (input + output values) up to which a depthwise convolution runs on the direct
# kernel's float form (width dilation, or a build without VNNI and VBMI). Measured per layer on
# MobileNetV2's and MobileNetV3-Small's depthwise layers, 2 threads, AMD Zen 4 (equal outputs;
# session 15's row-ring kernel): at batch 1, 38-300 K values 1.7-3.0x oneDNN's 46-71 us a
# call, 560-800 K values 1.2-1.4x, 0.9-1.5 M values 0.85-0.98x; at batch 8 oneDNN wins from
# ~0.3 M values (0.61-1.00x up to 12 M). The integer form (``dw_integer_form``: VNNI dots of 4
# adjacent taps, each input row read once for all channels) runs every call: session 16, same
# layers, batch 8 1.2-1.8x oneDNN (MobileNetV2's 17 layers 4.1 -> 3.2 ms, MobileNetV3-Small's
# 11 1.5 -> 1.0 ms), batch 1 2.2x and 3.5x in all.
DEPTHWISE_VALUES = 320_000
DEPTHWISE_VALUES_ONE_IMAGE = 850_000  # the float form's limit for a batch of one image


def depthwise_plan(m: Int8Conv2d, hardswish: tuple | None = None) -> Any:
    """The extension's ``DwConvPlan`` of depthwise convolution ``m`` (see
    :func:`depthwise_fits`): weights padded to 16 channels and packed, grids and geometry bound
    once. ``hardswish``: see ``hardswish.hardswish_call``."""
    o, _, kh, kw = m.w_int8.shape
    cp = -(-o // 16) * 16  # channels padded to a vector of 16, zeros after o
    w, ws, bias = torch.zeros(kh * kw, cp), torch.zeros(cp), torch.zeros(cp)
    w[:, :o] = m.w_int8.float().reshape(o, kh * kw).t()
    ws[:o] = m.w_scale_t.float().reshape(-1)
    if m.bias is not None:
        bias[:o] = m.bias.float().reshape(-1)
    sx, zx = m.x_qp
    unary = None if m.unary == "none" else (m.unary, list(m.scalars))
    return bitconv.load_extension().DwConvPlan(
        float(sx), int(zx), w, ws, bias, kh, kw, list(m.stride), list(m.padding),
        list(m.dilation), *(out_args(m.out, unary) if hardswish is None else
                            hardswish_out(hardswish)), hardswish is not None,
    )  # fmt: skip


def depthwise_call(
    m: Int8Conv2d, onednn: Callable[[torch.Tensor], torch.Tensor], hardswish: tuple | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``m.forward`` on the direct kernel: always where its integer form applies
    (``dw_integer_form``), else for calls of at most :data:`DEPTHWISE_VALUES` (one image:
    :data:`DEPTHWISE_VALUES_ONE_IMAGE`) and on ``onednn`` (the layer's oneDNN closure) above;
    the same codes or floats either way (oneDNN's float order on exact integer sums):
    (N, C, H, W) uint8 codes -> channels-last output.
    ``hardswish``: see ``hardswish.hardswish_call``."""
    ext = bitconv.load_extension()
    plan = depthwise_plan(m, hardswish)
    _, _, kh, kw = m.w_int8.shape
    (sh, sw), (ph, pw), (dh, dw) = m.stride, m.padding, m.dilation
    if ext.dw_integer_form(kh, kw, dw):
        return plan  # faster than oneDNN at every measured size
    direct: dict[tuple[int, ...], bool] = {}  # input shape -> whether it runs here

    def small(shape: torch.Size) -> bool:
        use = direct.get(shape)
        if use is None:
            n, c, h, w = shape
            oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
            ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
            values = n * c * (h * w + oh * ow)
            use = values <= (DEPTHWISE_VALUES_ONE_IMAGE if n == 1 else DEPTHWISE_VALUES)
            if len(direct) >= 8:
                direct.clear()
            direct[shape] = use  # (a local result: another thread may clear the cache)
        return use

    def conv(q: torch.Tensor) -> torch.Tensor:
        return plan(q) if small(q.shape) else onednn(q)

    return conv


def _one_by_one(m: nn.Module) -> bool:
    """Whether ``m`` is an int8 convolution on the 1x1 tiles (``direct.pointwise``)."""
    return isinstance(m, Int8Conv2d) and pointwise(m) and plain_conv_fits(m)


def dw_block_fits(expand: nn.Module | None, dw: nn.Module, project: nn.Module | None) -> bool:
    """Whether ``project(dw(expand(x)))`` (either 1x1 layer may be None, not both) runs as one
    ``DwBlockPlan`` (``kernels/csrc/dwblock.cpp``): ``dw`` on the depthwise kernel's integer
    form, ``expand`` (no residual) and ``project`` (a uint8 residual or none) on the 1x1 tiles
    (``direct.pointwise``), codes between them on one grid."""
    if (expand is None and project is None) or not depthwise_fits(dw):
        return False
    _, _, kh, kw = dw.w_int8.shape
    if not bitconv.load_extension().dw_integer_form(kh, kw, dw.dilation[1]):
        return False
    if expand is not None:
        if not _one_by_one(expand) or expand.accum is not None:
            return False
        if int(expand.out[1]) != int(dw.x_qp[1]):
            return False
    if project is not None:
        if not _one_by_one(project) or dw.out is None:
            return False
        if int(dw.out[1]) != int(project.x_qp[1]):
            return False
    return True


def dw_block_call(
    expand: Int8Conv2d | None, dw: Int8Conv2d, project: Int8Conv2d | None
) -> Callable[..., torch.Tensor]:
    """``project(dw(expand(x)))`` as one pass (see :func:`dw_block_fits`; with a residual,
    ``(x, acc)`` as ``project``'s sum takes it): the expansion's 1x1 tiles write each row of
    its codes straight into the depthwise kernel's ring of input rows, and each depthwise
    output row goes straight to the projection's tiles, so neither map is stored; the same
    tiles and dots as the separate calls, so equal codes."""
    plan = bitconv.load_extension().DwBlockPlan(
        None if expand is None else term_conv_plan(expand),
        depthwise_plan(dw),
        None if project is None else term_conv_plan(project),
    )
    if project is None or project.accum is None:
        return plan
    a_scale, a_zero = float(project.accum[0]), int(project.accum[1])

    def block_sum(q: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
        return plan.sum(q, acc, a_scale, a_zero)

    block_sum.fused = plan.fused  # type: ignore[attr-defined]
    return block_sum
