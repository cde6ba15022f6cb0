"""One-line messages when a Hugging Face folder, or the data given to its model, is not what
compactnn expects: no config.json, a model_type transformers does not know, a tensor the
model does not take."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from compactnn.errors import CompactnnError
from compactnn.model_io import LoadedModel, resolve_data, resolve_model

transformers = pytest.importorskip("transformers")


def _tiny_bert(tmp_path):
    """A random-weight two-layer BERT classifier saved with save_pretrained."""
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path / "bert")
    return tmp_path / "bert", model


def _one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def test_a_folder_of_weights_without_config_json_says_what_it_lacks(tmp_path):
    folder, _ = _tiny_bert(tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(CompactnnError) as exc:
        resolve_model(str(folder))
    message = _one_line(exc)
    assert (
        f"model folder {str(folder)!r} has no config.json (it holds model.safetensors)" in message
    )
    assert f"package.module:factory with --weights {folder / 'model.safetensors'}" in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(CompactnnError, match=r"has no config\.json: .*--weights FILE\."):
        resolve_model(str(tmp_path / "empty"))
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "compactnn.json").write_text("{}")
    with pytest.raises(CompactnnError, match=r"'.*art' is a compactnn artifact, not a float"):
        resolve_model(str(tmp_path / "art"))


@pytest.mark.parametrize("what", ["noconfig", "model_type", "pixels"])
def test_the_command_line_prints_one_error_line_and_no_traceback(tmp_path, capsys, what):
    from compactnn.cli import main

    folder, _ = _tiny_bert(tmp_path)
    args = ["compress", str(folder), "-r", "w8", "--out", str(tmp_path / "out")]
    if what == "noconfig":
        (folder / "config.json").unlink()
    elif what == "model_type":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "frobnicator"}))
    else:
        save_file({"pixel_values": torch.randn(4, 3, 8, 8)}, tmp_path / "px.safetensors")
        args += ["--data", str(tmp_path / "px.safetensors")]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err  # after transformers' progress bar (carriage returns)
    lines = [line for line in err.strip().splitlines() if not line.startswith("Loading weights")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    err = lines[0]
    needle = {"noconfig": "has no config.json", "model_type": "'frobnicator'"}
    assert needle.get(what, "holds one tensor, 'pixel_values'") in err
    assert not (tmp_path / "out").exists()


def test_a_model_type_transformers_does_not_know_names_it_and_the_version(tmp_path):
    folder, _ = _tiny_bert(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="frobnicator", architectures=["FrobnicatorModel"])
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CompactnnError) as exc:
        resolve_model(str(folder))
    message = _one_line(exc)
    assert "model_type 'frobnicator'" in message
    assert f"transformers {transformers.__version__} does not know" in message
    assert "pip install git+" not in message


def test_a_tensor_the_model_does_not_take_is_named_with_the_models_input(tmp_path):
    folder, model = _tiny_bert(tmp_path)
    loaded = LoadedModel(model, str(folder))
    save_file({"pixel_values": torch.randn(4, 3, 8, 8)}, tmp_path / "pixels.safetensors")
    with pytest.raises(CompactnnError) as exc:
        resolve_data(str(tmp_path / "pixels.safetensors"), loaded)
    message = _one_line(exc)
    assert "holds one tensor, 'pixel_values' (float32, shape (4, 3, 8, 8))" in message
    assert "BertForSequenceClassification takes no 'pixel_values'" in message
    assert "its input is input_ids (integer token ids" in message
    np.save(tmp_path / "pixels.npy", np.zeros((4, 3, 8, 8), np.float32))  # unnamed: an array
    with pytest.raises(
        CompactnnError, match=r"holds an array \(float32, shape \(4, 3, 8, 8\)\), and Bert"
    ):
        resolve_data(str(tmp_path / "pixels.npy"), loaded)
    ids = torch.randint(0, 64, (4, 8))  # integer ids under another name still become input_ids
    save_file({"tokens": ids}, tmp_path / "tokens.safetensors")
    data = resolve_data(str(tmp_path / "tokens.safetensors"), loaded)
    assert data.keys() == {"input_ids"} and torch.equal(data["input_ids"], ids)


def test_token_ids_given_to_an_image_model_name_its_pixel_input(tmp_path):
    config = transformers.ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        image_size=8, patch_size=4, num_labels=2,
    )  # fmt: skip
    vit = transformers.ViTForImageClassification(config).eval()
    save_file({"input_ids": torch.randint(0, 64, (4, 8))}, tmp_path / "ids.safetensors")
    with pytest.raises(CompactnnError, match=r"its input is pixel_values \(floating-point values"):
        resolve_data(str(tmp_path / "ids.safetensors"), LoadedModel(vit, "vit"))
