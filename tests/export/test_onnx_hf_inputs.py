"""ONNX export of a Hugging Face model refuses the example to_ort_nbits refuses, in its words."""

from __future__ import annotations

import pytest
import torch

import compactnn
from compactnn.errors import CompactnnError
from compactnn.models.tiny_hf import tiny_model

pytest.importorskip("transformers")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
onnx_hf = pytest.importorskip("compactnn.export.onnx_hf")


@pytest.fixture(scope="module")
def llama_w8():
    model, calib = tiny_model("llama")
    return compactnn.compress(model, "w8", calib_data=calib, progress=False), calib[0]


def test_float_token_ids_are_refused_by_name_not_by_torch(llama_w8, tmp_path):
    q, batch = llama_w8
    example = {**batch, "input_ids": batch["input_ids"].float()}
    with pytest.raises(CompactnnError) as info:
        onnx_hf.export(q, tmp_path / "m.onnx", example=example)
    assert str(info.value).startswith("ONNX export: example: input_ids holds float32 values")
    assert "ids.long()" in str(info.value) and "\n" not in str(info.value)
    assert not list(tmp_path.iterdir())


def test_labels_the_graph_drops_are_refused_as_to_ort_nbits_does(llama_w8, tmp_path):
    q, batch = llama_w8
    example = {**batch, "labels": batch["input_ids"]}
    with pytest.raises(CompactnnError) as ours:
        onnx_hf.export(q, tmp_path / "m.onnx", example=example)
    with pytest.raises(CompactnnError) as nbits:
        compactnn.to_ort_nbits(q, example=example)
    assert str(ours.value) == str(nbits.value).replace("to_ort_nbits:", "ONNX export:")
    assert "'labels' is not used by the traced output" in str(ours.value)
    assert "takes input_ids, attention_mask" in str(ours.value)
    assert not list(tmp_path.iterdir())  # nothing written
    # int32 ids and a float mask still export (cast exactly, as to_ort_nbits takes them)
    cast = {"input_ids": batch["input_ids"].int(), "attention_mask": batch["attention_mask"]}
    assert onnx_hf.export(q, tmp_path / "ok.onnx", example=cast).stat().st_size > 0


def test_a_key_forward_does_not_take_is_refused_before_the_trace(tmp_path):
    model, calib = tiny_model("bert")
    q = compactnn.compress(model, "w8", calib_data=calib[:1], progress=False)
    example = {**calib[0], "pixel_values": torch.zeros(4, 3)}
    with pytest.raises(CompactnnError, match=r"^ONNX export: example key 'pixel_values' is not"):
        onnx_hf.export(q, tmp_path / "m.onnx", example=example)
