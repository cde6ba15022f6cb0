"""Stride-1 unpadded 1x1 int8 convolutions on ``term_conv``'s tile-in-registers path
(``kernels/csrc/pointwise.cpp``): codes equal to oneDNN's int8 convolution bit for bit at
every width, with and without a bias and a uint8 residual, at every size (the plan runner no
longer sends large calls of these layers to oneDNN on a CPU without AMX)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import compactnn
from compactnn.deployment import direct
from compactnn.deployment.direct import plain_conv_call, pointwise, term_conv_plan
from compactnn.deployment.onednn import Int8Conv2d
from compactnn.kernels import bitconv

pytestmark = pytest.mark.skipif(
    not bitconv.available() or not bitconv.load_extension().has_vnni(),
    reason="no C++ compiler or no AVX-512 VNNI",
)
CL = torch.channels_last


def _q1x1(cin: int, out: int, bias: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, out, 1, bias=bias)
    calib = torch.randn(8, cin, 6, 6)
    return compactnn.compress(nn.Sequential(conv), "w8a8", calib_data=calib, progress=False)[0]


def _codes(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g).to(torch.uint8).contiguous(memory_format=CL)


def _grid(q: nn.Module, x: torch.Tensor) -> tuple[float, int]:
    """An output grid about as wide as the layer's values, so that few codes saturate."""
    with torch.no_grad():
        y = plain_conv_call(Int8Conv2d(q, None, ("none", [])), None)(x)
    return float(y.std()) / 40, 9


# Widths: a partial vector (24, 200, 1000), one tile (96: 6 vectors), blocks of at most 128
# columns cut into tiles of at most 6 vectors (144 = 80 + 64; 384 = 3 x 128 = 3 x (4 + 4);
# 960 = 8 blocks of 7 or 8 vectors). 7 x 9 x 3 = 189 pixels: two chunks and a tail of tiles.
@pytest.mark.parametrize("out", [16, 24, 96, 144, 200, 384, 960, 1000])
@pytest.mark.parametrize("bias", [True, False])
def test_every_width_equals_onednn(out, bias):
    q = _q1x1(32, out, bias)
    x = _codes((3, 32, 7, 9), 1)
    grid = _grid(q, x)
    for unary in (("relu", []), ("hardtanh", [0.0, 60 * grid[0]]), ("none", [])):
        m = Int8Conv2d(q, grid, unary)
        assert pointwise(m)
        plan = term_conv_plan(m)
        assert plan.pointwise(x)
        with torch.no_grad():
            want, got = m(x), plan(x)
        assert got.is_contiguous(memory_format=CL)
        assert torch.equal(got, want), unary
        assert len(want.unique()) > 20


@pytest.mark.parametrize("out", [24, 144, 960])
def test_a_uint8_residual_equals_onednns_sum(out):
    q = _q1x1(64, out)
    x = _codes((2, 64, 11, 13), 2)
    acc = _codes((2, out, 11, 13), 3)
    sa, _ = _grid(q, x)
    for unary in (("relu", []), ("none", [])):
        m = Int8Conv2d(q, _grid(q, x), unary, accum=(sa * 1.3, 100))
        assert pointwise(m)
        fast = plain_conv_call(m, lambda q, acc: pytest.fail("went to oneDNN"))
        with torch.no_grad():
            want = m(x, acc.clone())  # oneDNN writes the sum into its accumulator
            got = fast(x, acc.clone())
        assert torch.equal(got, want)
        assert len(want.unique()) > 20


def test_large_calls_run_here_on_a_cpu_without_amx(monkeypatch):
    """MobileNetV2's 16 -> 96 expansion at 112x112, batch 8, is 154 M MACs: above the plain
    limit, and still on the direct kernel (a small stand-in: the limit lowered to 1)."""
    q = _q1x1(16, 96)
    x = _codes((2, 16, 20, 20), 4)
    m = Int8Conv2d(q, _grid(q, x), ("relu", []))
    monkeypatch.setattr(direct, "plain_macs_limit", lambda: 1)
    fast = plain_conv_call(m, lambda q: pytest.fail("a pointwise call went to oneDNN"))
    with torch.no_grad():
        assert torch.equal(fast(x), m(x))
    monkeypatch.setattr(direct, "_has_amx", lambda: True)
    assert not pointwise(m)  # with AMX, oneDNN keeps the large calls
    calls = []

    def onednn(q):
        calls.append(q.shape)
        return m(q)

    with torch.no_grad():
        assert torch.equal(plain_conv_call(m, onednn)(x), m(x))
    assert calls == [x.shape]


def test_other_layouts_and_layers_take_the_general_path():
    q = _q1x1(32, 48)
    x = _codes((2, 32, 5, 7), 5)
    m = Int8Conv2d(q, _grid(q, x), ("relu", []))
    plan = term_conv_plan(m)
    assert plan.pointwise(x) and not plan.pointwise(x.contiguous())  # NCHW: a padded copy
    assert not plan.pointwise(x[:, :28].contiguous(memory_format=CL)[:, :, :, :3])
    with torch.no_grad():
        assert torch.equal(plan(x.contiguous()), m(x))
    torch.manual_seed(0)
    strided = nn.Conv2d(32, 48, 1, stride=2)
    calib = torch.randn(8, 32, 6, 6)
    qs = compactnn.compress(nn.Sequential(strided), "w8a8", calib_data=calib, progress=False)[0]
    assert not pointwise(Int8Conv2d(qs, (0.05, 3), ("relu", [])))
    assert not pointwise(Int8Conv2d(q, None, ("relu", [])))  # float out
    assert not pointwise(Int8Conv2d(q, (0.05, 3), ("relu", []), accum="float"))
