"""The direct-kernel A/B of the bench (``compactnn.bench.demo_rows``): its "oneDNN" arm turns off
every direct layer choice of the runner, the squeeze-excitation block's included."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import compactnn
from compactnn.bench import demo_rows
from compactnn.deployment import chains, runner
from compactnn.kernels import bitconv

pytestmark = pytest.mark.skipif(
    not bitconv.available() or not bitconv.load_extension().has_vnni(),
    reason="no C++ compiler or no AVX-512 VNNI",
)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.Hardswish())
        self.fc = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 8, 1), nn.ReLU(), nn.Conv2d(8, 16, 1)
        )
        self.gate = nn.Hardsigmoid()
        self.head = nn.Sequential(nn.Conv2d(16, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(16, 10))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        return self.head(self.gate(self.fc(y)) * y)


def test_the_onednn_arm_turns_off_every_direct_layer(monkeypatch) -> None:
    torch.manual_seed(0)
    calib = torch.randn(8, 3, 16, 16)
    qmodel = compactnn.compress(_Block().eval(), "w8a8", calib_data=calib, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = compactnn.deploy(qmodel, "onednn", example=calib).program
    result = demo_rows.direct_kernels_ab(type("D", (), {"program": gm})(), calib, 1)
    assert result["identical"] and set(result) == {"old", "new", "identical"}
    on = runner._Codegen(gm)
    assert on.squeeze and on.hardswish  # the model has both, so the test can fail
    for name in demo_rows.DIRECT:
        where = [m for m in (runner, chains) if hasattr(m, name)]
        assert where  # a renamed choice would silently stay on
        for module in where:
            monkeypatch.setattr(module, name, lambda *modules: False)
    off = runner._Codegen(gm)
    assert not off.squeeze and not off.hardswish
