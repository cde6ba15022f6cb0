"""A depthwise convolution with the 1x1 convolutions around it as one pass
(``kernels/csrc/dwblock.cpp``, ``DwBlockPlan``): codes equal to oneDNN's int8 convolutions
called one by one, bit for bit, at every width, stride, window and batch, with and without the
projection's uint8 residual; the plan runner takes MobileNetV2-style blocks whole and keeps
the graph's outputs."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import compactnn
from compactnn.deployment import quantize_residuals
from compactnn.deployment import runner as runner_module
from compactnn.deployment.depthwise import dw_block_call, dw_block_fits
from compactnn.deployment.onednn import Int8Conv2d
from compactnn.deployment.runner import plan_runner
from compactnn.kernels import bitconv

pytestmark = pytest.mark.skipif(
    not bitconv.available()
    or not bitconv.load_extension().has_vnni()
    or not bitconv.load_extension().dw_integer_form(3, 3, 1),
    reason="no C++ compiler, or no AVX-512 VNNI + VBMI",
)
CL = torch.channels_last


def _quantized(conv: nn.Conv2d, cin: int) -> nn.Module:
    calib = torch.randn(8, cin, 9, 9)
    return compactnn.compress(nn.Sequential(conv), "w8a8", calib_data=calib, progress=False)[0]


def _pair(cin: int, cexp: int, k: int, stride: int, seed: int) -> tuple[nn.Module, nn.Module]:
    """A quantized 1x1 expansion and depthwise layer (grids and post-ops: :func:`_expand`, the
    test's choice)."""
    torch.manual_seed(seed)
    qe = _quantized(nn.Conv2d(cin, cexp, 1), cin)
    qd = _quantized(nn.Conv2d(cexp, cexp, k, stride=stride, padding=k // 2, groups=cexp), cexp)
    return qe, qd


def _expand(qe: nn.Module, qd: nn.Module, shift: int = 0) -> Int8Conv2d:
    """The expansion with ReLU6 into the depthwise layer's input grid (zero point + shift)."""
    sx, zx = Int8Conv2d(qd, None).x_qp
    return Int8Conv2d(qe, (float(sx), int(zx) + shift), ("hardtanh", [0.0, 6.0]))


def _codes(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g).to(torch.uint8).contiguous(memory_format=CL)


# expansions of one vector row (16 -> 96: a tile of 6 vectors), of two weight blocks
# (144 = 80 + 64), of a partial last vector (40, 200); windows 3x3 (unrolled), 5x5 (two tap
# groups) and 7x7 (the general loop); strides 1 and 2; several images, one tall image (the two
# threads' ranges meet inside it) and a 7x7 map at batch 1
@pytest.mark.parametrize(
    "cin,cexp,k,stride,shape",
    [
        (16, 96, 3, 2, (2, 13, 11)),
        (24, 144, 3, 1, (3, 9, 7)),
        (32, 40, 3, 1, (1, 37, 21)),
        (16, 200, 5, 2, (2, 10, 10)),
        (8, 24, 7, 1, (2, 9, 9)),
        (32, 384, 3, 1, (1, 7, 7)),
    ],
)
def test_expansion_and_depthwise_equal_the_two_int8_convolutions(cin, cexp, k, stride, shape):
    qe, qd = _pair(cin, cexp, k, stride, seed=cexp + k)
    expand = _expand(qe, qd)
    n, h, w = shape
    x = _codes((n, cin, h, w), 5)
    with torch.no_grad():
        mid = expand(x)
        spread = float(Int8Conv2d(qd, None)(mid).std()) / 40  # a code grid as wide as the values
    forms = [(None, ("none", [])), ((spread, 3), ("relu", [])), ((spread * 1.3, 7), ("none", []))]
    for out, unary in forms:
        dw = Int8Conv2d(qd, out, unary)
        assert dw_block_fits(expand, dw, None)
        fused = dw_block_call(expand, dw, None)
        assert fused.fused(x)
        with torch.no_grad():
            want = dw(expand(x))
            got = fused(x)
        assert got.dtype == want.dtype and torch.equal(got, want), (out, unary)
        assert got.is_contiguous(memory_format=CL)
    assert len(mid.unique()) > 20 and len(want.unique()) > 20  # not all clamped: can fail


def _project(cexp: int, cout: int, qd: nn.Module, seed: int) -> tuple[nn.Module, Int8Conv2d]:
    """A quantized projection and the depthwise layer with ReLU6 into its input grid."""
    torch.manual_seed(seed)
    qp = _quantized(nn.Conv2d(cexp, cout, 1), cexp)
    sx, zx = Int8Conv2d(qp, None).x_qp
    return qp, Int8Conv2d(qd, (float(sx), int(zx)), ("hardtanh", [0.0, 6.0]))


# whole blocks: expansion (or none), depthwise, projection with a uint8 residual (stride 1) or
# without; outputs of one vector (16), of a partial one (24), of two weight blocks (160)
@pytest.mark.parametrize(
    "cin,cexp,cout,stride,shape,expanded",
    [
        (16, 96, 16, 1, (2, 11, 9), True),
        (24, 144, 24, 1, (1, 29, 13), True),
        (16, 96, 24, 2, (3, 12, 10), True),
        (32, 192, 160, 1, (2, 7, 7), True),
        (32, 32, 16, 1, (2, 9, 11), False),
    ],
)
def test_whole_blocks_equal_the_int8_convolutions_one_by_one(
    cin, cexp, cout, stride, shape, expanded
):
    qe, qd = _pair(cin, cexp, 3, stride, seed=cexp + cout)
    qp, dw = _project(cexp, cout, qd, seed=cout)
    expand = _expand(qe, qd) if expanded else None
    n, h, w = shape
    x = _codes((n, cin, h, w), 7)
    with torch.no_grad():
        mid = dw(expand(x) if expanded else x)
        spread = float(Int8Conv2d(qp, None)(mid).std()) / 40
    residuals = [None]
    if stride == 1 and cin == cout:
        residuals.append((spread * 1.7, 120))
    for accum in residuals:
        project = Int8Conv2d(qp, (spread, 9), ("none", []), accum=accum)
        assert dw_block_fits(expand, dw, project)
        fused = dw_block_call(expand, dw, project)
        assert fused.fused(x)
        with torch.no_grad():
            if accum is None:
                want, got = project(mid), fused(x)
            else:
                acc = _codes((mid.shape[0], cout, *mid.shape[2:]), 8)
                want = project(mid, acc.clone())  # oneDNN writes the sum into its accumulator
                got = fused(x, acc)
        assert got.dtype == torch.uint8 and torch.equal(got, want), accum
        assert got.is_contiguous(memory_format=CL)
        assert len(want.unique()) > 20  # not all clamped: the test can fail


def test_other_inputs_run_the_plans_apart_and_other_layers_do_not_fit():
    qe, qd = _pair(16, 48, 3, 1, seed=1)
    expand = _expand(qe, qd)
    dw = Int8Conv2d(qd, (0.05, 3), ("relu", []))
    fused = dw_block_call(expand, dw, None)
    x = _codes((2, 16, 8, 8), 2).contiguous()  # NCHW codes: not the 1x1 tiles' layout
    assert not fused.fused(x)
    with torch.no_grad():
        assert torch.equal(fused(x), dw(expand(x)))
    assert not dw_block_fits(_expand(qe, qd, shift=1), dw, None)  # codes on another grid
    assert not dw_block_fits(dw, dw, None)  # not a 1x1 layer
    assert not dw_block_fits(expand, expand, None)  # not a depthwise layer
    assert not dw_block_fits(None, dw, None)  # nothing to fuse
    qp, _ = _project(48, 16, qd, seed=2)
    float_out = Int8Conv2d(qd, None, ("none", []))
    assert not dw_block_fits(None, float_out, Int8Conv2d(qp, (0.1, 3)))  # dw writes floats


class _InvertedResidual(nn.Module):
    def __init__(self, c: int, t: int, stride: int) -> None:
        super().__init__()
        h = c * t
        self.block = nn.Sequential(
            nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
            nn.Conv2d(h, h, 3, stride, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
            nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c),
        )  # fmt: skip
        self.residual = stride == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


@pytest.mark.parametrize("residuals", ["float", "codes"])
def test_the_runner_takes_inverted_residual_blocks_whole(monkeypatch, residuals):
    torch.manual_seed(6)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU6(),
        _InvertedResidual(16, 6, 1), _InvertedResidual(16, 6, 2),
        nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip
    net.train()
    with torch.no_grad():  # batch-norm statistics of real spread
        for _ in range(3):
            net(torch.randn(16, 3, 24, 24))
    net.eval()
    calib = torch.randn(16, 3, 24, 24)
    qmodel = compactnn.compress(net, "w8a8", calib_data=calib, progress=False)
    if residuals == "codes":  # the residual add as the projection's uint8 sum
        qmodel = quantize_residuals(qmodel, calib)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dep = compactnn.deploy(qmodel, "onednn", example=calib, tolerance=100)
    gm = dep.program
    made = []

    def counting(*layers):
        made.append(tuple(m is not None for m in layers))
        return dw_block_call(*layers)

    monkeypatch.setattr(runner_module, "dw_block_call", counting)
    fast = plan_runner(gm)
    # with float residuals the first block's projection writes floats: expansion + depthwise
    first = (True, True, True) if residuals == "codes" else (True, True, False)
    assert made == [first, (True, True, True)]
    for x in (calib, torch.randn(1, 3, 31, 17)):
        with torch.no_grad():
            assert torch.equal(fast(x), gm(x))
