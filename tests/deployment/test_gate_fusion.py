"""A squeeze-excitation tail, quantize(Hardsigmoid(g) * x), as one direct-kernel pass
(MobileNetV3's pattern), and 2-D quantizations on the extension: equal codes to PyTorch's ops."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import compactnn
from compactnn.deployment import runner as runner_module
from compactnn.deployment.codes import gate_quantize_call, quantize_call
from compactnn.deployment.onednn import Quantize, quantize_u8
from compactnn.deployment.runner import _Codegen, plan_runner
from compactnn.kernels import bitconv

pytestmark = pytest.mark.skipif(not bitconv.available(), reason="no C++ compiler")

CL = torch.channels_last
GRID = (0.0213, 121)


def _reference(pre: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return quantize_u8(F.hardsigmoid(pre) * x, GRID)


def _inputs(n: int, c: int, h: int, w: int, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n * 1000 + c * 10 + h + w)
    pre = torch.randn(n, c, 1, 1, generator=g) * 4  # both flat ends of the Hardsigmoid
    pre.view(-1)[:4] = torch.tensor([-3.0, 3.0, 0.0, -2.9999])[: pre.numel()]
    x = torch.randn(n, c, h, w, generator=g) * 3
    x.view(-1)[:2] = torch.tensor([1e6, -1e6])  # past both ends of the grid
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    elif layout == "strided":
        x = torch.randn(n, c, h, 2 * w, generator=g)[..., ::2] * 3
    return pre, x


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize(("n", "c", "h", "w"), [(1, 16, 56, 56), (2, 19, 5, 37), (3, 96, 7, 7)])
def test_gate_quantize_equals_the_three_pytorch_ops(layout, n, c, h, w) -> None:
    pre, x = _inputs(n, c, h, w, layout)
    ext = bitconv.load_extension()
    got = ext.gate_quantize(x, pre, GRID[0], GRID[1], 0, 255)
    want = _reference(pre, x)
    assert got.is_contiguous(memory_format=CL)
    assert torch.equal(got, want)
    # rounding ties of the product: x * gate lands on a half step of the grid
    assert (want > 0).any() and (want < 255).any()


def test_gate_quantize_narrow_code_range_and_ties() -> None:
    ext = bitconv.load_extension()
    pre = torch.full((1, 16, 1, 1), 3.0)  # gate exactly 1: x reaches the quantizer unchanged
    x = (GRID[0] * (torch.arange(16 * 4 * 4) - 128 + 0.5)).reshape(1, 16, 4, 4)
    got = ext.gate_quantize(x, pre, GRID[0], GRID[1], 100, 140)
    assert torch.equal(got, _reference(pre, x).clamp(100, 140))


def test_gate_call_falls_back_on_other_shapes() -> None:
    quant = Quantize(GRID)
    calls = []

    def unfused(pre, x):
        calls.append(1)
        return _reference(pre, x)

    fused = gate_quantize_call(quant, unfused)
    pre, x = _inputs(2, 8, 5, 5, "nchw")
    assert torch.equal(fused(pre, x), _reference(pre, x)) and not calls
    wide = torch.randn(2, 8, 5, 5)  # not a per-channel gate: the three calls
    assert torch.equal(fused(wide, x), _reference(wide, x)) and calls == [1]


def test_two_dimensional_quantization_runs_on_the_extension() -> None:
    quant = Quantize(GRID)
    x = torch.randn(3, 1024) * 3
    x[0, :40] = GRID[0] * (torch.arange(40) - 20 + 0.5)  # ties
    got = quantize_call(quant)(x)
    assert got.shape == (3, 1024) and got.dtype == torch.uint8
    assert torch.equal(got, quant(x))
    xt = torch.randn(1024, 3).t()  # not viewable as (3, 1024, 1, 1)
    assert torch.equal(quantize_call(quant)(xt), quant(xt))


class _SqueezeExcite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 3, 2, 1), nn.BatchNorm2d(24), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(24, 24, 3, 1, 1, groups=24), nn.BatchNorm2d(24))
        self.fc = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(24, 8, 1), nn.ReLU(), nn.Conv2d(8, 24, 1)
        )
        self.gate = nn.Hardsigmoid()
        self.project = nn.Sequential(nn.Conv2d(24, 16, 1), nn.BatchNorm2d(16))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(self.stem(x))
        return self.head(self.project(self.gate(self.fc(y)) * y))


def _deployed(seed: int):
    """The oneDNN graph of a w8a8 ``_SqueezeExcite`` and its calibration batch."""
    torch.manual_seed(seed)
    calib = torch.randn(16, 3, 24, 24)
    qmodel = compactnn.compress(_SqueezeExcite().eval(), "w8a8", calib_data=calib, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compactnn.deploy(qmodel, "onednn", example=calib).program, calib


def _calls(source: str) -> int:
    return sum("(" in line for line in source.splitlines()[1:])


def test_plan_runner_fuses_the_tail_with_equal_outputs(monkeypatch) -> None:
    gm, calib = _deployed(0)
    cg = _Codegen(gm)
    assert len(cg.gates) == 1 and len(cg.squeeze) == 1
    real = runner_module.squeeze_call

    def no_fallback(*args):  # the block must run as the one SqueezePlan call
        return real(*args[:-1], lambda x: pytest.fail("the squeeze block fell back"))

    monkeypatch.setattr(runner_module, "squeeze_call", no_fallback)
    runner = plan_runner(gm)
    monkeypatch.setattr(runner_module, "squeeze_call", real)
    for x in (calib, torch.randn(1, 3, 19, 27)):
        with torch.no_grad():
            assert torch.equal(runner(x), gm(x))
    monkeypatch.setattr(runner_module, "squeeze_chain", lambda *a: None)
    tail_only = plan_runner(gm)
    monkeypatch.setattr(runner_module, "gate_chain", lambda gm, node: None)
    unfused = plan_runner(gm)
    # pool + quantize, fc1, fc2 and the tail's three calls became one
    assert _calls(tail_only.source) == _calls(runner.source) + 3
    assert _calls(unfused.source) == _calls(tail_only.source) + 2
    with torch.no_grad():
        assert torch.equal(unfused(calib), runner(calib))
        assert torch.equal(tail_only(calib), runner(calib))


def test_squeeze_block_falls_back_on_other_layouts() -> None:
    from compactnn.deployment.direct import squeeze_call

    gm, _ = _deployed(1)
    cg = _Codegen(gm)
    ((quant, (poolq, fc1, fc2)),) = cg.squeeze.items()
    mods = [gm.get_submodule(n.target) for n in (poolq, fc1, fc2, quant)]
    calls = []
    fused = squeeze_call(*mods, lambda x: calls.append(x) or torch.zeros(1))
    x = torch.randn(2, 24, 12, 12).contiguous(memory_format=CL)
    got = fused(x)
    assert got.shape == (2, 24, 12, 12) and got.dtype == torch.uint8 and not calls
    with torch.no_grad():  # the graph's own modules, one by one (oneDNN's convolutions)
        pre = mods[2](mods[1](mods[0](cg.pooled[poolq](x))))
        want = mods[3](F.hardsigmoid(pre) * x)
    assert torch.equal(got, want) and len(want.unique()) > 5
    fused(x.contiguous())  # NCHW: the separate calls
    assert len(calls) == 1
