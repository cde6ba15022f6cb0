"""The QDQ ONNX form pads as the simulation does: padding_mode reflect / replicate /
circular and the uneven 'same' of an even kernel become an explicit pad before the conv."""

import warnings

import pytest
import torch
from torch import nn

import compactnn
from compactnn.export.onnx import export_onnx, qdq_module
from compactnn.export.onnx_forms import conv_pads

pytest.importorskip("onnxruntime")

CONVS = {
    "reflect": nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"),
    "replicate": nn.Conv2d(8, 8, 3, padding=1, padding_mode="replicate"),
    "circular": nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular"),
    "reflect-dilated": nn.Conv2d(8, 8, 3, padding=2, dilation=2, padding_mode="reflect"),
    "same-even": nn.Conv2d(8, 8, (2, 4), padding="same"),
}


def _quantized(conv: nn.Conv2d):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), conv, nn.ReLU(),
                      nn.Flatten(), nn.LazyLinear(4))  # fmt: skip
    m(torch.zeros(1, 1, 8, 8))
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compactnn.compress(m.eval(), "w8a8", calib_data=x), x


@pytest.mark.parametrize("name", list(CONVS))
def test_qdq_form_and_onnx_file_match_the_simulation(name, tmp_path):
    q, x = _quantized(CONVS[name])
    with torch.no_grad():
        gap = float((qdq_module(q, int32_biases=False)[0](x) - q(x)).abs().max())
    # same ops on the same values (was 10+ with zero padding); a dilated conv of an explicitly
    # padded input may sum in another order (measured 1.1e-4 on one run, 0.0 on another)
    assert gap < 1e-3
    result = export_onnx(q, tmp_path / "m.onnx", example=x)
    assert result.passed


def test_conv_pads():
    assert conv_pads(nn.Conv2d(1, 1, 3, padding="same", dilation=2)) == ([2, 2], None)
    assert conv_pads(nn.Conv2d(1, 1, 3, padding="valid")) == ([0, 0], None)
    replicate = nn.Conv2d(1, 1, 3, padding=(1, 2), padding_mode="replicate")
    assert conv_pads(replicate) == ([0, 0], ([2, 2, 1, 1], "replicate"))
