"""A Hugging Face folder whose model is code compactnn does not run (``auto_map``, or an
``architectures`` class transformers lacks) is refused, never compressed as a stock class:
the folder check (``remote_code_refusal``), the streamed skeleton (``build_skeleton``) and
``compactnn.load`` of an artifact made from such a folder before it was refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from compactnn.errors import ArtifactError, CompactnnError
from compactnn.export.hf import remote_code_refusal, skeleton_from_header
from compactnn.hf_folder_errors import unknown_model_type
from compactnn.streaming.shards import build_skeleton

transformers = pytest.importorskip("transformers")

EVIL = "open('PWNED', 'w').write('ran')\nclass EvilForCausalLM: pass\n"


def _llama(tmp_path: Path, **config_fields) -> Path:
    """A tiny stock Llama folder, its config.json edited with ``config_fields``, beside a
    modeling_evil.py that would write PWNED if it ever ran."""
    config = transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
    )  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path / "llama"
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**saved, **config_fields}))
    (folder / "modeling_evil.py").write_text(EVIL)
    return folder


AUTO_MAP = {
    "AutoConfig": "modeling_evil.EvilConfig",
    "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
}


def _message(refusal: CompactnnError | None) -> str:
    assert refusal is not None
    message = str(refusal)
    assert "\n" not in message
    return message


def test_a_folder_with_its_own_model_code_is_refused_naming_the_way_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = _llama(tmp_path, architectures=["EvilForCausalLM"], auto_map=AUTO_MAP)
    message = _message(remote_code_refusal(folder))
    assert f"{str(folder / 'config.json')!r} names the architecture 'EvilForCausalLM'" in message
    assert "its code is in the folder (modeling_evil.py)" in message
    assert "compactnn never runs code from a model folder" in message
    assert "AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)" in message
    assert "compactnn.compress(model, ...)" in message
    assert "model_type" not in message  # no invitation to relabel it as another model
    with pytest.raises(CompactnnError, match="names the architecture 'EvilForCausalLM'"):
        build_skeleton(folder)  # streamed (--max-memory): was compressed as a LlamaModel
    assert not (tmp_path / "PWNED").exists()


def test_an_auto_map_beside_a_stock_class_is_refused_unless_removed(tmp_path):
    folder = _llama(tmp_path, auto_map=AUTO_MAP)  # architectures: LlamaForCausalLM
    message = _message(remote_code_refusal(folder))
    assert "has an auto_map: the folder ships its own model code (modeling_evil.py)" in message
    assert "may differ from transformers' LlamaForCausalLM" in message
    assert "delete auto_map from config.json" in message
    with pytest.raises(CompactnnError, match="has an auto_map"):
        build_skeleton(folder)
    config = json.loads((folder / "config.json").read_text())
    del config["auto_map"]
    (folder / "config.json").write_text(json.dumps(config))
    assert remote_code_refusal(folder) is None
    assert type(build_skeleton(folder)).__name__ == "LlamaForCausalLM"


def test_a_class_transformers_lacks_is_refused_not_substituted(tmp_path):
    folder = _llama(tmp_path, architectures=["MyLlamaForCausalLM"])  # no auto_map
    message = _message(remote_code_refusal(folder))
    assert "names the architecture 'MyLlamaForCausalLM', which transformers" in message
    assert "load it yourself in Python with its own class" in message
    with pytest.raises(CompactnnError, match="MyLlamaForCausalLM"):
        build_skeleton(folder)  # was built as transformers' LlamaForCausalLM


def test_an_unknown_model_type_is_left_to_its_own_message_which_suggests_no_relabel(tmp_path):
    folder = _llama(tmp_path, architectures=["FrobForCausalLM"], model_type="frob")
    assert remote_code_refusal(folder) is None  # no auto_map: model_type's message says it
    message = unknown_model_type(transformers, folder)
    assert "model_type 'frob'" in message and "upgrade transformers" in message
    assert "set model_type" not in message
    assert "compactnn.compress(model, ...)" in message
    remote = _llama(tmp_path / "r", architectures=["EvilForCausalLM"], model_type="evil")
    (remote / "config.json").write_text(
        json.dumps({**json.loads((remote / "config.json").read_text()), "auto_map": AUTO_MAP})
    )
    assert "its code is in the folder" in _message(remote_code_refusal(remote))


def test_artifact_header_of_a_remote_code_model_compressed_as_stock_is_refused(tmp_path):
    config = transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1,
    ).to_dict()  # fmt: skip
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 4096)
    header = {"extra": {"hf": {"class": "LlamaForCausalLM", "config": config}}}
    assert type(skeleton_from_header(tmp_path, header)).__name__ == "LlamaForCausalLM"
    config |= {"architectures": ["EvilForCausalLM"], "auto_map": AUTO_MAP}
    with pytest.raises(ArtifactError) as exc:
        skeleton_from_header(tmp_path, header)
    message = str(exc.value)
    assert "whose model is 'EvilForCausalLM', code in that folder (auto_map)" in message
    assert "compressed as transformers' LlamaForCausalLM, another network" in message
    config["architectures"] = ["LlamaForCausalLM"]  # a stock model saved with an auto_map
    assert type(skeleton_from_header(tmp_path, header)).__name__ == "LlamaForCausalLM"


def test_an_auto_map_for_the_tokenizer_only_is_no_model_code(tmp_path):
    """A stock model whose folder ships a custom tokenizer: compactnn loads no tokenizer to
    compress, so nothing is substituted and nothing is refused."""
    tokenizer_only = {"AutoTokenizer": ["tokenization_my.MyTokenizer", None]}
    folder = _llama(tmp_path, auto_map=tokenizer_only)
    assert remote_code_refusal(folder) is None
    assert type(build_skeleton(folder)).__name__ == "LlamaForCausalLM"
    both = {**tokenizer_only, "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(
        json.dumps({**json.loads((folder / "config.json").read_text()), "auto_map": both})
    )
    assert "modeling_evil.py" in _message(remote_code_refusal(folder))
