"""The direct two-term int8 convolution of the plan runner (``kernels/csrc/termconv.cpp``):
its codes against a float64 reference of the layer and against the stacked oneDNN path it
replaces (code for code), and the runner of a deployed TTQ model against its graph."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import compactnn
from compactnn.core.qlayers import ActQuantizer
from compactnn.core.spec import QuantSpec
from compactnn.deployment.direct import term_conv_call, term_conv_fits
from compactnn.deployment.lowbit import SplitConv2d
from compactnn.deployment.runner import plan_runner
from compactnn.kernels import bitconv
from tests.deployment.conftest import make_net

pytestmark = pytest.mark.skipif(
    not bitconv.available() or not bitconv.load_extension().has_vnni(),
    reason="no C++ compiler or no AVX-512 VNNI",
)


def _layer(c_in: int, out: int, stride: int, seed: int = 0):
    """A conv with a 4-bit input grid (scale 0.125, zero 2) and two random int8 terms."""
    g = torch.Generator().manual_seed(seed)
    layer = nn.Conv2d(c_in, out, 3, stride=stride, padding=1)
    aq = ActQuantizer(QuantSpec(bits=4, symmetric=False, granularity="tensor", signed=False))
    aq.set_qparams(torch.tensor(0.125), torch.tensor(2.0))
    layer.input_quantizer = aq
    shape = (out, c_in, 3, 3)
    t1 = (torch.randint(-128, 128, shape, generator=g).to(torch.int8), 4e-3 * torch.rand(out))
    t2 = (torch.randint(-128, 128, shape, generator=g).to(torch.int8), 2e-4 * torch.rand(out))
    with torch.no_grad():
        layer.bias.copy_(0.1 * torch.randn(out, generator=g))
    return layer, [t1, t2]


def _reference(layer, terms, x):
    """The float64 layer on the dequantized input and the summed weight terms."""
    w = sum(c.double() * s.double().reshape(-1, 1, 1, 1) for c, s in terms)
    xf = (x.double() - 2) * 0.125
    return nn.functional.conv2d(xf, w, layer.bias.double(), layer.stride, padding=1)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize(
    "form,unary",
    [
        ((0.05, 0), ("relu", [])),  # uint8 grid, ReLU folded into the codes' clamp
        ((0.03, 7, 0, 15), ("hardtanh", [0.0, 0.2])),  # narrow 4-bit grid, ReLU6-like
        ((0.04, 128), None),  # signed grid, no post-op
        (None, ("relu", [])),  # float output
    ],
)
def test_term_conv_equals_the_stacked_kernel_and_float64(stride, form, unary):
    # 10 input channels (not a multiple of 4: padded groups), 2 x 24 = 48 columns,
    # 7 output pixels per row (a full block of pixels and a remainder)
    layer, terms = _layer(10, 24, stride)
    split = SplitConv2d(layer, terms, form, unary)
    assert term_conv_fits(split)
    fast = term_conv_call(split)
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 16, (3, 10, 13, 13), generator=g).to(torch.uint8)
    x = x.contiguous(memory_format=torch.channels_last)
    got, stacked = fast(x), split(x)
    assert got.dtype == stacked.dtype and got.shape == stacked.shape
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, stacked)  # the same float operations as the oneDNN path
    assert torch.equal(fast(x.contiguous()), got)  # any input strides
    ref = _reference(layer, terms, x)
    if unary is not None:
        lo_f, hi_f = (0.0, float("inf")) if unary[0] == "relu" else unary[1]
        ref = ref.clamp(lo_f, hi_f)
    if form is None:
        assert (got.double() - ref).abs().max() < 1e-5 * ref.abs().max()
        return
    lo, hi = (form[2], form[3]) if len(form) == 4 else (0, 255)
    want = torch.clamp(torch.round(ref / form[0]) + form[1], lo, hi).to(torch.uint8)
    assert torch.equal(got, want)
    assert len(set(want.unique().tolist())) > 3  # not all clamped: the test can fail


def test_term_conv_pack_subtracts_the_zero_point_exactly():
    """Padding holds the zero point, so border pixels equal the zero-padded integer conv."""
    ext = bitconv.load_extension()
    w = torch.randint(-128, 128, (16, 5, 3, 3), generator=torch.Generator().manual_seed(5))
    w = w.to(torch.int8)
    packed, corr = ext.term_conv_pack(w, 200)
    assert packed.shape == (9, 2, 16, 4) and corr.shape == (16,)
    assert torch.equal(corr, w.long().sum(dim=(1, 2, 3)).mul(200).int())
    x = torch.randint(0, 256, (2, 5, 6, 4), generator=torch.Generator().manual_seed(6))
    x = x.to(torch.uint8)
    mult = torch.ones(16)  # float output of the exact integer dots (|dot| < 2^24)
    inf = float("inf")
    got = ext.term_conv(x, 200, packed, corr, mult, None, 1, 3, 3, [1, 1], [1, 1], [1, 1],
                        0.0, 0, -inf, inf, 0.0)  # fmt: skip
    want = nn.functional.conv2d(x.double() - 200, w.double(), padding=1)
    assert torch.equal(got.double(), want)


def test_runner_runs_ttq_split_layers_on_the_direct_kernel():
    torch.manual_seed(1)
    calib = torch.randn(8, 3, 12, 12)
    qmodel = compactnn.compress(make_net(), "w2a8-ttq", calib_data=calib, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dep = compactnn.deploy(qmodel, "onednn", example=calib)
    gm = dep.program
    splits = [m for m in gm.modules() if isinstance(m, SplitConv2d)]
    assert splits and any(term_conv_fits(m) for m in splits)
    runner = plan_runner(gm)
    for x in (calib, torch.randn(2, 3, 9, 7)):
        with torch.no_grad():
            assert torch.equal(runner(x), gm(x))
    assert dep.verify(calib).passed


def test_term_conv_scales_in_onednns_order_bit_for_bit():
    """With ``x_scale`` the kernel computes ``(dot * sx) * w_scale + bias``, oneDNN's order:
    one term equals oneDNN's int8 convolution bit for bit, float and code outputs, for an
    input scale that is not a power of two (where ``dot * (sx * w_scale)`` differs in the
    last bit on about a quarter of float outputs)."""
    ext = bitconv.load_extension()
    g = torch.Generator().manual_seed(7)
    c, o, sx, zx = 40, 48, 0.0213, 7
    w = torch.randint(-127, 128, (o, c, 3, 3), dtype=torch.int8, generator=g)
    ws = torch.rand(o, generator=g) * 1e-3 + 1e-4
    bias = torch.randn(o, generator=g)
    x = torch.randint(0, 256, (2, c, 9, 11), dtype=torch.uint8, generator=g)
    x = x.contiguous(memory_format=torch.channels_last)
    geo = ([2, 2], [1, 1], [1, 1])
    pk = torch.ops.onednn.qconv_prepack(w, ws, sx, zx, *geo, 1, list(x.shape))
    wz = torch.zeros(o, dtype=torch.int64)
    packed, corr = ext.term_conv_pack(w, zx)
    inf = float("inf")
    for o_scale, o_zero, unary, lo in ((0.0, 0, "none", -inf), (0.05, 3, "relu", 3.0)):
        dtype = torch.float32 if o_scale == 0 else torch.uint8
        want = torch.ops.onednn.qconv_pointwise(
            x, sx, zx, pk, ws, wz, bias, *geo, 1, o_scale or 1.0, o_zero, dtype, unary, [], ""
        )
        hi = inf if o_scale == 0 else 255.0
        got = ext.term_conv(
            x, zx, packed, corr, ws, bias, 1, 3, 3, *geo, o_scale, o_zero, lo, hi, sx
        )
        assert got.dtype == want.dtype and torch.equal(got, want)
        assert len(got.unique()) > 3  # not all clamped: the test can fail
