"""A convolution, its Hardswish and the quantization after it as one direct-kernel call
(MobileNetV3's pattern): the plan runner's outputs equal the oneDNN graph's, fused or not."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import compactnn
from compactnn.deployment import depthwise, direct
from compactnn.deployment.runner import _Codegen, plan_runner
from compactnn.kernels import bitconv

pytestmark = pytest.mark.skipif(
    not bitconv.available() or not bitconv.load_extension().has_vnni(),
    reason="no C++ compiler or no AVX-512 VNNI",
)


class _Block(nn.Module):
    """1x1 expand + Hardswish, depthwise + Hardswish, then a squeeze-excite style branch
    (the depthwise Hardswish's output has two readers: it stays a float output)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(16, 48, 1), nn.BatchNorm2d(48), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(48, 48, 5, 1, 2, groups=48), nn.BatchNorm2d(48),
                                nn.Hardswish())  # fmt: skip
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(48, 48, 1), nn.Hardsigmoid())
        self.project = nn.Sequential(nn.Conv2d(48, 24, 1), nn.BatchNorm2d(24))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(self.expand(self.stem(x)))
        return self.head(self.project(y * self.gate(y)))


def _deployed():
    torch.manual_seed(0)
    net = _Block().eval()
    calib = torch.randn(16, 3, 24, 24)
    qmodel = compactnn.compress(net, "w8a8", calib_data=calib, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dep = compactnn.deploy(qmodel, "onednn", example=calib)
    return dep, calib


def test_conv_hardswish_quantize_run_as_one_call():
    dep, calib = _deployed()
    gm = dep.program
    chains = list(_Codegen(gm).hardswish.values())
    assert len(chains) == 2  # the expand (with its quantize) and the depthwise (float out)
    assert sorted(quant is not None for _, _, quant in chains) == [False, True]
    runner = plan_runner(gm)
    for x in (calib, torch.randn(1, 3, 19, 27)):
        with torch.no_grad():
            assert torch.equal(runner(x), gm(x))
    assert dep.verify(calib).passed


def test_large_calls_run_the_three_steps(monkeypatch):
    dep, calib = _deployed()
    monkeypatch.setattr(direct, "plain_macs_limit", lambda: 0)
    monkeypatch.setattr(depthwise, "DEPTHWISE_VALUES", 0)
    monkeypatch.setattr(depthwise, "DEPTHWISE_VALUES_ONE_IMAGE", 0)
    runner = plan_runner(dep.program)
    with torch.no_grad():
        assert torch.equal(runner(calib), dep.program(calib))


def test_fused_hardswish_equals_pytorchs_bit_for_bit():
    """Float outputs of the fused kernels against ``F.hardswish`` of the oneDNN convolution
    (``x * (clamp(x + 3, 0, 6) / 6)``, one of the other orders, differs on ~20% of values)."""
    from compactnn.deployment.depthwise import depthwise_call
    from compactnn.deployment.direct import plain_conv_call
    from compactnn.deployment.onednn import Int8Conv2d

    torch.manual_seed(1)
    for conv in (nn.Conv2d(32, 48, 1), nn.Conv2d(32, 32, 3, padding=1, groups=32)):
        calib = torch.randn(8, 32, 10, 10)
        q = compactnn.compress(nn.Sequential(conv), "w8a8", calib_data=calib, progress=False)[0]
        m = Int8Conv2d(q, None)
        call = plain_conv_call if conv.groups == 1 else depthwise_call
        fused = call(m, lambda q: pytest.fail("a small call went to oneDNN"), hardswish=())
        x = torch.randint(0, 256, (4, 32, 20, 20), dtype=torch.uint8)
        with torch.no_grad():
            y = m(x)
            want, got = nn.functional.hardswish(y), fused(x)
        assert torch.equal(got, want)
        other = y * (torch.clamp(y + 3, 0, 6) / 6)
        assert (other != want).float().mean() > 0.05  # the test can fail


class _Classifier(nn.Module):
    """MobileNetV3's classifier: linear, Hardswish, linear (the Hardswish's output quantized
    for the second linear layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(16, 48), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(48, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def test_linear_hardswish_quantize_run_as_one_call(monkeypatch):
    torch.manual_seed(2)
    net = _Classifier().eval()
    calib = torch.randn(16, 3, 12, 12)
    qmodel = compactnn.compress(net, "w8a8", calib_data=calib, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dep = compactnn.deploy(qmodel, "onednn", example=calib)
    gm = dep.program
    chains = list(_Codegen(gm).hardswish.values())
    linear = [c for c in chains if type(gm.get_submodule(c[0].target)).__name__ == "Int8Linear"]
    assert len(linear) == 1 and linear[0][2] is not None  # with the quantize after it
    runner = plan_runner(gm)
    for x in (calib, torch.randn(1, 3, 12, 12)):
        with torch.no_grad():
            assert torch.equal(runner(x), gm(x))
    monkeypatch.setattr(direct, "plain_macs_limit", lambda: 0)  # the separate calls
    with torch.no_grad():
        assert torch.equal(plan_runner(gm)(calib), gm(calib))
