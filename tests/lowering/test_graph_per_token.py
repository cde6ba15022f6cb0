"""Lowering never reads a per-token dynamic quantizer (DynamicActQuantizer) as a static grid:
its unused scale of 1 and zero of 0 are no uint8 form of its codes."""

import torch
from torch import nn

from compactnn.core.dynact import DynamicActQuantizer
from compactnn.core.qlayers import ActQuantizer, quantize_layer_rtn
from compactnn.core.spec import QuantSpec
from compactnn.lowering.graph import is_residual_quantizer, unsupported_reason


def _act_spec() -> QuantSpec:
    return QuantSpec(bits=8, symmetric=False, granularity="tensor")


def _layers():
    torch.manual_seed(0)
    wspec, aspec = QuantSpec(bits=8, granularity="channel"), _act_spec()
    return [quantize_layer_rtn(f, wspec, aspec) for f in (nn.Linear(8, 4), nn.Conv2d(2, 4, 3))]


def test_a_per_token_input_is_kept_in_float_with_its_reason():
    for layer in _layers():
        layer.input_quantizer.set_qparams(torch.tensor(0.1), torch.tensor(128.0))
        assert unsupported_reason(layer) is None  # the static grid: int8 kernels take it
        layer.input_quantizer = DynamicActQuantizer(layer.input_quantizer.spec)
        reason = unsupported_reason(layer)
        assert reason is not None and "per token" in reason


def test_a_standalone_per_token_quantizer_is_no_residual_grid():
    spec = _act_spec()
    static = ActQuantizer(spec)
    static.set_qparams(torch.tensor(0.1), torch.tensor(128.0))
    assert is_residual_quantizer(static)
    assert not is_residual_quantizer(DynamicActQuantizer(spec))
