"""The folder a compressed-tensors export writes: refusals before any work, atomic files."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from compactnn.errors import CompactnnError
from compactnn.export.ct_folder import WEIGHTS_NAME, _check_other_model, _write_folder, check_out


def _earlier_export(folder):
    folder.mkdir()
    qconfig = {"quant_method": "compressed-tensors"}
    (folder / "config.json").write_text(json.dumps({"quantization_config": qconfig}))
    (folder / WEIGHTS_NAME).write_bytes(b"")
    (folder / "tokenizer.json").write_text("{}")


def test_check_out_takes_new_empty_or_forced_earlier_exports_only(tmp_path):
    assert check_out(tmp_path / "new") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    assert check_out(tmp_path / "empty") == tmp_path / "empty"
    _earlier_export(tmp_path / "old")
    with pytest.raises(CompactnnError, match="holds a compressed-tensors export; pass"):
        check_out(tmp_path / "old", what="--out")
    assert check_out(tmp_path / "old", force=True) == tmp_path / "old"
    (tmp_path / "old" / "notes.txt").write_text("mine")  # a file an export never writes
    with pytest.raises(CompactnnError, match=r"not a compressed-tensors export \(notes.txt\)"):
        check_out(tmp_path / "old", force=True)
    (tmp_path / "f").write_text("x")
    with pytest.raises(CompactnnError, match="is a file"):
        check_out(tmp_path / "f")


def test_save_pretrained_folder_refuses_another_models_files(tmp_path):
    _check_other_model(tmp_path / "new")  # nothing there: fine
    _earlier_export(tmp_path / "ct")
    _check_other_model(tmp_path / "ct")  # an earlier export is written over
    (tmp_path / "float").mkdir()
    (tmp_path / "float" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CompactnnError, match=r"holds another model \(pytorch_model.bin\)"):
        _check_other_model(tmp_path / "float")


class _Config:
    def to_dict(self) -> dict:
        return {"model_type": "toy", "auto_map": {"x": "y"}, "_name_or_path": "/home/me"}


def test_write_folder_writes_weights_and_config_without_local_keys(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    model = nn.Linear(2, 2)
    model.config = _Config()
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    _write_folder(model, state, {"quant_method": "compressed-tensors"}, tmp_path / "out", None)
    back = safetensors.load_file(tmp_path / "out" / WEIGHTS_NAME)
    assert torch.equal(back["w"], state["w"])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config == {
        "model_type": "toy",
        "architectures": ["Linear"],
        "quantization_config": {"quant_method": "compressed-tensors"},
    }
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", WEIGHTS_NAME]
