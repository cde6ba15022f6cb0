"""The direct one-input-channel convolution of the plan runner (``kernels/csrc/smallconv.cpp``):
its codes against a float32 computation of the int8 kernel's formula, and the runner that uses
it (fused with the input's quantization) against the oneDNN graph, code for code."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import compactnn
from compactnn.deployment.direct import small_conv_fits
from compactnn.deployment.lowbit import code_bounds
from compactnn.deployment.onednn import Int8Conv2d, quantize_u8
from compactnn.deployment.runner import _Codegen, plan_runner
from compactnn.kernels import bitconv
from tests.deployment.conftest import make_net

pytestmark = pytest.mark.skipif(not bitconv.available(), reason="no C++ compiler")


def _reference(x, sx, zx, w, mult, bias, out, relu, stride, padding):
    """The int8 kernel's formula in float32: exact integer dots (float64 conv of integers),
    ``acc * (sx * sw) + bias``, ReLU, then ``round(y / scale) + zero`` clamped."""
    q = quantize_u8(x, (sx, zx)).double() - zx
    acc = nn.functional.conv2d(q, w.double(), stride=stride, padding=padding).float()
    y = acc * mult[:, None, None] + bias[:, None, None]
    if relu:
        y = y.relu()
    if out is None:
        return y
    return (y / out[0]).round().add(out[1]).clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize("out", [(0.05, 3), None])
@pytest.mark.parametrize("stride", [1, 2])
def test_small_conv_equals_the_kernel_formula(out, stride):
    torch.manual_seed(0)
    ext = bitconv.load_extension()
    x = torch.randn(3, 1, 11, 9) * 2
    w = torch.randint(-128, 128, (16, 1, 3, 3), dtype=torch.int8)
    sx, zx = 0.031, 128
    mult = sx * torch.rand(16) * 0.01
    bias = torch.randn(16)
    wt = w.float().permute(1, 2, 3, 0).reshape(9, 16).contiguous()
    if out is None:
        lo, hi, o_scale, o_zero = 0.0, float("inf"), 0.0, 0
    else:
        lo, hi = code_bounds(("relu", []), out)
        o_scale, o_zero = out
    args = (wt, mult, bias, 1, 3, 3, [stride] * 2, [1, 1], [1, 1], o_scale, o_zero, lo, hi, 0.0)
    got = ext.small_conv(x, sx, zx, 0, 255, *args)  # float input: quantized inside
    ref = _reference(x, sx, zx, w, mult, bias, out, True, stride, 1)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert got.is_contiguous(memory_format=torch.channels_last)
    if out is None:
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(got, ref)
        codes = quantize_u8(x, (sx, zx))
        assert torch.equal(ext.small_conv(codes, sx, zx, 0, 255, *args), got)  # codes input


def test_runner_fuses_the_first_layer_and_matches_the_graph():
    torch.manual_seed(1)
    calib = torch.randn(16, 1, 12, 12)
    qmodel = compactnn.compress(make_net(in_ch=1), "w8a8", calib_data=calib, progress=False)
    dep = compactnn.deploy(qmodel, "onednn", example=calib)
    gm = dep.program
    first = next(m for m in gm.modules() if isinstance(m, Int8Conv2d))
    assert small_conv_fits(first)
    assert len(_Codegen(gm).absorbed) == 1  # the input's quantization runs inside the kernel
    runner = plan_runner(gm)
    for x in (calib, torch.randn(2, 1, 9, 7)):
        with torch.no_grad():
            assert torch.equal(runner(x), gm(x))
    assert dep.verify(calib).passed


def test_small_conv_scales_in_onednns_order_bit_for_bit():
    """With ``x_scale`` the kernel computes ``(acc * sx) * w_scale + bias`` like oneDNN's int8
    convolution: equal to it bit for bit, float and code outputs, codes and float input."""
    ext = bitconv.load_extension()
    g = torch.Generator().manual_seed(4)
    sx, zx, o = 0.0213, 9, 32
    w = torch.randint(-127, 128, (o, 1, 3, 3), dtype=torch.int8, generator=g)
    ws = torch.rand(o, generator=g) * 1e-2 + 1e-3
    bias = torch.randn(o, generator=g)
    x = torch.randn(3, 1, 13, 10, generator=g)
    q = quantize_u8(x, (sx, zx))
    geo = ([1, 1], [1, 1], [1, 1])
    pk = torch.ops.onednn.qconv_prepack(w, ws, sx, zx, *geo, 1, list(q.shape))
    wz = torch.zeros(o, dtype=torch.int64)
    wt = w.float().permute(1, 2, 3, 0).reshape(9, o).contiguous()
    inf = float("inf")
    for o_scale, o_zero, unary, lo in ((0.0, 0, "none", -inf), (0.05, 3, "relu", 3.0)):
        dtype = torch.float32 if o_scale == 0 else torch.uint8
        want = torch.ops.onednn.qconv_pointwise(
            q, sx, zx, pk, ws, wz, bias, *geo, 1, o_scale or 1.0, o_zero, dtype, unary, [], ""
        )
        hi = inf if o_scale == 0 else 255.0
        args = (wt, ws, bias, 1, 3, 3, *geo, o_scale, o_zero, lo, hi, sx)
        for inp in (q, x):  # codes, and float input quantized inside
            got = ext.small_conv(inp, sx, zx, 0, 255, *args)
            assert got.dtype == want.dtype and torch.equal(got, want)
        assert len(want.unique()) > 3  # not all clamped: the test can fail


def test_small_conv_codes_use_onednns_reciprocal():
    """oneDNN writes codes as ``nearbyint(y * (1 / s) + z)`` (a float32 reciprocal, the zero
    point before the rounding); the simulation's ``nearbyint(y / s) + z`` differs on a few
    outputs in a million, for output scales that are not float32 values (as the deploy's
    grids are): 2.4 M outputs at three grids, where that form differs, so the test can fail."""
    ext = bitconv.load_extension()
    g = torch.Generator().manual_seed(8)
    sx, zx, o = 0.0213, 9, 32
    w = torch.randint(-127, 128, (o, 1, 3, 3), dtype=torch.int8, generator=g)
    ws = torch.rand(o, generator=g) * 1e-2 + 1e-3
    bias = torch.randn(o, generator=g)
    q = quantize_u8(torch.randn(8, 1, 80, 80, generator=g), (sx, zx))
    geo = ([1, 1], [1, 1], [1, 1])
    pk = torch.ops.onednn.qconv_prepack(w, ws, sx, zx, *geo, 1, list(q.shape))
    wz = torch.zeros(o, dtype=torch.int64)
    wt = w.float().permute(1, 2, 3, 0).reshape(9, o).contiguous()
    inf = float("inf")
    y = ext.small_conv(q, sx, zx, 0, 255, wt, ws, bias, 1, 3, 3, *geo, 0.0, 0, -inf, inf, sx)
    spread = float(y.std()) / 40
    division_differs = 0
    for k, zo in ((1.0, 7), (1.37, 128), (0.71, 0)):
        scale = spread * k
        want = torch.ops.onednn.qconv_pointwise(
            q, sx, zx, pk, ws, wz, bias, *geo, 1, scale, zo, torch.uint8, "none", [], ""
        )
        args = (wt, ws, bias, 1, 3, 3, *geo, scale, zo, 0.0, 255.0, sx)
        assert torch.equal(ext.small_conv(q, sx, zx, 0, 255, *args), want)
        assert 100 < len(want.unique()) and (want == 255).float().mean() < 0.1
        division = (y / scale).round().add(zo).clamp(0, 255).to(torch.uint8)
        division_differs += int((division != want).sum())
    assert division_differs > 0
