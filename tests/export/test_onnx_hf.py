"""ONNX export of compressed transformers: MatMulNBits / QDQ graphs checked in ONNX Runtime."""

from __future__ import annotations

import pytest
import torch

import compactnn
from compactnn.errors import CompactnnError
from compactnn.models.tiny_hf import outputs, tiny_model

pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
onnx_hf = pytest.importorskip("compactnn.export.onnx_hf")


@pytest.fixture(scope="module")
def bert():
    return tiny_model("bert")


def _run(path, batch, kind="qdq"):
    return onnx_hf.ort_runner(path.read_bytes(), kind)(**batch)


def test_weight_only_bert_runs_our_codes_in_matmulnbits(bert, tmp_path):
    model, calib = bert
    q = compactnn.compress(model, "w4-g32", calib_data=calib, progress=False)
    path = onnx_hf.export(q, tmp_path / "m.onnx", example=calib[0])
    graph = onnx.load(str(path)).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    four = [m for m in q.modules() if getattr(m, "weight_spec", None) is not None
            and m.weight_spec.bits == 4 and hasattr(m, "in_features")]  # fmt: skip
    rows = sum(a.i for n in nbits for a in n.attribute if a.name == "N")
    assert len(four) >= 10 and rows >= sum(m.out_features for m in four)
    layer = q.get_submodule("encoder.layer.1.attention.self.key")
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    blobs = [torch.from_numpy(inits[n.input[1]].copy()) for n in nbits]  # query, key, value: one
    codes = layer.weight_codes.to(torch.uint8).reshape(64, 2, 32)  # uint4 codes, (N, K/32, 32)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)  # low nibble first
    assert any(torch.equal(b[i : i + 64], packed) for b in blobs for i in range(0, len(b), 64))
    # another batch (padding, same length) than the one traced: dynamic shapes, same numbers
    sim, got = outputs(q, calib[1]), _run(path, calib[1], "nbits")
    assert onnx_hf.mean_cosine(sim, got) >= 0.99999
    assert (sim - got).abs().max() < 1e-4


@pytest.mark.parametrize(("arch", "recipe"), [("bert", "w8a8"), ("llama", "w8a8-smoothquant")])
def test_w8a8_qdq_stores_int8_codes_and_matches(arch, recipe, bert, tmp_path):
    model, calib = bert if arch == "bert" else tiny_model(arch)
    q = compactnn.compress(model, recipe, calib_data=calib * 4, progress=False)
    path = onnx_hf.export(q, tmp_path, example=calib[0])
    assert path.name == "model.onnx"
    graph = onnx.load(str(path)).graph
    int8 = [
        i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2
    ]
    n_layers = sum(  # BertModel's pooler does not feed last_hidden_state: not in the graph
        1
        for n, m in q.named_modules()
        if getattr(m, "input_quantizer", None) is not None and not n.startswith("pooler")
    )
    assert len(int8) == n_layers  # every weight as its codes, no float copy left
    weights = {f"model.{n}.weight" for n, m in q.named_modules() if hasattr(m, "weight_codes")}
    assert not [i.name for i in graph.initializer if i.name in weights]  # no float copy left
    sim, got = outputs(q, calib[1]), _run(path, calib[1])
    assert onnx_hf.mean_cosine(sim, got) >= 0.9999
    assert (sim - got).abs().max() < 1e-4
    for m in q.modules():  # without its activation grids the model is measurably further
        if getattr(m, "input_quantizer", None) is not None:
            m.input_quantizer.enabled = False
    assert (outputs(q, calib[1]) - got).abs().max() > 3 * (sim - got).abs().max()


def test_refusals(bert, tmp_path):
    model, calib = bert
    assert "Hugging Face" in onnx_hf.can_export(torch.nn.Linear(2, 2))
    q = compactnn.compress(model, "w8", calib_data=calib, progress=False)
    with pytest.raises(CompactnnError, match="example="):
        onnx_hf.export(q, tmp_path / "a.onnx")
    with pytest.raises(CompactnnError, match="min_cosine"):
        onnx_hf.export(q, tmp_path / "b.onnx", example=calib[0], min_cosine=1.5)
    assert not (tmp_path / "b.onnx").exists()
    with pytest.raises(CompactnnError, match="not its to_kernels form"):
        onnx_hf.export(compactnn.to_kernels(q), tmp_path / "c.onnx", example=calib[0])
    layer = q.get_submodule("encoder.layer.0.output.dense")
    layer.set_codebook(torch.linspace(-1, 1, 256).expand(*layer.weight_scale.shape, 256))
    assert "compactnn.save" in onnx_hf.can_export(q)


def test_missing_parent_folders_are_created(bert, tmp_path):
    model, calib = bert
    q = compactnn.compress(model, "w8", calib_data=calib, progress=False)
    path = onnx_hf.export(q, tmp_path / "a" / "b" / "m.onnx", example=calib[0])
    assert path == tmp_path / "a" / "b" / "m.onnx" and path.is_file()


def test_groups_below_16_stay_float_and_say_so(tmp_path):
    """w4-g8: no MatMulNBits / GatherBlockQuantized block fits, so every quantized layer is a
    float MatMul / Gather on its dequantized weight; --list (caveat) and export say it."""
    import warnings

    model, calib = tiny_model("llama")
    good = compactnn.compress(model, "w4-g16", calib_data=calib, progress=False)
    assert onnx_hf.caveat(good) is None and onnx_hf.float_layers(good) == []
    q = compactnn.compress(model, "w4-g8", calib_data=calib, progress=False)
    assert onnx_hf.can_export(q) is None  # exported, exactly, but not compressed
    quantized = [(n, m) for n, m in q.named_modules() if hasattr(m, "weight_codes")]
    assert [n for n, *_ in onnx_hf.float_layers(q)] == [n for n, _ in quantized]
    note = onnx_hf.caveat(q)
    assert f"{len(quantized)} quantized layers" in note and "groups of 8 in rows of 64" in note
    assert "from 16 to 64 (e.g. w4-g32)" in note  # 64: the largest block dividing every row
    with pytest.warns(UserWarning, match=r"left as float32 MatMul/Gather.*of the .* file"):
        path = onnx_hf.export(q, tmp_path / "m.onnx", example=calib[0])
    graph = onnx.load(str(path)).graph
    assert not [n for n in graph.node if n.domain == "com.microsoft"]
    inits = [torch.from_numpy(onnx.numpy_helper.to_array(i).copy()) for i in graph.initializer]
    down = q.get_submodule("model.layers.0.mlp.down_proj").weight.detach()
    assert any(t.shape == down.T.shape and torch.equal(t, down.T) for t in inits)
    float_bytes = 4 * sum(m.weight.numel() for _, m in quantized)
    assert path.stat().st_size > float_bytes  # as big as float: hence the warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        onnx_hf.export(good, tmp_path / "g.onnx", example=calib[0])


def test_classifier_head_gemm_becomes_matmulnbits(tmp_path):
    """A 2-D input (pooler, classifier) exports nn.Linear as Gemm(x, W, b, transB=1): it
    becomes MatMulNBits + Add on our codes too, no float linear weight is left."""
    transformers = pytest.importorskip("transformers")
    from compactnn.models.tiny_hf import _config

    _, calib = tiny_model("bert")
    torch.manual_seed(0)
    config = _config("bert")
    config.num_labels = 3
    model = transformers.BertForSequenceClassification(config).eval()
    q = compactnn.compress(model, "w4-g32", calib_data=calib, progress=False)
    path = onnx_hf.export(q, tmp_path / "m.onnx", example=calib[0])
    graph = onnx.load(str(path)).graph
    inits = {i.name: i for i in graph.initializer}
    linear = [n.name for n in graph.node if n.op_type in ("Gemm", "MatMul")
              and len(n.input) > 1 and n.input[1] in inits]  # fmt: skip
    assert linear == []  # every quantized linear layer runs on its codes
    names = {n.name for n in graph.node if n.op_type == "MatMulNBits"}
    # the 8-bit classifier (the last layer) as two 4-bit halves at level 0 (nbits_split)
    for layer in ("/model/classifier/Gemm_nbits", "/model/bert/pooler/dense/Gemm_nbits"):
        assert any(n.startswith(layer) for n in names)
    head = q.get_submodule("classifier").weight.detach().contiguous().numpy().tobytes()
    assert head[:64] not in path.read_bytes()  # the float head weight is gone
    sim, got = outputs(q, calib[1]), _run(path, calib[1], "nbits")
    assert sim.shape == got.shape == (4, 3)
    torch.testing.assert_close(got, sim, rtol=1e-4, atol=1e-4)


def test_layers_left_float_are_named(bert, monkeypatch):
    model, calib = bert
    q = compactnn.compress(model, "w4-g32", calib_data=calib, progress=False)
    monkeypatch.setattr(onnx_hf, "nbits_onnx", lambda *a, **k: (b"", ["pooler.dense"]))
    with pytest.warns(UserWarning, match=r"1 quantized layer left as float.*pooler\.dense"):
        onnx_hf.to_onnx_bytes(q, calib[0])


@pytest.fixture(scope="module")
def opt_w8a8():
    model, calib = tiny_model("opt")  # OPT ties lm_head to the token table
    return compactnn.compress(model, "w8a8", calib_data=calib * 2, progress=False), calib


def test_w8a8_tied_table_is_stored_once_as_codes(opt_w8a8, tmp_path):
    """W8A8: the quantized token table is GatherBlockQuantized on its codes and the tied head
    dequantizes those very bytes; no float table is left, the output is the simulation's."""
    q, calib = opt_w8a8
    table = q.get_submodule("model.decoder.embed_tokens")
    assert q.lm_head.weight_codes is table.weight_codes
    assert onnx_hf.caveat(q) is None and onnx_hf.float_layers(q) == []
    path = onnx_hf.export(q, tmp_path / "m.onnx", example=calib[0])
    graph = onnx.load(str(path)).graph
    arrays = {
        i.name: torch.from_numpy(onnx.numpy_helper.to_array(i).copy()) for i in graph.initializer
    }
    rows, dim = table.weight.shape
    assert not [n for n, a in arrays.items() if a.is_floating_point() and a.numel() >= rows * dim]
    (gbq,) = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    codes = table.weight_codes.to(torch.int16)  # stored once: uint8 u = q + 128
    wide = {n: a.to(torch.int16) for n, a in arrays.items() if a.shape == codes.shape}
    copies = [n for n, a in wide.items() if torch.equal(a, codes) or torch.equal(a - 128, codes)]
    assert copies == [gbq.input[0]]
    readers = sorted(n.op_type for n in graph.node if gbq.input[0] in n.input)
    assert readers == ["DequantizeLinear", "GatherBlockQuantized"]  # the head reads it too
    sim, got = outputs(q, calib[1]), _run(path, calib[1])
    assert (sim - got).abs().max() < 1e-4


def test_w8a8_table_left_float_is_listed(opt_w8a8, monkeypatch):
    """A W8A8 table that GatherBlockQuantized cannot hold is named by caveat (--list)."""
    q, _ = opt_w8a8
    monkeypatch.setattr(onnx_hf, "gather_format", lambda table: None)
    assert [n for n, *_ in onnx_hf.float_layers(q)] == ["model.decoder.embed_tokens"]
    assert "1 quantized layer (model.decoder.embed_tokens) left as float32" in onnx_hf.caveat(q)
