"""Per-token dynamic activation quantization."""

import torch
from torch import nn

from compactnn.core.dynact import DynamicActQuantizer, use_dynamic_act
from compactnn.core.qlayers import quantize_layer_rtn
from compactnn.core.spec import QuantSpec


def test_dynamic_act_quantizer_per_token_grid():
    q = DynamicActQuantizer(QuantSpec(bits=8, symmetric=False))
    x = torch.tensor([[0.0, 1.0, 2.55], [-1.0, 0.0, 1.0]])
    y = q(x)
    # row 0: range [0, 2.55], step 0.01; row 1: range [-1, 1], step 2/255
    assert (y[0] - x[0]).abs().max() <= 0.005 + 1e-6
    assert (y[1] - x[1]).abs().max() <= 1 / 255 + 1e-6


def test_use_dynamic_act_swaps_only_layers_with_an_input_quantizer():
    spec = QuantSpec(bits=8)
    act = QuantSpec(bits=8, symmetric=False, granularity="tensor")
    model = nn.Sequential(
        quantize_layer_rtn(nn.Linear(4, 4), spec, act),
        quantize_layer_rtn(nn.Linear(4, 2), spec, None),
    )
    assert use_dynamic_act(model, ["0", "1"]) == ["0"]
    assert isinstance(model[0].input_quantizer, DynamicActQuantizer)
    assert model[1].input_quantizer is None
