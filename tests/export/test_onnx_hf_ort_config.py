"""A W8A8 (QDQ) ONNX file says how ONNX Runtime must run it: basic graph optimizations, in
its ``ort_config`` metadata (ONNX Runtime's own key) and in :func:`run_note`."""

from __future__ import annotations

import json

import pytest

import compactnn
from compactnn.models.tiny_hf import tiny_model

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
onnx_hf = pytest.importorskip("compactnn.export.onnx_hf")


@pytest.fixture(scope="module")
def bert():
    return tiny_model("bert")


def test_a_w8a8_file_carries_basic_graph_optimizations(bert, tmp_path, monkeypatch):
    model, calib = bert
    q = compactnn.compress(model, "w8a8", calib_data=calib, progress=False)
    assert "ORT_ENABLE_BASIC" in onnx_hf.run_note(q)
    path = onnx_hf.export(q, tmp_path / "m.onnx", example=calib[0])
    monkeypatch.setenv("ORT_LOAD_CONFIG_FROM_MODEL", "1")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    assert json.loads(meta["ort_config"]) == {"session_options": {"graph_optimization_level": 1}}
    assert meta["compactnn.graph_optimization_level"] == "ORT_ENABLE_BASIC"
    level = sess.get_session_options().graph_optimization_level
    assert level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # ONNX Runtime read it


def test_a_weight_only_file_needs_no_note(bert, tmp_path):
    model, calib = bert
    q = compactnn.compress(model, "w8", calib_data=calib, progress=False)
    assert onnx_hf.run_note(q) is None
    data, kind = onnx_hf.to_onnx_bytes(q, calib[0])
    assert kind == "nbits" and b"ort_config" not in data
