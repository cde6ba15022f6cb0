"""Loading an artifact straight into kernel layers: bit-identical to ``to_kernels(load(path))``,
with no float weights in the skeleton."""

import copy
import warnings

import pytest
import torch
from torch import nn

import compactnn
from compactnn.core.qlayers import QuantLinear, quantize_layer_rtn
from compactnn.core.spec import QuantSpec
from compactnn.errors import CompactnnError
from compactnn.export.artifact import load
from compactnn.kernels.linear import dense_weight
from compactnn.kernels.load import meta_copy, params_on_meta
from compactnn.kernels.swap import KernelConfig, to_kernels
from compactnn.models.tiny_hf import outputs, tiny_model

warnings.filterwarnings("ignore", message=".*calibration samples")
tf = pytest.importorskip("transformers")


def _saved(model, calib, recipe, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = compactnn.compress(model, recipe, calib_data=calib, progress=False)
    compactnn.save(q, tmp_path / "a")
    return tmp_path / "a"


def _assert_same(ref: nn.Module, new: nn.Module, batch: dict) -> None:
    assert ref._compactnn_kernels == new._compactnn_kernels
    a, b = ref.state_dict(), new.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert not any(t.is_meta for t in [*new.parameters(), *new.buffers()])
    assert torch.equal(outputs(ref, batch), outputs(new, batch))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_load_kernels_is_bit_identical_to_to_kernels(arch, tmp_path):
    model, calib = tiny_model(arch)
    path = _saved(model, calib, "w4-g32", tmp_path)
    ref = to_kernels(load(path))
    new = load(path, kernels=True)
    _assert_same(ref, new, calib[1])
    # the float-kept tensors are the artifact's, not the skeleton's random init
    assert any(isinstance(m, nn.LayerNorm) or "Norm" in type(m).__name__ for m in new.modules())


def _minilm_shaped():
    torch.manual_seed(0)
    cfg = tf.BertConfig(
        vocab_size=512, hidden_size=384, intermediate_size=1536, num_hidden_layers=1,
        num_attention_heads=12, max_position_embeddings=64,
    )  # fmt: skip
    model = tf.BertModel(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 512, (2, 40), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    return model, [{"input_ids": ids, "attention_mask": mask}]


@pytest.fixture(scope="module")
def minilm_shaped(tmp_path_factory):
    model, calib = _minilm_shaped()
    return _saved(model, calib, "w4-g32", tmp_path_factory.mktemp("minilm")), calib


@pytest.mark.parametrize(
    "config",
    [KernelConfig(), KernelConfig(dtype=torch.float32, dense_min_rows=None)],
    ids=["bf16-dense", "fp32-lowbit"],
)
def test_minilm_shaped_bert_bit_identical(config, minilm_shaped):
    path, calib = minilm_shaped
    kw = {k: getattr(config, k) for k in ("dtype", "dense_min_rows", "fused", "hold_dense")}
    ref = to_kernels(load(path), **kw)
    new = load(path, kernels=config)
    _assert_same(ref, new, calib[0])
    # 1-row calls run the int4 kernel itself (below dense_min_rows)
    one = {k: v[:1, :1] for k, v in calib[0].items()}
    assert torch.equal(outputs(ref, one), outputs(new, one))


def test_given_model_is_untouched_and_lean_w8a8(tmp_path):
    model, calib = tiny_model("llama")
    path = _saved(model, calib, "w8a8-smoothquant", tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = KernelConfig(fused=False, hold_dense=False)
    ref = to_kernels(load(path, model=model), fused=False, hold_dense=False)
    new = load(path, model=model, kernels=config)
    _assert_same(ref, new, calib[1])
    assert "W8A8Linear" in new._compactnn_kernels["swapped"].values()
    for k, v in model.state_dict().items():
        assert not v.is_meta and torch.equal(v, before[k]), k


@pytest.mark.parametrize("bad", ["yes", 1, {"dtype": "bf16"}])
def test_bad_kernels_argument_is_refused(bad, tmp_path):
    with pytest.raises(CompactnnError, match="kernels="):
        load(tmp_path, kernels=bad)


def test_params_on_meta_keeps_buffers_and_restores():
    with params_on_meta():
        lin = nn.Linear(4000, 3000)
        bn = nn.BatchNorm1d(8)
    assert lin.weight.is_meta and lin.bias.is_meta and bn.weight.is_meta
    assert not bn.running_mean.is_meta and torch.equal(bn.running_var, torch.ones(8))
    with pytest.raises(RuntimeError), params_on_meta():
        raise RuntimeError("boom")
    assert not nn.Linear(2, 2).weight.is_meta  # restored after an exception


def test_meta_copy_leaves_the_model_alone():
    m = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    c = meta_copy(m)
    assert all(p.is_meta for p in c.parameters())
    assert not any(p.is_meta for p in m.parameters())
    assert torch.equal(c[1].running_var, m[1].running_var)


def _meta_weight(q: QuantLinear) -> QuantLinear:
    c = copy.deepcopy(q)
    c.weight = nn.Parameter(torch.empty_like(q.weight, device="meta"), requires_grad=False)
    return c


@pytest.mark.parametrize(
    ("granularity", "group"), [("tensor", None), ("channel", None), ("group", 32)]
)
def test_dense_weight_from_codes_equals_the_weight(granularity, group, monkeypatch):
    torch.manual_seed(0)
    spec = QuantSpec(bits=4, symmetric=False, granularity=granularity, group_size=group)
    q = quantize_layer_rtn(nn.Linear(128, 48), spec, None)
    monkeypatch.setattr("compactnn.kernels.linear.CHUNK_ELEMENTS", 1000)  # many slices
    for dtype in (torch.float32, torch.bfloat16):
        got = dense_weight(_meta_weight(q), dtype)
        assert got.dtype == dtype and torch.equal(got, q.weight.to(dtype))
    # a codebook grid: levels[q - qmin] per group
    levels = torch.randn(*q.weight_scale.shape, 16).half().float()
    q.set_codebook(levels)
    q.refresh_weight()
    assert torch.equal(dense_weight(_meta_weight(q), torch.bfloat16), q.weight.bfloat16())


def test_load_kernels_of_a_4bit_head_whose_width_int4_cannot_pack(tmp_path):
    """A 32->10 4-bit head (out_features % 16 != 0) is a valid artifact: load(kernels=True)
    gives to_kernels(load(path)) bit for bit, within bfloat16 rounding of the simulation."""
    from tests.kernels.test_swap import _head_model, _w4_all_layers

    q = _w4_all_layers(_head_model())
    compactnn.save(q, tmp_path / "a")
    new = load(tmp_path / "a", model=_head_model(), kernels=True)
    ref = to_kernels(load(tmp_path / "a", model=_head_model()))
    assert new._compactnn_kernels == ref._compactnn_kernels
    assert new._compactnn_kernels["swapped"] == {"0": "Int4WeightLinear", "2": "DenseLinear"}
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(new(x), ref(x))
        sim = q(x)  # bfloat16 model: activations, weights and outputs rounded (8 bits)
        assert float((new(x) - sim).norm() / sim.norm()) < 1e-2
    exact = load(tmp_path / "a", model=_head_model(), kernels=KernelConfig(dtype=torch.float32))
    assert exact._compactnn_kernels["simulated"] == ["2"]
    with torch.no_grad():
        torch.testing.assert_close(exact(x), sim, rtol=1e-4, atol=1e-4)


def test_a_kernel_failing_on_a_layer_is_not_blamed_on_the_artifact(tmp_path, monkeypatch):
    """A torch kernel error past the shape checks names the layer and says the model is
    fine; load(kernels=True) does not call the (valid) artifact malformed."""
    from compactnn.errors import ArtifactError
    from compactnn.kernels import swap
    from tests.kernels.test_swap import _head_model, _w4_all_layers

    compactnn.save(_w4_all_layers(_head_model()), tmp_path / "a")

    def broken(*args, **kwargs):
        raise RuntimeError("kernel says no")

    monkeypatch.setattr(swap, "Int4WeightLinear", broken)
    with pytest.raises(CompactnnError, match=r"layer '0' \(64->32.*kernel says no.*simulated") as e:
        load(tmp_path / "a", model=_head_model(), kernels=True)
    assert not isinstance(e.value, ArtifactError)
