"""A bfloat16/float16 Hugging Face checkpoint: what the command line says about it (computed
in float32; sizes compared with the checkpoint as stored too), read from the weight files'
headers only."""

from __future__ import annotations

import json

import pytest
import torch

from compactnn.commands.hf_checkpoint import (
    checkpoint_comparison,
    float_row_note,
    stored_half,
    upcast_note,
)

transformers = pytest.importorskip("transformers")


def _llama(tmp_path, dtype, name="llama", **save):
    config = transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(dtype).save_pretrained(tmp_path / name, **save)
    return tmp_path / name


def test_a_bfloat16_folder_is_named_with_its_bytes_as_stored(tmp_path):
    folder = _llama(tmp_path, torch.bfloat16)
    stored = (folder / "model.safetensors").stat().st_size
    assert stored_half(str(folder)) == ("bfloat16", stored)
    note = upcast_note(str(folder))
    assert note.startswith(f"note: {folder} stores its weights in bfloat16 (")
    assert "computes in float32" in note and "\n" not in note
    size = stored // 3
    assert checkpoint_comparison(size, str(folder)) == (
        f"; bfloat16 checkpoint {stored / 1024:.1f} KiB ({stored:,} B), "
        f"{stored / size:.2f}x smaller"
    )
    row = float_row_note(str(folder), 2 * stored, size)
    assert f"the bfloat16 checkpoint it was loaded from, {folder}, is" in row
    assert row.endswith(
        f"({stored:,} B): the compressed model is {stored / size:.2f}x smaller than it"
    )
    assert "larger" in checkpoint_comparison(2 * stored, str(folder))


def test_sharded_float16_counts_every_shard_and_float32_says_nothing(tmp_path):
    folder = _llama(tmp_path, torch.float16, max_shard_size="4KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    total = sum((folder / s).stat().st_size for s in shards)
    assert stored_half(str(folder)) == ("float16", total)
    plain = _llama(tmp_path, torch.float32, name="fp32")
    assert stored_half(str(plain)) is None and upcast_note(str(plain)) is None
    assert checkpoint_comparison(100, str(plain)) == ""
    assert float_row_note(str(plain), 100, 50) is None
    assert stored_half("minilm") is None and float_row_note(None, 100) is None
