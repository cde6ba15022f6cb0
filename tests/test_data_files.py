"""Data files checked before they are read (data_files.py): the ``.npy`` header against the
bytes after it, regular files only, one row per example (read end to end through
``resolve_data`` in tests/test_model_io.py)."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch

from compactnn.data_files import (
    check_npy_size,
    check_regular_file,
    check_rows,
    npy_layout,
    read_npy,
    read_tensors,
)
from compactnn.errors import CompactnnError


@pytest.mark.parametrize("version", [(1, 0), (2, 0)])
def test_npy_layout_reads_the_header_numpy_writes(version):
    x = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    buf = io.BytesIO()
    np.lib.format.write_array(buf, x, version=version)
    buf.seek(0)
    shape, dtype, offset = npy_layout(buf)
    assert (shape, dtype) == (x.shape, x.dtype)
    assert len(buf.getvalue()) - offset == x.nbytes  # the data starts right after the header


def test_a_truncated_npy_is_refused_and_a_whole_one_read(tmp_path):
    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    check_npy_size(tmp_path / "x.npy", "x.npy")
    assert np.array_equal(read_npy(str(tmp_path / "x.npy")), x)
    whole = (tmp_path / "x.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(whole[:-4])
    with pytest.raises(CompactnnError, match=r"\(60 bytes\) but holds 56 bytes"):
        check_npy_size(tmp_path / "cut.npy", "cut.npy")


def test_only_regular_files_are_read(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(CompactnnError, match="'pipe' is not a regular file"):
        check_regular_file(tmp_path / "pipe", "'pipe'", "a .npy file")
    with pytest.raises(CompactnnError, match="'gone' does not exist"):
        check_regular_file(tmp_path / "gone", "'gone'", "a .npy file")
    with pytest.raises(CompactnnError, match="is a folder"):
        read_tensors(tmp_path)


def test_rows_are_checked_within_each_split():
    ok = {"x_train": torch.zeros(4, 2), "y_train": torch.zeros(4), "x_test": torch.zeros(2, 2)}
    check_rows("d", ok | {"scale": torch.tensor(1.0)})  # 0-d tensors have no rows
    with pytest.raises(CompactnnError, match=r"x_train \(4, 2\), y_train \(3,\)"):
        check_rows("d", ok | {"y_train": torch.zeros(3)})


def test_a_scalar_npy_is_named_a_scalar_not_an_empty_batch(tmp_path):
    path = tmp_path / "s.npy"
    np.save(path, np.float32(3.0))
    with pytest.raises(CompactnnError) as err:
        read_npy(str(path))
    assert str(err.value).startswith(f"data file {str(path)!r} holds a scalar (a 0-d array)")
