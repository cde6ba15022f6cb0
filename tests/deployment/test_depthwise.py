"""Depthwise int8 convolutions on the direct kernel ``dw_conv`` (the plan runner's choice for
small calls): outputs equal to oneDNN's int8 convolution bit for bit, oneDNN kept for large
calls, and a MobileNet-style network run by the runner equal to its oneDNN graph."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import compactnn
from compactnn.deployment import depthwise
from compactnn.deployment.depthwise import depthwise_call, depthwise_fits
from compactnn.deployment.onednn import Int8Conv2d
from compactnn.deployment.runner import plan_runner
from compactnn.kernels import bitconv

pytestmark = pytest.mark.skipif(not bitconv.available(), reason="no C++ compiler")


def _qdw(c: int, k: int, stride: int, dilation: int = 1) -> nn.Module:
    torch.manual_seed(c + k)
    pad = dilation * (k // 2)
    conv = nn.Conv2d(c, c, k, stride=stride, padding=pad, dilation=dilation, groups=c)
    calib = torch.randn(8, c, 9, 9)
    return compactnn.compress(nn.Sequential(conv), "w8a8", calib_data=calib, progress=False)[0]


# 16 channels (one vector), 40 (a partial last vector), 96 with 5x5 taps, 24 with 7x7 (the
# integer form's unrolled 3x3 and 5x5 windows and its general loop); strides 1 and 2; dilation
# 2 (the float form); three images and one image of 37 rows (the float form's bands of 16)
@pytest.mark.parametrize(
    "c,k,stride,dilation",
    [(16, 3, 2, 1), (40, 3, 1, 1), (96, 5, 2, 1), (24, 7, 1, 1), (40, 3, 1, 2)],
)
@pytest.mark.parametrize("shape", [(3, 11, 10), (1, 37, 21)])
def test_depthwise_equals_onednn_bit_for_bit(c, k, stride, dilation, shape):
    q = _qdw(c, k, stride, dilation)
    g = torch.Generator().manual_seed(3)
    n, h, w = shape
    x = torch.randint(0, 256, (n, c, h, w), generator=g).to(torch.uint8)
    x = x.contiguous(memory_format=torch.channels_last)
    spread = float(Int8Conv2d(q, None)(x).std()) / 40  # code grids as wide as the values
    forms = [
        (None, ("none", [])),
        (None, ("relu", [])),
        ((spread * 1.3, 7), ("none", [])),  # a scale that is not a float32 value
        ((spread, 0), ("relu", [])),
        ((spread * 0.7, 3), ("hardtanh", [0.0, spread * 60])),
    ]
    for out, unary in forms:
        m = Int8Conv2d(q, out, unary)
        assert depthwise_fits(m)
        fast = depthwise_call(m, lambda q: pytest.fail("a small call went to oneDNN"))
        with torch.no_grad():
            want = m(x)
            for inp in (x, x.contiguous()):  # channels-last and NCHW codes
                got = fast(inp)
                assert got.dtype == want.dtype and torch.equal(got, want)
            assert got.is_contiguous(memory_format=torch.channels_last)
        assert len(want.unique()) > 20  # not all clamped: the test can fail


def test_large_calls_stay_on_onednn_in_the_float_form(monkeypatch):
    ext = bitconv.load_extension()
    m = Int8Conv2d(_qdw(16, 3, 1, dilation=2), (0.05, 3), ("relu", []))
    assert not ext.dw_integer_form(3, 3, 2)  # width dilation: the float form
    calls = []

    def onednn(q):
        calls.append(tuple(q.shape))
        return m(q)

    x = torch.randint(0, 256, (2, 16, 9, 9), dtype=torch.uint8)
    monkeypatch.setattr(depthwise, "DEPTHWISE_VALUES", 2 * 16 * (81 + 81))
    assert torch.equal(depthwise_call(m, onednn)(x), m(x)) and calls == []
    monkeypatch.setattr(depthwise, "DEPTHWISE_VALUES", 2 * 16 * (81 + 81) - 1)
    assert torch.equal(depthwise_call(m, onednn)(x), m(x)) and calls == [(2, 16, 9, 9)]
    one = x[:1]  # a single image has a limit of its own
    monkeypatch.setattr(depthwise, "DEPTHWISE_VALUES", 0)
    monkeypatch.setattr(depthwise, "DEPTHWISE_VALUES_ONE_IMAGE", 16 * (81 + 81))
    assert torch.equal(depthwise_call(m, onednn)(one), m(one)) and len(calls) == 1
    monkeypatch.setattr(depthwise, "DEPTHWISE_VALUES_ONE_IMAGE", 16 * (81 + 81) - 1)
    assert torch.equal(depthwise_call(m, onednn)(one), m(one)) and calls[1:] == [(1, 16, 9, 9)]


def test_the_integer_form_runs_every_call(monkeypatch):
    ext = bitconv.load_extension()
    if not ext.dw_integer_form(3, 3, 1):
        pytest.skip("this build has no VNNI + VBMI integer form")
    assert ext.dw_integer_form(7, 8, 1) and not ext.dw_integer_form(3, 9, 1)
    m = Int8Conv2d(_qdw(16, 3, 1), (0.05, 3), ("relu", []))
    monkeypatch.setattr(depthwise, "DEPTHWISE_VALUES", 0)
    monkeypatch.setattr(depthwise, "DEPTHWISE_VALUES_ONE_IMAGE", 0)
    fast = depthwise_call(m, lambda q: pytest.fail("the integer form went to oneDNN"))
    x = torch.randint(0, 256, (2, 16, 9, 9), dtype=torch.uint8)
    assert torch.equal(fast(x), m(x))


def test_fits_only_depthwise_layers():
    q = _qdw(16, 3, 1)
    assert not depthwise_fits(Int8Conv2d(q, None, ("relu", []), accum="float"))
    assert not depthwise_fits(Int8Conv2d(q, (0.05, 3), ("hardswish", [])))
    plain = compactnn.compress(nn.Sequential(nn.Conv2d(8, 16, 3)), "w8a8",
                               calib_data=torch.randn(4, 8, 7, 7), progress=False)[0]  # fmt: skip
    assert not depthwise_fits(Int8Conv2d(plain, None))


def test_runner_runs_a_mobilenet_block_on_the_direct_kernels():
    torch.manual_seed(4)
    net = nn.Sequential(
        nn.Conv2d(3, 24, 3, stride=2, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
        nn.Conv2d(24, 24, 3, padding=1, groups=24), nn.BatchNorm2d(24), nn.ReLU(),
        nn.Conv2d(24, 40, 1), nn.BatchNorm2d(40), nn.ReLU(),
        nn.Conv2d(40, 40, 5, stride=2, padding=2, groups=40), nn.BatchNorm2d(40), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(40, 10),
    ).eval()  # fmt: skip
    calib = torch.randn(16, 3, 20, 20)
    qmodel = compactnn.compress(net, "w8a8", calib_data=calib, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dep = compactnn.deploy(qmodel, "onednn", example=calib)
    gm = dep.program
    dws = [m for m in gm.modules() if isinstance(m, Int8Conv2d) and depthwise_fits(m)]
    assert len(dws) == 2
    runner = plan_runner(gm)
    for x in (calib, torch.randn(1, 3, 17, 23)):
        with torch.no_grad():
            assert torch.equal(runner(x), gm(x))
    assert dep.verify(calib).passed
