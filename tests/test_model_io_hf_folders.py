"""A Hugging Face folder that cannot be loaded says why in one self-contained line: pickled
weights beside an unrelated .safetensors file, weights whose shapes do not match config.json."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from compactnn.errors import CompactnnError
from compactnn.hf_folder_errors import mismatch_message, mismatched_shapes
from compactnn.model_io import resolve_model


def _tiny_bert(folder):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=32,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=8,
    )
    model = transformers.BertModel(config)
    model.save_pretrained(folder)
    return model


def test_pickled_weights_beside_a_decoy_safetensors_name_the_pickle(tmp_path):
    folder = tmp_path / "both"
    model = _tiny_bert(folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    save_file({"x": torch.zeros(3)}, str(folder / "decoy.safetensors"))
    with pytest.raises(CompactnnError) as err:
        resolve_model(str(folder))
    message = str(err.value)
    assert message.startswith(
        f"refusing to load {str(folder)!r}: its weights are pytorch_model.bin, a pickle"
    )
    assert "(decoy.safetensors is not model.safetensors" in message
    assert "--trust-pickle" in message and "\n" not in message
    loaded = resolve_model(str(folder), trust_pickle=True)  # trusted: the pickle's weights
    assert torch.equal(
        loaded.model.embeddings.word_embeddings.weight, model.embeddings.word_embeddings.weight
    )


def test_a_lone_decoy_safetensors_is_not_weights(tmp_path):
    folder = tmp_path / "hf"
    _tiny_bert(folder)
    (folder / "model.safetensors").rename(folder / "other.safetensors")
    with pytest.raises(CompactnnError) as err:
        resolve_model(str(folder), trust_pickle=True)
    message = str(err.value)
    assert message.startswith(f"{str(folder)!r} has no weights: ")
    assert "(other.safetensors is not model.safetensors" in message


def test_weights_that_do_not_match_config_json_name_the_tensors(tmp_path):
    folder = tmp_path / "huge"
    _tiny_bert(folder)
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = 2_000_000_000  # 32 rows in the weights
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CompactnnError) as err:
        resolve_model(str(folder))
    message = str(err.value)
    assert message.startswith(f"the weights in {str(folder)!r} do not match its config.json: ")
    assert (
        "embeddings.word_embeddings.weight is [32, 8] in the weights, [2000000000, 8] by "
        "config.json" in message
    )
    assert "vocab_size" in message and "above report" not in message and "\n" not in message


def test_transformers_4_size_mismatch_lines_are_read_too():
    exc = RuntimeError(
        "Error(s) in loading state_dict for BertModel:\n\tsize mismatch for "
        "embeddings.word_embeddings.weight: copying a param with shape torch.Size([32, 8]) "
        "from checkpoint, the shape in current model is torch.Size([64, 8]).\n\tYou may "
        "consider adding `ignore_mismatched_sizes=True`"
    )
    assert mismatched_shapes(exc) == [("embeddings.word_embeddings.weight", "[32, 8]", "[64, 8]")]
    assert "weight is [32, 8] in the weights, [64, 8] by config.json" in mismatch_message(exc, "m")
    assert mismatch_message(ValueError("no file named config.json"), "m") is None
