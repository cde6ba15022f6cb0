"""The deployed model and the ONNX export refuse NaN input and examples (issue 11); the
verification itself is tested in tests/lowering/test_verify.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import compactnn
from compactnn.deployment.api import DeployedModel
from compactnn.errors import CompactnnError

NAN, INF = float("nan"), float("inf")


def _ref() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 10)).eval()


def _example() -> torch.Tensor:
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(1))


def test_deployed_model_refuses_nan_input():
    deployed = DeployedModel(_ref(), "onednn", {})
    x = _example()
    assert torch.equal(deployed(x), _ref()(x))  # finite input: unchanged behaviour
    x[2, 5] = NAN
    with pytest.raises(CompactnnError, match=r"deployed model input 0 holds 1 NaN .*\(2, 5\)"):
        deployed(x)
    with pytest.raises(CompactnnError, match=r"deployed model input 'x' holds 0 NaN and 1 Inf"):
        deployed(x=torch.tensor([[INF]]))


@pytest.fixture(scope="module")
def qnet():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 10))
    torch.manual_seed(0)
    images = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    return compactnn.compress(model.eval(), "w8a8", calib_data=images, progress=False), images


@pytest.mark.parametrize(
    ("example", "needle"),
    [(torch.zeros(0, 1, 8, 8), "example= is empty"), ("x", "must be a tensor")],
)
def test_deploy_refuses_empty_or_bad_example(qnet, example, needle):
    with pytest.raises(CompactnnError, match=needle):
        compactnn.deploy(qnet[0], "onednn", example=example)


def test_deploy_refuses_nan_example(qnet):
    example = qnet[1][:4].clone()
    example[0, 0, 0, 0] = NAN
    with pytest.raises(CompactnnError, match=r"example= holds 1 NaN"):
        compactnn.deploy(qnet[0], "onednn", example=example)


def test_deployed_cnn_refuses_nan_at_run_time(qnet):
    qmodel, images = qnet
    deployed = compactnn.deploy(qmodel, "onednn", example=images[:4])
    bad = images[:2].clone()
    bad[1, 0, 3, 3] = NAN
    assert torch.isnan(qmodel(bad)[1]).all()  # the simulation returns NaN for that sample
    with pytest.raises(CompactnnError, match="deployed model input 0 holds 1 NaN"):
        deployed(bad)


def test_onnx_export_refuses_nan_example(qnet, tmp_path):
    from compactnn.export.onnx import export_onnx

    example = qnet[1][:2].clone()
    example[1] = INF
    with pytest.raises(CompactnnError, match=r"example= holds 0 NaN and 64 Inf"):
        export_onnx(qnet[0], tmp_path / "m.onnx", example=example)
    assert not (tmp_path / "m.onnx").exists()
