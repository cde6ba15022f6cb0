"""The ONNX export of a transformer is verified on a probe batch of seeded sequences too, and
states what it measured (max difference, activation codes that differ) in the file: on 16
seeded tokens only it reported nothing but a cosine, while longer inputs put W8A8 logits
0.034 apart (ONNX Runtime's float order tips activations lying at half a grid step)."""

import warnings

import pytest
import torch

import compactnn
from compactnn.core.dynact import DynamicActQuantizer
from compactnn.core.spec import QuantSpec
from compactnn.export import onnx_hf
from compactnn.export.onnx_hf_verify import (
    Verification,
    _codes,
    probe_batch,
    read_line,
)
from compactnn.models.tiny_hf import tiny_model

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def llama_w8a8():
    model, calib = tiny_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = compactnn.compress(model, "w8a8-smoothquant", calib_data=calib, progress=False)
    return q.eval()


def test_the_file_states_what_the_probe_batch_measured(llama_w8a8, tmp_path):
    q = llama_w8a8
    ids = torch.randint(0, q.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    path = onnx_hf.export(q, tmp_path / "m.onnx", example=example)
    line = read_line(path)
    probe = probe_batch(q, example)
    n, length = probe["input_ids"].shape
    assert n == 4 and length == min(128, q.config.max_position_embeddings)
    assert f"on {n * length} tokens ({n} seeded sequences of {length} token ids)" in line
    # the stated max difference is the file's own on the probe batch, measured apart here
    with torch.no_grad():
        sim = q(**probe).logits
    got = onnx_hf.ort_runner(path.read_bytes(), "qdq")(**probe)
    assert f"max |diff| {float((got - sim).abs().max()):.2g} " in line
    assert "of activation codes differ, by at most" in line


def test_codes_are_the_simulated_grid():
    torch.manual_seed(0)
    aq = DynamicActQuantizer(QuantSpec(bits=8, symmetric=False))
    x = torch.randn(3, 5, 64)
    qt = aq.qtype
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    scale = ((x.amax(-1, keepdim=True).clamp(min=0) - lo) / (qt.qmax - qt.qmin)).clamp(min=1e-8)
    zero = torch.round(qt.qmin - lo / scale)
    assert torch.equal((_codes(aq, x) - zero) * scale, aq(x))


def test_a_low_cosine_on_the_probe_batch_refuses_by_name(llama_w8a8, tmp_path, monkeypatch):
    low = Verification(0.9, 1.0, 2.0, 512, "4 seeded sequences of 128 token ids")
    monkeypatch.setattr(onnx_hf, "verify", lambda *a: [low])
    ids = torch.zeros(1, 16, dtype=torch.long)
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with pytest.raises(compactnn.CompactnnError, match="on 4 seeded sequences of 128 token ids"):
        onnx_hf.export(llama_w8a8, tmp_path / "m.onnx", example=example)
    assert not (tmp_path / "m.onnx").exists()
