"""A save that fails (a full disk) leaves no folder it created, and never removes one that
existed before."""

import errno

import pytest
import torch
from torch import nn

import compactnn
from compactnn.export import artifact
from compactnn.export.artifact import first_missing, removed_if_failed


def _float() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8))


def _model() -> nn.Module:
    return compactnn.compress(_float(), "w8", progress=False)


def _disk_full(tensors, filename):
    with open(filename, "wb") as f:
        f.write(b"partial")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_failed_save_removes_the_folders_it_created(tmp_path, monkeypatch):
    q = _model()
    monkeypatch.setattr(artifact, "write_tensors", _disk_full)
    with pytest.raises(OSError, match="No space left"):
        compactnn.save(q, tmp_path / "small" / "a")
    assert list(tmp_path.iterdir()) == []  # neither small/a nor small/


def test_failed_save_keeps_a_folder_that_existed(tmp_path, monkeypatch):
    q = _model()
    (tmp_path / "a").mkdir()
    monkeypatch.setattr(artifact, "write_tensors", _disk_full)
    with pytest.raises(OSError):
        compactnn.save(q, tmp_path / "a")
    assert (tmp_path / "a").is_dir() and list((tmp_path / "a").iterdir()) == []


def test_failed_replacement_keeps_the_old_artifact(tmp_path, monkeypatch):
    q = _model()
    digest = compactnn.save(q, tmp_path / "a")
    before = sorted(p.name for p in (tmp_path / "a").iterdir())
    monkeypatch.setattr(artifact, "write_tensors", _disk_full)
    with pytest.raises(OSError):
        compactnn.save(q, tmp_path / "a", force=True)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == before
    assert compactnn.load(tmp_path / "a", model=_float(), expect_sha256=digest) is not None


def test_removed_if_failed_removes_only_what_the_body_created(tmp_path):
    assert first_missing(tmp_path) is None
    assert first_missing(tmp_path / "x" / "y") == tmp_path / "x"
    with pytest.raises(KeyboardInterrupt), removed_if_failed(tmp_path / "x" / "rep"):
        (tmp_path / "x" / "rep").mkdir(parents=True)
        (tmp_path / "x" / "rep" / "results.json").write_text("{}")
        raise KeyboardInterrupt
    assert not (tmp_path / "x").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("mine")
    with pytest.raises(OSError), removed_if_failed(tmp_path / "old"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert (tmp_path / "old" / "keep.txt").read_text() == "mine"
    with removed_if_failed(tmp_path / "ok"):  # success: kept
        (tmp_path / "ok").mkdir()
    assert (tmp_path / "ok").is_dir()
