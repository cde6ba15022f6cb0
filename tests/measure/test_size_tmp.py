"""A model whose artifact size is not computed (quantized layers) is measured through a
temporary file the user never named: a failed write there names the temporary folder and
TMPDIR, not "choose another path"."""

from __future__ import annotations

import tempfile

import pytest
from torch import nn

from compactnn.errors import CompactnnError
from compactnn.measure.size import written_artifact_bytes


def test_a_file_size_limit_on_the_temporary_copy_names_tmpdir(tmp_path, monkeypatch):
    resource = pytest.importorskip("resource")
    monkeypatch.delenv("TMPDIR", raising=False)
    model = nn.Linear(256, 256)  # 257 KB of float32
    assert written_artifact_bytes(model) > 256 * 1024
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))  # Python ignores SIGXFSZ
    try:
        with pytest.raises(CompactnnError) as err:
            written_artifact_bytes(model)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert str(err.value) == (
        "cannot measure the float model's size on disk: its temporary copy in "
        f"{str(tmp_path)!r} could not be written (File too large): the file-size limit "
        "(ulimit -f), or the largest file of that file system, is below the model's size: "
        "raise the limit, or set TMPDIR to another file system."
    )
    assert list(tmp_path.iterdir()) == []  # the temporary folder is gone
