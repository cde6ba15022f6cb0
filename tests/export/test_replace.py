"""``export/replace.py``: only the names a save itself gives its files count as its strays."""

from __future__ import annotations

import os
import secrets

import pytest
import torch
from torch import nn

import compactnn
from compactnn.errors import CompactnnError
from compactnn.export import replace


@pytest.mark.parametrize("link", ["", "link-"])
@pytest.mark.parametrize("usual", ["model.safetensors", "recipe.yaml"])
def test_the_staged_names_a_save_writes_are_strays(usual, link):
    assert replace.is_stray(f".cnn-{secrets.token_hex(8)}-{link}{usual}")
    assert replace.is_stray(f".{usual}.k2_x9qzm.tmp")  # atomic_write's temporary name
    assert replace.is_stray(".compactnn.json.k2_x9qzm.tmp")


@pytest.mark.parametrize(
    "name",
    [
        ".cnn-notes.txt",
        ".cnn-",
        ".cnn-0123456789abcdef-notes.txt",
        ".cnn-0123456789ABCDEF-model.safetensors",
        ".cnn-0123-model.safetensors",
        ".notes.txt.k2_x9qzm.tmp",
        ".model.safetensors.tmp",
    ],
)
def test_a_users_own_dot_cnn_file_is_not_a_stray(name):
    assert not replace.is_stray(name)


def test_a_save_keeps_a_users_dot_cnn_file_and_refuses_the_folder(tmp_path):
    torch.manual_seed(0)
    q = compactnn.compress(nn.Sequential(nn.Linear(8, 4)), "w8", progress=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / ".cnn-notes.txt").write_text("mine")
    with pytest.raises(CompactnnError, match=r"holds no compactnn artifact.*\.cnn-notes\.txt"):
        compactnn.save(q, out, force=True)
    assert os.listdir(out) == [".cnn-notes.txt"]
    compactnn.save(q, tmp_path / "art")
    (tmp_path / "art" / ".cnn-notes.txt").write_text("mine")  # beside an artifact: kept
    compactnn.save(q, tmp_path / "art", force=True)
    assert (tmp_path / "art" / ".cnn-notes.txt").read_text() == "mine"
