"""SmoothQuant's per-token dynamic activations are for Linear layers: compress refuses them
on convolutions (one grid per row of pixels, which no int8 kernel runs) and says what to use."""

import warnings

import pytest
import torch
from torch import nn

import compactnn
from compactnn.core.dynact import DynamicActQuantizer
from compactnn.deployment import refusals
from compactnn.errors import CompactnnError
from compactnn.lowering.graph import unsupported_reason
from compactnn.recipe import Recipe

warnings.filterwarnings("ignore", message=".*calibration samples")


def _cnn():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 8 * 8, 10),
    )  # fmt: skip
    return net.eval(), torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def test_dynamic_smoothquant_on_convolutions_is_refused_naming_them_and_w8a8():
    net, x = _cnn()
    with pytest.raises(CompactnnError) as info:
        compactnn.compress(net, "w8a8-smoothquant", calib_data=x, progress=False)
    message = str(info.value)
    assert "'0', '2'" in message and "'5'" not in message  # the convolutions, not the Linear
    assert "'w8a8'" in message and "dynamic: false" in message and "ignore" in message
    assert "\n" not in message and len(message) < 500


def test_convolutions_kept_in_float_leave_the_linear_layers_per_token():
    net, x = _cnn()
    recipe = Recipe.from_dict(
        {"steps": [{"method": "smoothquant", "targets": {"ignore": ["0", "2"]}}]}
    )
    q = compactnn.compress(net, recipe, calib_data=x, progress=False)
    kinds = {
        n: type(m.input_quantizer) for n, m in q.named_modules() if hasattr(m, "input_quantizer")
    }
    assert kinds == {"5": DynamicActQuantizer}


def test_static_smoothquant_on_a_cnn_quantizes_every_input_per_tensor():
    net, x = _cnn()
    recipe = Recipe.from_dict({"steps": [{"method": "smoothquant", "config": {"dynamic": False}}]})
    q = compactnn.compress(net, recipe, calib_data=x, progress=False)
    aqs = [m.input_quantizer for m in q.modules() if hasattr(m, "input_quantizer")]
    assert len(aqs) == 3 and not any(isinstance(a, DynamicActQuantizer) for a in aqs)
    assert all(a.calibrated and a.scale.numel() == 1 for a in aqs)
    assert refusals.per_token_reason(q) is None  # deploy takes it: static grids throughout
    assert all(unsupported_reason(m) is None for m in q.modules() if hasattr(m, "input_quantizer"))
