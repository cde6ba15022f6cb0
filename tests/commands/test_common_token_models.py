"""Without data, a model that reads token ids is pointed at token-id files and magnitude
pruning, never at ``--data data-free`` (images from batch-norm statistics)."""

from __future__ import annotations

import argparse
import json

import pytest
from torch import nn

import compactnn
from compactnn.commands._common import check_data_given, folder_takes_token_ids
from compactnn.commands.compress import data_free
from compactnn.errors import CompactnnError
from compactnn.model_io import LoadedModel


def _folder(tmp_path, **config):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_a_language_model_folder_is_pointed_at_token_ids(tmp_path):
    lm = _folder(tmp_path, model_type="llama", vocab_size=256)
    assert folder_takes_token_ids(lm)
    with pytest.raises(CompactnnError) as info:
        check_data_given(compactnn.resolve_recipe("sp50-sparsegpt"), None, lm)
    message = str(info.value)
    assert "a .safetensors file of input_ids, and attention_mask when padded" in message
    assert "prune without data: sp50 (magnitude pruning" in message
    assert "batch-norm statistics" not in message and "generates images, not token ids" in message


def test_an_image_model_keeps_the_data_free_suggestion(tmp_path):
    assert not folder_takes_token_ids(_folder(tmp_path, model_type="resnet"))
    with pytest.raises(CompactnnError, match=r"or --data data-free \(for an image model"):
        check_data_given(compactnn.resolve_recipe("sp50-wanda"), None, "pkg.mod:make")


def test_data_free_for_a_token_model_says_what_to_pass_instead():
    lm = nn.Sequential(nn.Embedding(10, 4), nn.BatchNorm1d(4), nn.Linear(4, 10))
    args = argparse.Namespace(input_shape="1,8,8", data_free_images=4, seed=0, no_progress=True)
    with pytest.raises(CompactnnError) as info:
        data_free(args, LoadedModel(lm, "pkg.lm:make"))
    message = str(info.value)
    assert "Sequential reads token ids" in message and "input_ids" in message
    assert "sp50: magnitude pruning" in message and "input_shape=(C, H, W)" not in message
