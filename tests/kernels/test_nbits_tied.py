"""A token table tied to its LM head: GatherBlockQuantized gathers from the head's MatMulNBits
codes, stored once, with the same numbers as two copies gave."""

from __future__ import annotations

import warnings

import pytest
import torch

import compactnn
from compactnn.core.qembedding import quantize_embedding_rtn
from compactnn.core.qlayers import quantize_layer_rtn
from compactnn.core.spec import QuantSpec
from compactnn.kernels import nbits_tables, ort_nbits
from compactnn.kernels.ort_nbits import OrtNBitsModel, nbits_onnx

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
warnings.filterwarnings("ignore", message=".*calibration samples")


class _Tied(torch.nn.Module):
    """A lookup and an LM head on the same quantized codes (as a tied model's)."""

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        emb = torch.nn.Embedding(256, 128)
        head = torch.nn.Linear(128, 256, bias=False)
        head.weight = emb.weight
        self.emb = quantize_embedding_rtn(emb, spec)
        self.head = quantize_layer_rtn(head, spec, None)

    def forward(self, input_ids, attention_mask):
        return (self.head(self.emb(input_ids) * attention_mask.unsqueeze(-1)),)


def _graph(data: bytes):
    graph = onnx.load_from_string(data).graph
    arrays = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    return graph, arrays


def _two_copies(monkeypatch, fn):
    """``fn()`` as it was before the tables were shared (each node on its own bytes)."""
    with monkeypatch.context() as m:
        for module in (nbits_tables, ort_nbits):
            m.setattr(module, "share_head_codes", lambda onnx, graph: set())
        return fn()


@pytest.mark.parametrize(
    ("bits", "granularity", "group"), [(4, "group", 16), (4, "group", 128), (8, "channel", None)]
)
def test_the_table_gathers_from_the_head_codes_stored_once(monkeypatch, bits, granularity, group):
    torch.manual_seed(0)
    spec = QuantSpec(bits=bits, symmetric=False, granularity=granularity, group_size=group)
    model = _Tied(spec).eval()
    assert torch.equal(model.emb.weight_codes, model.head.weight_codes)  # one grid
    ids = torch.randint(0, 256, (3, 11))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        ref = model(**batch)[0]
        before, _ = _two_copies(monkeypatch, lambda: nbits_onnx(model, batch, 0, False))
        data, left = nbits_onnx(model, batch, accuracy_level=0, bf16_tables=False)
        old = OrtNBitsModel(before, list(batch), threads=1)(**batch)[0]
        got = OrtNBitsModel(data, list(batch), threads=1)(**batch)[0]
    assert left == []
    assert torch.equal(got, old)  # the same numbers as the two copies, bit for bit
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)  # the simulated model's
    graph, arrays = _graph(data)
    gbqs = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    heads = [n for n in graph.node if n.op_type == "MatMulNBits"]
    # at level 0 8-bit codes run as two 4-bit halves (nbits_split), the table's too
    assert len(gbqs) == len(heads) == (2 if bits == 8 else 1)
    assert [g.input[0] for g in gbqs] == [h.input[1] for h in heads]  # the head's codes
    codes = [arrays[h.input[1]].tobytes() for h in heads]
    assert sum(map(len, codes)) == 256 * 128 * bits // 8
    assert all(data.count(c) == 1 == before.count(c) - 1 for c in codes)
    scales = arrays[heads[0].input[2]].tobytes()  # the halves share them
    assert data.count(scales) == 1 and before.count(scales) >= 2  # (merged halves: 3)
    assert len(before) - len(data) >= sum(map(len, codes))


def test_an_untied_head_keeps_its_own_codes():
    torch.manual_seed(0)
    spec = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=32)
    model = _Tied(spec).eval()
    other = torch.nn.Linear(128, 256, bias=False)
    model.head = quantize_layer_rtn(other, spec, None)
    ids = torch.randint(0, 256, (2, 5))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        data, _ = nbits_onnx(model, batch, accuracy_level=0, bf16_tables=False)
        got = OrtNBitsModel(data, list(batch), threads=1)(**batch)[0]
        torch.testing.assert_close(got, model(**batch)[0], rtol=1e-4, atol=1e-4)
    graph, _ = _graph(data)
    (gbq,) = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    assert gbq.input[0].endswith("_gbq_data")


def _tied_llama():
    tf = pytest.importorskip("transformers")
    from compactnn.models.tiny_hf import tiny_model

    _, calib = tiny_model("llama")
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True,
    )  # fmt: skip
    return tf.AutoModelForCausalLM.from_config(config).eval(), calib


def _tied_gpt2():
    pytest.importorskip("transformers")
    from compactnn.models.tiny_hf import tiny_model

    return tiny_model("gpt2")  # GPT-2 ties lm_head to wte


@pytest.mark.parametrize("build", [_tied_llama, _tied_gpt2], ids=["llama", "gpt2"])
def test_tied_decoders_export_the_table_once(monkeypatch, tmp_path, build):
    onnx_hf = pytest.importorskip("compactnn.export.onnx_hf")
    from compactnn.models.tiny_hf import outputs

    model, calib = build()
    q = compactnn.compress(model, "w4-g32", calib_data=calib, progress=False)
    table = q.get_input_embeddings()
    assert q.lm_head.weight_codes.data_ptr() == table.weight_codes.data_ptr()  # tied
    before = _two_copies(monkeypatch, lambda: onnx_hf.to_onnx_bytes(q, calib[0])[0])
    path = onnx_hf.export(q, tmp_path / "m.onnx", example=calib[0])
    data = path.read_bytes()
    graph, arrays = _graph(data)
    rows = table.weight.shape[0]
    gbq = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    heads = {n.input[1] for n in graph.node if n.op_type == "MatMulNBits"}
    # the token table on the head's codes: its two 4-bit halves (an 8-bit head at level 0)
    shared = [n for n in gbq if n.input[0] in heads]
    assert len(shared) == 2
    codes = [arrays[n.input[0]] for n in shared]
    assert all(c.shape[0] == rows and data.count(c.tobytes()) == 1 for c in codes)
    assert all(before.count(c.tobytes()) == 2 for c in codes)
    stored = sum(a.nbytes for a in _graph(before)[1].values()) - sum(
        a.nbytes for a in arrays.values()
    )
    assert stored >= sum(c.nbytes for c in codes)  # one table less (a few nodes more)
    sim = outputs(q, calib[1])
    got = onnx_hf.ort_runner(data, "nbits")(**calib[1])
    old = onnx_hf.ort_runner(before, "nbits")(**calib[1])
    assert torch.equal(torch.as_tensor(got), torch.as_tensor(old))
    assert (sim - torch.as_tensor(got)).abs().max() < 1e-4
