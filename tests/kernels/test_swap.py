"""to_kernels' argument checks (the kernels themselves: test_linear.py, test_load.py)."""

import pytest
import torch
from torch import nn

import compactnn


def test_a_deployed_model_is_refused_saying_it_already_runs_on_kernels():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(8, 16)
    q = compactnn.compress(m, "w8a8", calib_data=x, progress=False)
    deployed = compactnn.deploy(q, "onednn", example=x)
    for inplace in (False, True):
        with pytest.raises(compactnn.CompactnnError, match=r"already deployed.*onednn.*compress"):
            compactnn.to_kernels(deployed, inplace=inplace)


def test_layers_without_a_kernel_are_listed_simulated_with_the_reason():
    """A quantized conv (a ViT patch embedding) has no kernel: to_kernels keeps it simulated,
    lists it with its reason and says so, so reports count it."""
    from compactnn.core.qlayers import is_quant_layer

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 32, 4, stride=4), nn.Flatten(), nn.Linear(32 * 4, 64), nn.ReLU(),
        nn.Linear(64, 10),
    ).eval()  # fmt: skip
    calib = [torch.randn(4, 4, 8, 8) for _ in range(2)]
    q = compactnn.compress(model, "w4-g32", calib_data=calib, progress=False)
    convs = [n for n, m in q.named_modules() if is_quant_layer(m) and "Conv" in type(m).__name__]
    assert convs == ["0"]
    with pytest.warns(UserWarning, match=r"1 quantized layer\(s\) have no kernel.*\(0\)"):
        fast = compactnn.to_kernels(q)
    info = fast._compactnn_kernels
    assert info["simulated"] == ["0"] and "QuantConv2d" in info["simulated_why"]["0"]
    assert set(info["swapped"]) == {"2", "4"}
    with torch.no_grad():  # numerics unchanged: bfloat16 model close to the simulation
        ref, got = q(calib[0]), fast(calib[0])
    assert float((got - ref).norm() / ref.norm()) < 0.05


def _w4_all_layers(model):
    """``model`` compressed with 'w4' on every layer (no 8-bit first/last layers)."""
    import dataclasses

    base = compactnn.resolve_recipe("w4").steps[0]
    config = dataclasses.replace(base.config, first_last_bits=None)
    recipe = compactnn.Recipe("w4-all", [compactnn.Step(base.method, config)])
    return compactnn.compress(model, recipe, progress=False)


def _head_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()


def test_int4_layer_with_out_features_not_a_multiple_of_16_falls_back():
    """torch's int4 packing needs out_features % 16 == 0: a 32->10 4-bit head takes the dense
    bfloat16 copy (or stays simulated in float32, with the reason) instead of crashing."""
    from compactnn.kernels.linear import Int4WeightLinear
    from tests.kernels.test_linear import _assert_bf16_close

    q = _w4_all_layers(_head_model())
    assert q[2].weight_spec.bits == 4 and q[0].weight_spec.bits == 4
    with pytest.raises(ValueError, match=r"out_features=10 is not a multiple of 16"):
        Int4WeightLinear(q[2])
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    for rows in (None, 8):
        fast = compactnn.to_kernels(q, dense_min_rows=rows)
        assert fast._compactnn_kernels["swapped"] == {"0": "Int4WeightLinear", "2": "DenseLinear"}
        with torch.no_grad():  # each layer within bfloat16 rounding of the simulation
            h = torch.relu(q[0](x))
            _assert_bf16_close(fast[0](x.bfloat16()).float(), q[0], x)
            _assert_bf16_close(fast[2](h.bfloat16()).float(), q[2], h)
    with pytest.warns(UserWarning, match=r"1 quantized layer\(s\) have no kernel.*\(2\)"):
        exact = compactnn.to_kernels(q, dtype=torch.float32, dense_min_rows=None, fused=False)
    info = exact._compactnn_kernels
    assert info["swapped"] == {"0": "Int4WeightLinear"} and info["simulated"] == ["2"]
    assert "out_features=10 is not a multiple of 16" in info["simulated_why"]["2"]
    with torch.no_grad():
        torch.testing.assert_close(exact(x), q(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_per_tensor_weights_take_the_dense_copy_not_a_crashing_kernel(bits):
    """The int8/int4 kernels take per-channel or group scales; a per-tensor grid (TWN-like)
    used to build them and crash in forward. It now runs on the dense copy (also per-call)."""
    from compactnn.core.qlayers import quantize_layer_rtn
    from compactnn.core.spec import QuantSpec
    from compactnn.kernels.swap import KernelConfig, kernel_or_reason
    from tests.kernels.test_linear import _assert_bf16_close

    torch.manual_seed(0)
    spec = QuantSpec(bits=bits, symmetric=False, granularity="tensor")
    q = quantize_layer_rtn(nn.Linear(32, 16), spec, None)
    k, why = kernel_or_reason(q, KernelConfig(dtype=torch.float32))
    assert k is None and "tensor scales" in why
    x = torch.randn(9, 32, generator=torch.Generator().manual_seed(1))
    for hold in (True, False):
        k, why = kernel_or_reason(q, KernelConfig(hold_dense=hold))
        assert type(k).__name__ == "DenseLinear" and why is None
        with torch.no_grad():
            _assert_bf16_close(k(x.bfloat16()).float(), q, x)
