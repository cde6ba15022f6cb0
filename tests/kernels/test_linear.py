"""Integer CPU kernels against the simulated (dequantized) layers they replace."""

import warnings

import pytest
import torch

import compactnn
from compactnn.core.qlayers import QuantLinear
from compactnn.core.spec import QuantSpec
from compactnn.kernels.linear import Int4WeightLinear, Int8WeightLinear, W8A8Linear
from compactnn.kernels.swap import to_kernels
from compactnn.models.tiny_hf import outputs, tiny_model
from compactnn.quant.smoothquant import DynamicActQuantizer

warnings.filterwarnings("ignore", message=".*calibration samples")


def _layer(bits, symmetric, granularity, group=None, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(128, 48)
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity=granularity, group_size=group)
    from compactnn.core.qlayers import quantize_layer_rtn

    return quantize_layer_rtn(lin, spec, None)


def _x(m=7):
    return torch.randn(m, 128, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("symmetric", [True, False])
def test_int8_weight_only_matches_dequantized(symmetric):
    q = _layer(8, symmetric, "channel")
    k = Int8WeightLinear(q)
    # tolerance: float32 summation order over K=128 terms
    torch.testing.assert_close(k(_x()), q(_x()), rtol=1e-5, atol=1e-4)


INT4_CASES = [(4, False, 32), (4, True, 64), (3, False, 32), (2, False, 128)]


@pytest.mark.parametrize(("bits", "symmetric", "group"), INT4_CASES)
def test_int4_kernel_matches_dequantized(bits, symmetric, group):
    q = _layer(bits, symmetric, "group", group)
    k = Int4WeightLinear(q)
    torch.testing.assert_close(k(_x()), q(_x()), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(k(_x(1)), q(_x(1)), rtol=1e-4, atol=1e-4)  # batch 1


def test_w8a8_matches_dynamic_simulation():
    q = _layer(8, True, "channel")
    q.input_quantizer = DynamicActQuantizer(QuantSpec(bits=8, symmetric=False))
    k = W8A8Linear(q)
    # exact integer accumulation vs float: within a few float32 ulps of the output
    for m in (1, 7, 64):
        torch.testing.assert_close(k(_x(m)), q(_x(m)), rtol=1e-4, atol=1e-4)


def test_swap_model_keeps_outputs_and_lists_simulated_layers():
    model, calib = tiny_model("llama")
    for recipe, kind in [("w4-g32", "Int4WeightLinear"), ("w8a8-smoothquant", "W8A8Linear")]:
        q = compactnn.compress(model, recipe, calib_data=calib, progress=False)
        k = to_kernels(q)
        assert kind in k._compactnn_kernels["swapped"].values()
        for m in k.modules():  # only the 8-bit group-wise first/last layers lack a kernel
            if isinstance(m, QuantLinear):
                assert m.weight_spec.bits == 8 and m.weight_spec.granularity == "group"
        torch.testing.assert_close(outputs(k, calib[0]), outputs(q, calib[0]), rtol=1e-3, atol=1e-3)
