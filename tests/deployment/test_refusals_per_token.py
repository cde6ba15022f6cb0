"""deploy refuses per-token dynamic activations (DynamicActQuantizer) of any model up front,
naming the layers and where they run, instead of lowering them as a static grid."""

import warnings

import pytest
import torch
from torch import nn

import compactnn
from compactnn.core.dynact import DynamicActQuantizer, use_dynamic_act
from compactnn.deployment import api as deploy_api
from compactnn.deployment import refusals
from compactnn.errors import CompactnnError

warnings.filterwarnings("ignore", message=".*calibration samples")


def _never(*args, **kwargs):
    raise AssertionError("deploy traced the model")


def _w8a8(net: nn.Module, x: torch.Tensor) -> nn.Module:
    return compactnn.compress(net.eval(), "w8a8", calib_data=x, progress=False)


def test_a_per_token_linear_is_refused_before_tracing_and_pointed_to_the_kernels(monkeypatch):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    q = _w8a8(net, x)
    assert use_dynamic_act(q, ["2"]) == ["2"]  # by hand: layer '0' keeps its static grid
    monkeypatch.setattr(deploy_api, "_build", _never)
    for backend in ("auto", "onednn", "onnxruntime"):
        with pytest.raises(CompactnnError) as info:
            compactnn.deploy(q, backend, example=x[:8])
        message = str(info.value)
        assert "'2'" in message and "'0'" not in message and "per token" in message
        assert "compactnn.to_kernels" in message and "'w8a8'" in message
        assert "\n" not in message and len(message) < 500
    with pytest.warns(UserWarning, match=r"run simulated \(0\)"):  # '0': static, no kernel
        kernels = compactnn.to_kernels(q, dtype=torch.float32, fused=False)  # where '2' runs
    assert type(kernels[2]).__name__ == "W8A8Linear"
    torch.testing.assert_close(kernels(x), q(x), rtol=1e-5, atol=1e-5)


def test_a_per_token_convolution_is_refused_and_pointed_to_w8a8(monkeypatch):
    torch.manual_seed(0)  # an artifact written before compress refused this (rows of pixels)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    q = _w8a8(net, x)
    use_dynamic_act(q, ["0", "3"])
    monkeypatch.setattr(deploy_api, "_build", _never)
    with pytest.raises(CompactnnError) as info:
        compactnn.deploy(q, example=x[:8])
    message = str(info.value)
    assert "convolution" in message and "'0'" in message and "'w8a8'" in message
    assert "report" not in message


def test_the_reason_is_none_without_per_token_quantizers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8))
    q = _w8a8(net, torch.randn(16, 8))
    assert refusals.per_token_reason(q) is None
    q[0].input_quantizer = DynamicActQuantizer(q[0].input_quantizer.spec)
    assert "'0'" in refusals.per_token_reason(q)
