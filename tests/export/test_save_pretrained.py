"""save_pretrained on a compressed model: the compressed-tensors folder, or a clear refusal."""

from __future__ import annotations

import copy

import pytest
import torch

import compactnn
from compactnn.errors import CompactnnError
from compactnn.models.tiny_hf import outputs, tiny_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")
ctensors = pytest.importorskip("compactnn.export.ctensors")


@pytest.fixture(scope="module")
def llama_w8():
    model, calib = tiny_model("llama")
    q = compactnn.compress(model, "w8", calib_data=calib, progress=False)
    return model, ctensors.install_save_pretrained(q), calib


def test_save_pretrained_writes_the_compressed_model(llama_w8, tmp_path):
    model, q, calib = llama_w8
    q.save_pretrained(tmp_path / "m", safe_serialization=True)
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(outputs(loaded, calib[0]), outputs(q, calib[0]))
    # int8 codes: about a quarter of the float32 weights (the float tables/norms stay)
    floats = sum(p.numel() * 4 for p in model.parameters())
    assert (tmp_path / "m" / "model.safetensors").stat().st_size < 0.4 * floats


def test_a_copy_saves_itself_and_the_float_class_is_untouched(llama_w8, tmp_path):
    model, q, calib = llama_w8
    twin = copy.deepcopy(q)
    assert twin.save_pretrained.__self__ is twin
    twin.get_submodule("model.layers.0.mlp.down_proj").weight_scale.mul_(2)
    twin.get_submodule("model.layers.0.mlp.down_proj").refresh_weight()
    twin.save_pretrained(tmp_path / "twin")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "twin").eval()
    assert torch.equal(outputs(loaded, calib[0]), outputs(twin, calib[0]))
    assert not torch.equal(outputs(loaded, calib[0]), outputs(q, calib[0]))
    assert "save_pretrained" not in vars(model)  # the float model keeps transformers' own


def test_unexportable_model_refuses_and_writes_nothing(llama_w8, tmp_path):
    _, q, _ = llama_w8
    bad = copy.deepcopy(q)
    layer = bad.get_submodule("model.layers.1.self_attn.q_proj")
    layer.set_codebook(torch.linspace(-1, 1, 256).expand(*layer.weight_scale.shape, 256))
    with pytest.raises(CompactnnError, match=r"compactnn\.save\(model"):
        bad.save_pretrained(tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(CompactnnError, match="push_to_hub"):
        q.save_pretrained(tmp_path / "hub", push_to_hub=True)
    with pytest.raises(CompactnnError, match="variant"):
        q.save_pretrained(tmp_path / "v", variant="fp16")


def test_non_hf_models_are_left_alone():
    lin = torch.nn.Linear(2, 2)
    assert ctensors.install_save_pretrained(lin) is lin
    assert "save_pretrained" not in vars(lin)


def test_save_pretrained_writes_beside_a_tokenizer_but_not_over_a_float_model(llama_w8, tmp_path):
    model, q, _ = llama_w8
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("{}")  # transformers' usual: tokenizer saved first
    q.save_pretrained(folder)
    assert (folder / "tokenizer.json").read_text() == "{}"
    q.save_pretrained(folder)  # again, as transformers allows
    model.save_pretrained(tmp_path / "float", max_shard_size="100KB")
    before = sorted(p.name for p in (tmp_path / "float").iterdir())
    with pytest.raises(CompactnnError, match="holds another model"):
        q.save_pretrained(tmp_path / "float")
    assert sorted(p.name for p in (tmp_path / "float").iterdir()) == before
