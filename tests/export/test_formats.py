"""The export format table: names, lazy modules, option checks, and the gguf entry."""

import pytest
import torch

import compactnn
from compactnn.errors import CompactnnError
from compactnn.export import formats
from compactnn.models.tiny_hf import tiny_model

torch.set_num_threads(1)


def test_table_lists_the_three_formats():
    assert formats.NAMES == ("gguf", "compressed-tensors", "onnx")
    assert formats.get_format("gguf").module == "compactnn.export.gguf"
    with pytest.raises(CompactnnError, match="gguf, compressed-tensors, onnx"):
        formats.get_format("tflite")


def test_missing_format_module_is_a_reason_not_a_crash(monkeypatch):
    fake = formats.ExportFormat("nothing", "compactnn.export.not_there", "absent")
    monkeypatch.setattr(formats, "FORMATS", (*formats.FORMATS, fake))
    reason = formats.can_export("nothing", torch.nn.Linear(2, 2))
    assert "not available" in reason and "not_there" in reason
    with pytest.raises(CompactnnError, match="not available"):
        formats.export("nothing", torch.nn.Linear(2, 2), "x")


def test_gguf_entry_and_option_checks(tmp_path):
    model, calib = tiny_model("llama")
    qmodel = compactnn.compress(model, "w8", calib_data=calib, progress=False)
    assert formats.can_export("gguf", qmodel) is None
    assert "Llama" in formats.can_export("gguf", torch.nn.Linear(2, 2))
    with pytest.raises(CompactnnError, match="does not take color"):
        formats.export("gguf", qmodel, tmp_path / "m.gguf", color="red")
    out = formats.export("gguf", qmodel, tmp_path / "m.gguf", requantize=False, tokenizer=None)
    assert out == tmp_path / "m.gguf" and out.stat().st_size > 0
    assert formats.capabilities(qmodel)["gguf"] is None
