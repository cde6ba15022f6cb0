"""A cache folder that cannot be made is one line naming it and the fix, not a traceback."""

import pytest

from compactnn.errors import CompactnnError
from compactnn.models import cache
from tests._cli import run_cli


def _only_xdg(monkeypatch, value):
    monkeypatch.delenv("COMPACTNN_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(value))


def test_cache_under_a_file_names_the_variable_and_the_fix(monkeypatch, tmp_path):
    a_file = tmp_path / "weights.safetensors"
    a_file.write_bytes(b"x")
    _only_xdg(monkeypatch, a_file)
    with pytest.raises(CompactnnError) as info:
        cache.cache_dir()
    assert str(info.value) == (
        f"cannot create the compactnn cache folder '{a_file}/compactnn' (from $XDG_CACHE_HOME): "
        "a part of its path is a file; set COMPACTNN_CACHE (or XDG_CACHE_HOME) to a writable "
        "folder."
    )


def test_cache_that_cannot_be_created_names_home(monkeypatch):
    monkeypatch.delenv("COMPACTNN_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", "/proc/nope")  # procfs refuses new folders (ENOENT)
    with pytest.raises(CompactnnError, match=r"'/proc/nope/\.cache/compactnn' \(from \$HOME\)"):
        cache.cache_dir()


def test_cache_variable_pointing_at_a_file(monkeypatch, tmp_path):
    a_file = tmp_path / "f"
    a_file.write_bytes(b"x")
    monkeypatch.setenv("COMPACTNN_CACHE", str(a_file))
    with pytest.raises(CompactnnError, match=r"\(from \$COMPACTNN_CACHE\): a part of its path"):
        cache.cache_dir()


def test_compress_of_a_reference_model_exits_2_with_one_line(monkeypatch, tmp_path, capsys):
    a_file = tmp_path / "tiny.safetensors"
    a_file.write_bytes(b"x")
    _only_xdg(monkeypatch, a_file)
    code, _, err = run_cli(
        capsys, "compress", "mnist-cnn", "--recipe", "w8", "--out", str(tmp_path / "o")
    )
    assert code == 2, err
    assert (
        err.startswith("error: cannot create the compactnn cache folder ") and err.count("\n") == 1
    )
    assert "set COMPACTNN_CACHE (or XDG_CACHE_HOME) to a writable folder." in err
    assert not (tmp_path / "o").exists()
