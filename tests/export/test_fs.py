"""``export/fs.py``: crash-safe writes create their folder, refuse a folder path and give
written files the mode a plain ``open()`` would."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from compactnn.errors import CompactnnError
from compactnn.export.fs import atomic_write, names_folder


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_creates_parent_folders(tmp_path):
    path = tmp_path / "new" / "deeper" / "m.bin"
    atomic_write(path, lambda tmp: open(tmp, "wb").write(b"x"))
    assert path.read_bytes() == b"x"
    assert os.listdir(path.parent) == ["m.bin"]  # no temporary file left


def test_a_writer_that_replaces_the_file_still_gets_the_usual_mode(tmp_path):
    # safetensors' save_file writes a file of its own (0o600) over the temporary one
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.safetensors", lambda tmp: save_file({"w": torch.ones(2)}, tmp))
        atomic_write(tmp_path / "b.txt", lambda tmp: open(tmp, "w").write("x"))
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.safetensors") == _mode(tmp_path / "b.txt") == 0o644


def test_folder_paths_are_refused_or_recognised(tmp_path):
    with pytest.raises(CompactnnError, match="is a folder"):
        atomic_write(tmp_path, lambda tmp: None)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CompactnnError, match="is a file"):
        atomic_write(tmp_path / "file" / "m.bin", lambda tmp: None)
    assert names_folder("out/dir/") and names_folder(f"out{os.sep}")
    assert not names_folder("out/m.gguf")


def test_check_file_path_refuses_what_atomic_write_could_not_use(tmp_path):
    from compactnn.export.fs import check_file_path

    for folder in (tmp_path, f"{tmp_path}{os.sep}new{os.sep}"):
        with pytest.raises(CompactnnError, match=r"--json .* is a folder.*r\.json"):
            check_file_path(folder, "--json", suggest="r.json")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CompactnnError, match="is a file"):
        check_file_path(tmp_path / "file" / "deeper" / "r.json", "--json")
    assert check_file_path(tmp_path / "new" / "r.json", "--json") == tmp_path / "new" / "r.json"
    assert check_file_path(tmp_path / "file", "--json")  # force=None: written over
    with pytest.raises(CompactnnError, match="exists; pass force=True"):
        check_file_path(tmp_path / "file", "path", force=False)
    assert check_file_path(tmp_path / "file", "path", force=True)


def _write_files(**files: str):
    def write(folder) -> None:
        for name, text in files.items():
            (folder / name).write_text(text)

    return write


@pytest.mark.parametrize("exchange", [True, False])
def test_replace_folder_swaps_in_only_the_new_files(tmp_path, monkeypatch, exchange):
    from compactnn.export import fs

    if not exchange:  # no renameat2: renamed aside, then the new one renamed in
        monkeypatch.setattr(fs, "_exchange", lambda a, b: False)
    out = tmp_path / "nested" / "ct"
    assert fs.replace_folder(out, _write_files(a="1", b="2")) == out  # created
    assert sorted(os.listdir(out)) == ["a", "b"]
    assert _mode(out) == 0o777 & ~_umask()
    fs.replace_folder(out, _write_files(c="3"))
    assert sorted(os.listdir(out)) == ["c"]  # nothing of the old folder is kept
    assert os.listdir(out.parent) == ["ct"]  # no temporary folder left
    (tmp_path / "empty").mkdir()
    fs.replace_folder(tmp_path / "empty", _write_files(d="4"))
    assert os.listdir(tmp_path / "empty") == ["d"]


def test_replace_folder_that_fails_leaves_the_old_folder(tmp_path):
    from compactnn.export.fs import replace_folder

    out = tmp_path / "ct"
    replace_folder(out, _write_files(a="old"))

    def fail(folder) -> None:
        (folder / "a").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_folder(out, fail)
    assert (out / "a").read_text() == "old"
    assert os.listdir(tmp_path) == ["ct"]
    (tmp_path / ".ct.killed.cnn-tmp").mkdir()  # a killed run's leftover: the next removes it
    replace_folder(out, _write_files(b="new"))
    assert os.listdir(tmp_path) == ["ct"] and os.listdir(out) == ["b"]


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_existing_file_message_names_the_callers_own_option(tmp_path):
    from compactnn.export.fs import check_file_path

    (tmp_path / "bc.onnx").write_text("mine")
    with pytest.raises(CompactnnError) as info:
        check_file_path(tmp_path / "bc.onnx", "--out", force=False)
    assert (
        str(info.value)
        == f"--out {str(tmp_path / 'bc.onnx')!r} exists; pass --force to replace it."
    )
    with pytest.raises(CompactnnError) as info:
        check_file_path(tmp_path / "bc.onnx", "path", force=False)
    assert str(info.value).endswith("exists; pass force=True to replace it.")
    assert "--force" not in str(info.value)


def test_hf_weights_file_picks_the_file_that_identifies_the_weights(tmp_path):
    from compactnn.export.fs import hf_weights_file, sha256_file

    assert hf_weights_file(tmp_path) is None
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    assert hf_weights_file(tmp_path) == tmp_path / "pytorch_model.bin"
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    assert hf_weights_file(str(tmp_path)) == tmp_path / "model.safetensors.index.json"
    (tmp_path / "model.safetensors").write_bytes(b"abc")
    assert hf_weights_file(tmp_path) == tmp_path / "model.safetensors"
    # SHA-256 of b"abc" (FIPS 180-2 test vector)
    assert sha256_file(tmp_path / "model.safetensors") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


@pytest.mark.parametrize("writer", ["atomic_write", "write_new"])
def test_a_write_that_fails_without_a_filename_names_the_file(tmp_path, writer):
    """``f.write`` on a full disk raises an OSError with no filename; the writers give it
    the path (so the command line can print one line) and leave no file behind."""
    import errno

    from compactnn.export import fs

    def full(path: str) -> None:
        with open(path, "wb") as f:
            f.write(b"x")
        raise OSError(errno.ENOSPC, "No space left on device")

    target = tmp_path / "m.bin"
    with pytest.raises(OSError) as info:
        getattr(fs, writer)(target, full)
    assert (info.value.errno, info.value.filename) == (errno.ENOSPC, str(target))
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.filename is None
    assert list(tmp_path.iterdir()) == []

    def named(path: str) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", "elsewhere")

    with pytest.raises(PermissionError) as info:
        getattr(fs, writer)(target, named)
    assert info.value.filename == "elsewhere"  # an error that names its file is kept
