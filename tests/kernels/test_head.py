"""A small CNN head on direct kernels (``csrc/head.cpp``): the fused global average pool +
quantization equals ``adaptive_avg_pool2d(x, 1)`` then the deployed quantizer, and the small
int8 linear layer equals oneDNN's, bit for bit; the plan runner uses both."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from compactnn.deployment.onednn import quantize_u8
from compactnn.kernels import bitconv


@pytest.fixture(scope="module")
def ext():
    if not bitconv.available():
        pytest.skip("no C++ compiler for the extension")
    return bitconv.load_extension()


@pytest.mark.parametrize(
    ("n", "c", "h", "w"), [(16, 64, 7, 7), (1, 10, 3, 5), (40, 17, 4, 4), (2, 32, 20, 20)]
)
@pytest.mark.parametrize(("scale", "zero"), [(0.06021, 0), (0.013, 128)])
def test_pool_quantize_equals_the_pytorch_ops(ext, n, c, h, w, scale, zero) -> None:
    g = torch.Generator().manual_seed(n * c + h)
    x = (torch.randn(n, c, h, w, generator=g) * 4).relu_()
    x = x.contiguous(memory_format=torch.channels_last)
    # values on rounding ties of the grid (half steps) and past both ends of it
    x[0, 0] = scale * 2.5
    x[-1, -1] = 1e6
    x[0, 1] = -1e6
    want = quantize_u8(F.adaptive_avg_pool2d(x, 1), (scale, zero))
    got = ext.pool_quantize(x, scale, zero, 0, 255)
    assert got.shape == want.shape == (n, c, 1, 1)
    assert torch.equal(got.flatten(1), want.flatten(1))
    assert int((got.flatten(1) == 255).sum()) >= 1 and int((got.flatten(1) == 0).sum()) >= 1


def test_pool_quantize_refuses_other_layouts(ext) -> None:
    with pytest.raises(RuntimeError, match="channels-last"):
        ext.pool_quantize(torch.randn(2, 3, 4, 4), 0.1, 0, 0, 255)


@pytest.fixture(scope="module")
def deployed():
    import compactnn
    from tests.deployment.conftest import make_net

    torch.manual_seed(1)
    calib = torch.randn(32, 3, 16, 16)
    qmodel = compactnn.compress(make_net(), "w8a8", calib_data=calib, progress=False)
    return compactnn.deploy(qmodel, "onednn", example=calib), calib


def test_small_linear_equals_onednn_bit_for_bit(ext, deployed) -> None:
    from compactnn.deployment.direct import small_linear_call, small_linear_fits
    from compactnn.deployment.onednn import Int8Linear
    from compactnn.deployment.runner import _linear_call

    dep, _ = deployed
    head = next(m for m in dep.program.modules() if isinstance(m, Int8Linear))
    assert small_linear_fits(head) and head.out is None
    direct, onednn = small_linear_call(head), _linear_call(head)
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 64):
        q = torch.randint(0, 256, (n, head.w_int8.shape[1]), dtype=torch.uint8, generator=g)
        assert torch.equal(direct(q), onednn(q))


def test_runner_runs_the_head_on_direct_kernels_and_matches_the_graph(ext, deployed) -> None:
    from compactnn.deployment.runner import _Codegen, plan_runner

    dep, calib = deployed
    gm = dep.program
    assert len(_Codegen(gm).pooled) == 1  # the pool passes its input to the fused quantize
    runner = plan_runner(gm)
    assert "pool_quantize" in repr(runner._run.__globals__.values())
    with torch.no_grad():
        for x in (calib, torch.randn(3, 3, 12, 20)):
            assert torch.equal(runner(x), gm(x))


class _FunctionalPoolNet(torch.nn.Module):
    """MobileNetV2's tail: the pool is ``F.adaptive_avg_pool2d(x, (1, 1))``, not a module."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
            nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.ReLU6(),
        )  # fmt: skip
        self.classifier = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def test_runner_fuses_a_functional_global_pool_with_its_quantize(ext) -> None:
    import compactnn
    from compactnn.deployment.runner import _Codegen, plan_runner

    torch.manual_seed(2)
    calib = torch.randn(16, 3, 16, 16)
    qmodel = compactnn.compress(_FunctionalPoolNet().eval(), "w8a8", calib_data=calib,
                                progress=False)  # fmt: skip
    gm = compactnn.deploy(qmodel, "onednn", example=calib).program
    assert any(n.target is F.adaptive_avg_pool2d for n in gm.graph.nodes)
    assert len(_Codegen(gm).pooled) == 1  # the function's pool runs in the fused pass
    runner = plan_runner(gm)
    assert "pool_quantize" in repr(runner._run.__globals__.values())
    with torch.no_grad():
        for x in (calib, torch.randn(1, 3, 20, 12)):
            assert torch.equal(runner(x), gm(x))
