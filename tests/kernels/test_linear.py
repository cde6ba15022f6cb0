"""Integer CPU kernels against the simulated (dequantized) layers they replace."""

import warnings

import pytest
import torch
from torch import nn

import compactnn
from compactnn.core.dynact import DynamicActQuantizer
from compactnn.core.qlayers import QuantLinear
from compactnn.core.spec import QuantSpec
from compactnn.kernels.linear import Int4WeightLinear, Int8WeightLinear
from compactnn.kernels.swap import to_kernels
from compactnn.kernels.w8a8 import W8A8Linear
from compactnn.models.tiny_hf import outputs, tiny_model
from tests.engines._tiny_t5 import logits, tiny_t5

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
        k = to_kernels(q, dtype=torch.float32, dense_min_rows=None, fused=False)  # exact mode
        assert kind in k._compactnn_kernels["swapped"].values()
        for m in k.modules():  # only the 8-bit group-wise first/last layers lack a kernel
            if isinstance(m, QuantLinear):
                assert m.weight_spec.bits == 8 and m.weight_spec.granularity == "group"
        torch.testing.assert_close(outputs(k, calib[0]), outputs(q, calib[0]), rtol=1e-3, atol=1e-3)


# bfloat16 compute: activations, scales (and the dense copy) are rounded to bfloat16 (8
# significant bits, relative error <= 2**-9 each) and the output too. Bound per output:
# 2**-7 * sum_k |x_k| (|w_k| + 2 max_k |w_k|) (three operand roundings per product; the
# offset and zero-point terms are at most twice the row's largest weight) + 2**-8 |y|.
@torch.no_grad()
def _assert_bf16_close(got, layer, x):
    ref = layer(x)
    w = layer.weight
    mag = w.abs() + 2 * w.abs().amax(1, keepdim=True)
    bound = 2**-7 * (x.abs() @ mag.T) + 2**-8 * ref.abs()
    assert got.dtype == x.dtype
    assert bool(((got - ref).abs() <= bound).all())
    assert float((got - ref).norm() / ref.norm()) < 5e-3  # measured: 0.25-0.35%


@pytest.mark.parametrize("dense_min_rows", [None, 8])
@pytest.mark.parametrize(
    ("bits", "symmetric", "group"), [(8, True, None), (8, False, None), *INT4_CASES]
)
def test_bf16_kernels_within_bf16_rounding(bits, symmetric, group, dense_min_rows):
    if bits == 8:
        q, cls = _layer(8, symmetric, "channel"), Int8WeightLinear
    else:
        q, cls = _layer(bits, symmetric, "group", group), Int4WeightLinear
    k = cls(q, torch.bfloat16, dense_min_rows)
    for m in (1, 7, 8, 64):  # kernel below dense_min_rows, dense copy from there on
        with torch.no_grad():
            _assert_bf16_close(k(_x(m)), q, _x(m))


@pytest.mark.parametrize("cls", [Int8WeightLinear, Int4WeightLinear])
def test_dense_switch_by_row_count(cls):
    q = _layer(8, True, "channel") if cls is Int8WeightLinear else _layer(4, False, "group", 32)
    k, low = cls(q, torch.float32, dense_min_rows=8), cls(q)
    assert torch.equal(k(_x(7)), low(_x(7)))  # below the threshold: the low-bit kernel
    dense = torch.nn.functional.linear(_x(8), q.weight, q.bias)
    assert torch.equal(k(_x(8)), dense)  # from the threshold on: the dequantized weight


def test_dense_copy_stays_out_of_state_dict_and_survives_copies():
    import copy
    import pickle

    q = _layer(4, False, "group", 32)
    k = Int4WeightLinear(q, torch.bfloat16, dense_min_rows=1)
    assert set(k.state_dict()) == {"bias", "packed", "scales_zeros"}
    x = _x(9)
    for clone in (copy.deepcopy(k), pickle.loads(pickle.dumps(k))):
        assert torch.equal(clone(x), k(x))


def test_w8a8_bfloat16_input_rounds_only_the_output():
    q = _layer(8, True, "channel")
    q.input_quantizer = DynamicActQuantizer(QuantSpec(bits=8, symmetric=False))
    k = W8A8Linear(q)
    xb = _x(16).bfloat16()
    got = k(xb)
    assert got.dtype == torch.bfloat16  # codes from the exact upcast input, as the simulation
    torch.testing.assert_close(got.float(), q(xb.float()), rtol=2**-8, atol=1e-4)


def test_to_kernels_bfloat16_runs_the_whole_model_in_bfloat16():
    model, calib = tiny_model("llama")
    for recipe in ("w4-g32", "w8", "w8a8-smoothquant"):
        q = compactnn.compress(model, recipe, calib_data=calib, progress=False)
        k = to_kernels(q, fused=False)  # default: bfloat16, dense copy from 8 rows
        info = k._compactnn_kernels
        assert info["dtype"] == "bfloat16" and info["simulated"] == []
        assert k.model.norm.weight.dtype == torch.bfloat16  # the float parts too
        for batch in calib[:2]:
            got, ref = outputs(k, batch), outputs(q, batch)
            assert got.dtype == torch.float32  # float32 in, float32 out, as the float model
            assert float((got - ref).norm() / ref.norm()) < 2e-2  # bf16 model: ~0.5-1.2%
    assert (
        "DenseLinear"
        in to_kernels(compactnn.compress(model, "w4-g32", calib_data=calib, progress=False))
        ._compactnn_kernels["swapped"]
        .values()
    )  # 8-bit group-wise first/last layers


def test_to_kernels_rejects_bad_options():
    model, _ = tiny_model("llama")
    with pytest.raises(compactnn.errors.CompactnnError, match="dtype"):
        to_kernels(model, dtype=torch.float16)
    with pytest.raises(compactnn.errors.CompactnnError, match="dense_min_rows"):
        to_kernels(model, dense_min_rows=0)


def test_to_kernels_is_public_with_keyword_only_options():
    model, _ = tiny_model("llama")
    assert compactnn.to_kernels is to_kernels
    with pytest.raises(TypeError):
        to_kernels(model, True)  # inplace is keyword-only
    out = to_kernels(model, inplace=True, fused=False)
    assert out is model and out._compactnn_kernels["dtype"] == "bfloat16"


def test_formats_without_a_kernel_stay_simulated_in_float32_islands():
    q = _layer(8, False, "channel")  # asymmetric weights: no W8A8 kernel
    q.input_quantizer = DynamicActQuantizer(QuantSpec(bits=8, symmetric=False))
    model = torch.nn.Sequential(q)
    k = to_kernels(model, fused=False)
    assert k._compactnn_kernels["simulated"] == ["0"]
    x = _x(5)
    with torch.no_grad():  # float32 in and out; the layer itself ran in float32
        torch.testing.assert_close(k(x), q(x.bfloat16().float()), rtol=2**-8, atol=1e-3)
    assert k[0].weight is k[0].inner.weight  # what T5 reads: the weight the island runs on


@pytest.mark.parametrize("cls", [Int8WeightLinear, Int4WeightLinear])
def test_lean_layers_dequantize_per_call_the_same_weight_and_hold_no_copy(cls):
    from compactnn.kernels.linear import DenseLinear

    if cls is Int8WeightLinear:
        q = _layer(8, False, "channel")
    else:
        q = _layer(3, True, "group", 32)
    lean = cls(q, torch.float32, dense_min_rows=8, hold_dense=False)
    assert lean.dense is None  # nothing dense is held
    assert torch.equal(lean.dequantized(), q.weight)  # the simulation's float32 weight
    dense = torch.nn.functional.linear(_x(8), q.weight, q.bias)
    assert torch.equal(lean(_x(8)), dense)  # from the threshold on: the dequantized weight
    assert torch.equal(lean(_x(7)), cls(q)(_x(7)))  # below it: the low-bit kernel
    held = cls(q, torch.float32, dense_min_rows=8)
    assert set(lean.state_dict()) == set(held.state_dict())  # the saved form is unchanged
    bf = cls(q, torch.bfloat16, dense_min_rows=8, hold_dense=False)
    with torch.no_grad():
        _assert_bf16_close(bf(_x(64)), q, _x(64))
    g8 = _layer(8, True, "group", 32)  # a first/last-layer format without a low-bit kernel
    dl = DenseLinear(g8, torch.bfloat16, hold_dense=False)
    assert dl.dense is None and torch.equal(dl.dequantized(), g8.weight.bfloat16())


def test_to_kernels_warns_when_no_layer_runs_on_kernels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    with pytest.warns(UserWarning, match="no layer of this model runs on low-bit kernels: it has"):
        out = compactnn.to_kernels(model)  # a float model: only a bfloat16 copy comes back
    assert out._compactnn_kernels["swapped"] == {}
    q = compactnn.compress(model, "w4-g32", calib_data=torch.randn(4, 64), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a quantized model: no warning
        fast = compactnn.to_kernels(q)
    assert fast._compactnn_kernels["swapped"]


def test_to_kernels_runs_t5_whose_feed_forward_reads_the_weight_dtype():
    """T5's feed-forward casts its input to ``wo.weight.dtype``: the kernel layers answer it
    with an empty stand-in, and the outputs match the simulated model as for other models."""
    model, calib = tiny_t5(batches=2)
    q = compactnn.compress(model, "w4-g32", calib_data=calib, progress=False)
    exact = to_kernels(q, dtype=torch.float32, dense_min_rows=None, fused=False)
    assert "Int4WeightLinear" in exact._compactnn_kernels["swapped"].values()
    torch.testing.assert_close(logits(exact, calib[0]), logits(q, calib[0]), rtol=1e-3, atol=1e-3)
    fast = to_kernels(q, fused=False)  # bfloat16: low-bit kernels and dense copies
    assert isinstance(fast.encoder.block[0].layer[1].DenseReluDense.wo, Int4WeightLinear)
    for batch in calib:
        got, ref = logits(fast, batch), logits(q, batch)
        assert float((got - ref).norm() / ref.norm()) < 2e-2


@pytest.mark.parametrize("cls", [Int8WeightLinear, Int4WeightLinear])
def test_weight_is_an_empty_stand_in_in_the_compute_dtype(cls):
    from compactnn.core.modules import weight_layers
    from compactnn.kernels.linear import DenseLinear

    q = _layer(8, False, "channel") if cls is Int8WeightLinear else _layer(4, True, "group", 32)
    for k in (cls(q, torch.bfloat16), DenseLinear(q, torch.bfloat16)):
        w = k.weight
        assert isinstance(w, torch.Tensor) and w.dtype == torch.bfloat16
        assert w.device == q.weight_codes.device and w.numel() == 0  # no values held
        assert "weight" not in k.state_dict()
        assert weight_layers(nn.Sequential(k)) == {}  # not taken for a float weight layer
    with pytest.raises(RuntimeError):
        nn.functional.linear(_x(), cls(q).weight)  # computing with it fails loudly


def test_t5_feed_forward_runs_on_the_w8a8_kernel():
    """T5's feed-forward reads ``wo.weight.dtype``: the W8A8 kernel answers int8 (no cast)."""
    import copy

    from compactnn.core.modules import set_module
    from compactnn.core.qlayers import QuantLinear
    from compactnn.kernels.w8a8 import W8A8Linear

    model, calib = tiny_t5(batches=2)
    q = compactnn.compress(model, "w8a8", calib_data=calib, progress=False)
    k = copy.deepcopy(q)
    wos = [n for n, m in k.named_modules() if n.endswith(".wo") and isinstance(m, QuantLinear)]
    assert len(wos) == 4
    for name in wos:
        set_module(k, name, W8A8Linear(k.get_submodule(name)))
    w = k.get_submodule(wos[0]).weight
    assert w.dtype == torch.int8 and w.numel() == 0
    for batch in calib:
        got, ref = logits(k, batch), logits(q, batch)
        # the kernel quantizes activations per token, the simulation on its static grid
        assert float((got - ref).norm() / ref.norm()) < 3e-2


def test_to_kernels_names_layers_left_simulated_even_when_others_swapped():
    """A static-activation W8A8 layer has no kernel; with another layer swapped (here a
    weight-only one) it used to run simulated without a word."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    calib = torch.randn(8, 64)
    q = compactnn.compress(model, "w8a8", calib_data=calib, progress=False)
    w4 = compactnn.compress(model, "w4-g32", calib_data=calib, progress=False)
    q[2] = w4[2]  # the head: weight-only, has a kernel
    with pytest.warns(UserWarning, match=r"1 quantized layer\(s\) have no kernel here") as rec:
        out = compactnn.to_kernels(q)
    assert "(0)" in str(rec[0].message) and "'w8a8-smoothquant'" in str(rec[0].message)
    assert out._compactnn_kernels["simulated"] == ["0"] and "2" in out._compactnn_kernels["swapped"]


def test_bfloat16_int8_kernel_only_takes_widths_its_kernel_reads_safely():
    """torch._weight_int8pack_mm in bfloat16 segfaults when in_features % 16 != 0: such a
    layer takes a dense bfloat16 copy instead (same values), never the crashing kernel."""
    from compactnn.kernels.swap import KernelConfig, kernel_layer

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(24, 8), torch.nn.Linear(8, 32), torch.nn.Linear(32, 4)
    )
    q = compactnn.compress(model, "w8", progress=False)
    kinds = [
        type(kernel_layer(q[i], KernelConfig(dtype=torch.bfloat16))).__name__ for i in range(3)
    ]
    assert kinds == ["DenseLinear", "DenseLinear", "Int8WeightLinear"]
    assert type(kernel_layer(q[0], KernelConfig(dtype=torch.float32))) is Int8WeightLinear
    fast = compactnn.to_kernels(q)
    x = torch.randn(5, 24)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), q(x), atol=0.05, rtol=0.02)  # bfloat16 compute
