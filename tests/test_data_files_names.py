"""A ``--weights`` / ``--data`` ``.safetensors`` file whose name is not valid UTF-8 (a Latin-1
``w\\xe9.safetensors``) is read like any other (safetensors itself refuses such names), with
the same checks: a header that claims more bytes than the file holds is refused before
anything is allocated."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from compactnn import data_files
from compactnn.data_files import read_tensors
from compactnn.errors import CompactnnError

LATIN1_NAME = os.fsdecode(b"w\xe9.safetensors")  # 'w\udce9.safetensors' on a UTF-8 system


@pytest.fixture
def latin1_file(tmp_path):
    if os.fsencode(LATIN1_NAME) != b"w\xe9.safetensors":
        pytest.skip("the file system encoding does not keep undecodable bytes")
    tensors = {"w": torch.arange(6.0).reshape(2, 3), "ids": torch.tensor([1, 2], dtype=torch.int8)}
    save_file(tensors, tmp_path / "ref.safetensors")  # the reference, under a plain name
    path = tmp_path / LATIN1_NAME
    os.replace(tmp_path / "ref.safetensors", path)
    return path, tensors


def _same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return got.keys() == want.keys() and all(
        got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want
    )


def test_a_file_whose_name_is_not_utf8_is_read(latin1_file):
    path, tensors = latin1_file
    assert _same(read_tensors(path), tensors)
    assert _same(read_tensors(str(path)), tensors)


def test_without_proc_the_bytes_are_read_instead(latin1_file, monkeypatch):
    path, tensors = latin1_file
    monkeypatch.setattr(data_files, "_fd_name", lambda fd: None)  # not Linux
    assert _same(read_tensors(path), tensors)


def _huge_claim(path) -> None:
    """A safetensors file whose header claims 10**12 float32 values over 8 bytes of data."""
    header = {"x": {"dtype": "F32", "shape": [10**12], "data_offsets": [0, 4 * 10**12]}}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 8)


@pytest.mark.parametrize("proc", [True, False])
def test_a_huge_header_claim_is_still_refused_before_allocation(latin1_file, monkeypatch, proc):
    path, _ = latin1_file
    _huge_claim(path)
    if not proc:
        monkeypatch.setattr(data_files, "_fd_name", lambda fd: None)
    with pytest.raises(CompactnnError, match="is not a readable safetensors file") as info:
        read_tensors(path)
    assert "UTF-8" not in str(info.value) and "\n" not in str(info.value)
    plain = path.with_name("plain.safetensors")  # the reference: a UTF-8 name, same refusal
    os.replace(path, plain)
    with pytest.raises(CompactnnError, match="is not a readable safetensors file"):
        read_tensors(plain)


def test_a_utf8_name_is_passed_to_safetensors_as_it_is(tmp_path, monkeypatch):
    import safetensors.torch

    seen = []
    monkeypatch.setattr(safetensors.torch, "load_file", lambda name: seen.append(name) or {})
    path = tmp_path / "poids ü.safetensors"
    path.write_bytes(b"x")
    read_tensors(path)
    assert seen == [str(path)]
