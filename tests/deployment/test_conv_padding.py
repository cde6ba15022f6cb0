"""String padding ('same' / 'valid') and padding modes on the oneDNN and ONNX Runtime
backends: exact forms deploy, the rest stay float with a named reason."""

import warnings

import pytest
import torch
from torch import nn

import compactnn


def _net(conv: nn.Conv2d) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), conv, nn.ReLU(),
                      nn.Flatten(), nn.LazyLinear(4))  # fmt: skip
    m(torch.zeros(1, 1, 8, 8))
    return m.eval()


def _deploy(conv: nn.Conv2d, backend: str):
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = compactnn.compress(_net(conv), "w8a8", calib_data=x)
        d = compactnn.deploy(q, backend, example=x[:8])
    with torch.no_grad():
        return d, float((d(x) - q(x)).abs().max())


@pytest.mark.parametrize("backend", ["onednn", "onnxruntime"])
@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(8, 8, 3, padding="same"),
        nn.Conv2d(8, 8, 3, padding="same", dilation=2),  # ORT refuses SAME_UPPER + dilation
        nn.Conv2d(8, 8, 3, padding="valid"),
    ],
    ids=["same", "same-dilation2", "valid"],
)
def test_exact_string_padding_runs_on_integer_kernels(conv, backend):
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    d, diff = _deploy(conv, backend)
    assert d.kept_float == {}
    assert d.verification.passed and diff < 1e-2


def test_uneven_same_padding_stays_float_named():
    d, diff = _deploy(nn.Conv2d(8, 8, (2, 4), padding="same"), "onednn")
    assert list(d.kept_float) == ["2"]
    assert "padding='same' with kernel_size (2, 4)" in d.kept_float["2"]
    assert diff < 1e-2


def test_padding_mode_on_onednn_stays_float_naming_the_backend_that_runs_it():
    d, diff = _deploy(nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), "onednn")
    assert list(d.kept_float) == ["2"]
    assert "padding_mode='reflect'" in d.kept_float["2"]
    assert "backend='onnxruntime'" in d.kept_float["2"]
    assert diff < 1e-2


def test_auto_deploy_of_same_dilated_padding_survives_the_float_onnx_contender():
    """The fp32 ONNX Runtime contender (a plain torch.onnx export writes SAME_UPPER, which ONNX
    Runtime refuses with a dilation at run time) is dropped with a warning, not a crash."""
    pytest.importorskip("onnxruntime")
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = compactnn.compress(_net(nn.Conv2d(8, 8, 3, padding="same", dilation=2)), "w8a8",
                               calib_data=x)  # fmt: skip
    with pytest.warns(UserWarning) as caught:
        d = compactnn.deploy(q, "auto", example=x[:8])
    assert any("ONNX Runtime fp32 not timed" in str(w.message) for w in caught)
    assert d.verification.passed
