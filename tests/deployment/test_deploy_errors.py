"""What deploy and a deployed model refuse or warn about, and the fix each message names: bad
arguments, unsupported layers, transformers, pickling, ONNX export, wrong input shapes."""

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import compactnn
from compactnn.deployment import api as deploy_api
from compactnn.errors import CompactnnError
from tests.deployment.conftest import WithConv1d, make_net, steps


def test_unsupported_layer_kept_in_float_with_a_warning_or_refused():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 6, 6)
    qmodel = compactnn.compress(WithConv1d(), "w8a8", calib_data=x, progress=False)
    with pytest.warns(UserWarning, match=r"kept in float.*seq \(QuantConv1d"):
        deployed = compactnn.deploy(qmodel, "onednn", example=x)
    assert list(deployed.kept_float) == ["seq"]


def test_bad_inputs_fail_loudly(qnet):
    qmodel, calib = qnet
    with pytest.raises(CompactnnError, match="example="):
        compactnn.deploy(qmodel)
    with pytest.raises(CompactnnError, match="backend"):
        compactnn.deploy(qmodel, backend="tpu", example=calib[:2])
    with pytest.raises(CompactnnError, match="no quantized layers"):
        compactnn.deploy(make_net(), example=calib[:2])
    weight_only = compactnn.compress(make_net(), "w8", progress=False)
    with warnings.catch_warnings(), pytest.raises(CompactnnError, match="w8a8"):
        warnings.simplefilter("ignore")
        compactnn.deploy(weight_only, example=calib[:2])
    with pytest.raises(CompactnnError, match=r"^tolerance=-1\.0: pass a finite number"):
        compactnn.deploy(qmodel, example=calib[:4], tolerance=-1.0)  # refused before any work


def test_example_is_keyword_only(qnet):
    qmodel, calib = qnet
    with pytest.raises(TypeError):
        compactnn.deploy(qmodel, "onednn", calib[:4])


def test_the_plain_artifact_writer_refuses_a_deployed_model(qnet, tmp_path):
    """compactnn.save routes a deployed model to save_deployed (tests/deployment/test_ship.py);
    the artifact writer underneath refuses it rather than write an empty artifact."""
    from compactnn import api

    qmodel, calib = qnet
    fast = compactnn.deploy(qmodel, "onednn", example=calib[:8])
    with pytest.raises(CompactnnError, match="save_deployed"):
        api.save(fast, tmp_path / "d")
    assert not (tmp_path / "d").exists()


SHIP_IT = r"compactnn\.save\(deployed, path\).*compactnn\.load\(path, model=\.\.\.\)"


def test_pickling_a_deployed_session_names_compactnn_save_and_deepcopy_still_works():
    """An ONNX Runtime model runs a session closure, which pickle cannot store."""
    weight = torch.tensor([[1.0, -2.0]])

    def session(x: torch.Tensor) -> torch.Tensor:  # a local function, like ort_callable's
        return x @ weight.T

    deployed = deploy_api.DeployedModel(session, "onnxruntime", {"fc": "kept"})
    with pytest.raises(CompactnnError, match=SHIP_IT):
        torch.save(deployed, io.BytesIO())
    twin = copy.deepcopy(deployed)
    x = torch.tensor([[3.0, 1.0]])
    assert twin is not deployed and twin.kept_float == {"fc": "kept"}
    assert twin.kept_float is not deployed.kept_float
    assert twin(x).item() == 1.0 == deployed(x).item()
    assert copy.copy(deployed)(x).item() == 1.0


@pytest.mark.parametrize("backend", ["onednn", "onnxruntime"])
def test_torch_save_of_a_deployed_model_names_compactnn_save(backend, qnet):
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    qmodel, calib = qnet
    deployed = compactnn.deploy(qmodel, backend, example=calib[:4])
    with pytest.raises(CompactnnError, match=SHIP_IT):
        torch.save(deployed, io.BytesIO())
    if backend == "onnxruntime":  # copies as before (oneDNN's prepacked weights refuse)
        assert torch.equal(copy.deepcopy(deployed)(calib[:4]), deployed(calib[:4]))


def test_export_onnx_of_an_onnxruntime_deployed_model(qnet, tmp_path):
    from compactnn.export.ort import ort_callable

    qmodel, calib = qnet
    fast = compactnn.deploy(qmodel, "onnxruntime", example=calib[:8])
    fast.export_onnx(tmp_path / "m.onnx")
    run = ort_callable((tmp_path / "m.onnx").read_bytes())
    x = torch.randn(5, 3, 16, 16)
    assert torch.equal(run(x), fast(x))
    with torch.no_grad():
        assert steps(qmodel(x), run(x)) <= 1.0
    (tmp_path / "mine.onnx").write_bytes(b"user's file")
    with pytest.raises(CompactnnError, match="force"):
        fast.export_onnx(tmp_path / "mine.onnx")  # an existing file only with force
    assert (tmp_path / "mine.onnx").read_bytes() == b"user's file"
    fast.export_onnx(tmp_path / "mine.onnx", force=True)
    assert (tmp_path / "mine.onnx").read_bytes() == (tmp_path / "m.onnx").read_bytes()
    onednn = compactnn.deploy(qmodel, "onednn", example=calib[:8])
    with pytest.raises(CompactnnError, match=r"already deployed \(on onednn\).*deployed.source"):
        compactnn.deploy(onednn, "onnxruntime", example=calib[:8])
    with pytest.raises(CompactnnError, match="backend='onnxruntime'"):
        onednn.export_onnx(tmp_path / "n.onnx")
    assert not (tmp_path / "n.onnx").exists()


def test_weight_only_transformer_is_pointed_to_the_low_bit_kernels():
    from compactnn.models.tiny_hf import tiny_model

    model, calib = tiny_model("llama")
    q = compactnn.compress(model, "w4-g32", calib_data=calib, progress=False)
    with pytest.raises(CompactnnError) as info:
        compactnn.deploy(q, example=calib[0])
    message = str(info.value)
    assert "compactnn.to_kernels(q)" in message and "compactnn.to_ort_nbits" in message
    assert "kernels=True" in message and "compactnn eval" in message
    assert "quantizes activations" not in message and len(message) < 500


def tiny_bert():
    """A random 2-layer BERT (hidden 32, vocab 100) and a batch of token ids."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        vocab_size=100, max_position_embeddings=32,
    )  # fmt: skip
    return transformers.BertModel(config).eval(), {"input_ids": torch.randint(0, 100, (4, 8))}


@pytest.mark.filterwarnings("ignore:smoothquant")
@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-smoothquant"])
def test_w8a8_transformer_is_refused_before_tracing_and_pointed_to_the_kernels(recipe, monkeypatch):
    model, batch = tiny_bert()
    q = compactnn.compress(model, recipe, calib_data=[batch], progress=False)

    def never(*args, **kwargs):
        raise AssertionError("deploy traced the transformer")

    monkeypatch.setattr(deploy_api, "_build", never)
    from compactnn.deployment import calling

    monkeypatch.setattr(calling, "call_model", never)  # the outputs' structure: after _build
    for backend in ("auto", "onnxruntime"):
        with pytest.raises(CompactnnError) as info:
            compactnn.deploy(q, backend, example=batch)
        message = str(info.value)
        assert "BertModel" in message and "compactnn.to_kernels" in message
        assert "compactnn eval" in message and len(message) < 500
    # per-token (dynamic) activations run on to_kernels' int8 kernels; static ones do not
    assert ("run on int8 kernels" in message) == (recipe == "w8a8-smoothquant")
    assert ("'w8a8-smoothquant'" in message) == (recipe == "w8a8")


def test_a_weight_only_cnn_lists_a_few_layers_per_reason():
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Linear(16, 16) for _ in range(12)]).eval()
    q = compactnn.compress(net, "w8", calib_data=torch.randn(4, 16), progress=False)
    with pytest.raises(
        CompactnnError, match=r"12 layers: its input is not quantized.*\(0, 1, 2, \.\.\.\)"
    ):
        compactnn.deploy(q, example=torch.randn(4, 16))


@pytest.mark.parametrize("backend", ["onednn", "onnxruntime"])
def test_wrong_input_shapes_name_expected_and_got(backend, qnet):
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    qmodel, calib = qnet  # (N, 3, 16, 16)
    deployed = compactnn.deploy(qmodel, backend, example=calib[:4])
    with pytest.raises(CompactnnError, match=r"shape \(4, 1, 16, 16\).*\(N, 3, 16, 16\)"):
        deployed(torch.randn(4, 1, 16, 16))
    with pytest.raises(CompactnnError, match=r"shape \(64,\).*rank 4"):
        deployed(torch.randn(64))
    other_size = torch.randn(2, 3, 8, 8)
    if backend == "onnxruntime":
        with pytest.raises(CompactnnError, match="only the size it was deployed with"):
            deployed(other_size)
    else:
        assert deployed(other_size).shape == (2, 10)
    assert deployed(calib[:7]).shape == (7, 10)  # any batch size
