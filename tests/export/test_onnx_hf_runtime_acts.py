"""ONNX export of transformers whose activation grids have a run-time range (a8g, a8d)."""

from __future__ import annotations

import warnings

import pytest

import compactnn
from compactnn.models.tiny_hf import outputs, tiny_model

pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
onnx_hf = pytest.importorskip("compactnn.export.onnx_hf")
formats = pytest.importorskip("compactnn.export.formats")


@pytest.fixture(scope="module")
def tied_llama():
    """A tiny Llama whose LM head is its token table (tie_word_embeddings)."""
    model, calib = tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    return model, calib


def _export(q, path, example):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = onnx_hf.export(q, path, example=example)
    return out, [str(w.message) for w in caught]


def test_a8g_tied_head_exports_as_nbits_and_matches(tied_llama, tmp_path):
    model, calib = tied_llama
    q = compactnn.compress(model, "w4a8g-g32", calib_data=calib, progress=False)
    # the tied head is 8-bit per channel under a per-group-32 input grid
    assert q.lm_head.weight_spec.granularity == "channel"
    assert onnx_hf.form(q) == "nbits"
    caps = formats.capabilities(q)
    assert caps["onnx"] is None
    assert "--format onnx" in caps["compressed-tensors"]  # the two lines agree
    path, _ = _export(q, tmp_path / "m.onnx", calib[0])
    graph = onnx.load(str(path)).graph
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) >= 4
    sim, got = outputs(q, calib[1]), onnx_hf.ort_runner(path.read_bytes(), "nbits")(**calib[1])
    assert onnx_hf.mean_cosine(sim, got) >= 0.99999
    assert (sim - got).abs().max() < 0.02  # MatMulNBits' int8 activations at level 4


def test_a8d_exports_on_dynamic_quantize_matmul(tied_llama, tmp_path):
    model, calib = tied_llama
    q = compactnn.compress(model, "w8a8d", calib_data=calib, progress=False)
    assert onnx_hf.can_export(q) is None
    path, _ = _export(q, tmp_path, calib[0])
    graph = onnx.load(str(path)).graph
    assert sum(n.op_type == "DynamicQuantizeMatMul" for n in graph.node) >= 4
    sim, got = outputs(q, calib[1]), onnx_hf.ort_runner(path.read_bytes(), "nbits")(**calib[1])
    assert (sim - got).abs().max() < 1e-5


def test_layers_no_runtime_kernel_takes_are_traced_as_simulated_and_named(tied_llama, tmp_path):
    """4-bit run-time activations fit neither MatMulNBits nor DynamicQuantizeMatMul: those
    layers used to make the model "mix grids" and --format onnx refuse it; now they run as
    traced (their activation rounding in float ops) and the warning names them, once."""
    model, calib = tied_llama
    q = compactnn.compress(model, "w4a4g-g32", calib_data=calib, progress=False)
    assert onnx_hf.form(q) == "nbits"
    assert formats.can_export("onnx", q) is None
    assert "4-bit activations (the run-time kernels quantize inputs to 8 bits)" in onnx_hf.caveat(q)
    path, said = _export(q, tmp_path / "m.onnx", calib[0])
    assert len(said) == 1 and "model.layers.0.self_attn.k_proj" in said[0], said
    sim, got = outputs(q, calib[1]), onnx_hf.ort_runner(path.read_bytes(), "nbits")(**calib[1])
    assert (sim - got).abs().max() < 1e-5
    for m in q.modules():  # without its activation grids the model is measurably further
        if getattr(m, "input_quantizer", None) is not None:
            m.input_quantizer.enabled = False
    assert (outputs(q, calib[1]) - got).abs().max() > 1e-3
