"""to_ort_nbits on a full disk: a one-line CompactnnError naming the folder it could not write
and the ways out (TMPDIR, path=), not a bare ``OSError [Errno 28]``; nothing is left behind."""

from __future__ import annotations

import errno
import tempfile

import pytest

import compactnn
from compactnn.kernels import ort_nbits
from compactnn.kernels.ort_nbits import to_ort_nbits
from tests.kernels._keywords import compressed

pytest.importorskip("onnxruntime")
pytestmark = [
    pytest.mark.filterwarnings("ignore:to_ort_nbits. accuracy_level=4"),
    pytest.mark.filterwarnings("ignore:RTNConfig. the first/last-layer rule"),
]


def _full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture
def tmpdir_(tmp_path, monkeypatch):
    """A TMPDIR of its own (tempfile reads it once: set its cache)."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.mark.parametrize("stage", ["export_dynamic", "save_nbits"])
def test_a_full_temporary_folder_names_it_and_the_ways_out(tmpdir_, monkeypatch, stage):
    q, batch = compressed("w4-g32")
    monkeypatch.setattr(ort_nbits, stage, _full)  # the float export, then the model's files
    with pytest.raises(compactnn.CompactnnError) as info:
        to_ort_nbits(q, batch, accuracy_level=0, threads=1)
    text = str(info.value)
    assert "\n" not in text and str(tmpdir_) in text, text
    assert "No space left on device" in text and "disk is full" in text, text
    assert "TMPDIR" in text and "path=" in text, text
    assert isinstance(info.value.__cause__, OSError)
    assert list(tmpdir_.iterdir()) == []  # the private folders went with the error


def test_a_temporary_folder_that_cannot_be_made_names_tmpdir(tmpdir_, monkeypatch):
    q, batch = compressed("w4-g32")
    real, calls = tempfile.mkdtemp, []

    def second_full(*args, **kwargs):  # the float export's folder, then the model's: full
        calls.append(1)
        return real(*args, **kwargs) if len(calls) == 1 else _full()

    monkeypatch.setattr(tempfile, "mkdtemp", second_full)
    with pytest.raises(compactnn.CompactnnError, match="TMPDIR") as info:
        to_ort_nbits(q, batch, accuracy_level=0, threads=1)
    assert str(tmpdir_) in str(info.value) and len(calls) == 2
    assert list(tmpdir_.iterdir()) == []


def test_a_full_disk_at_path_names_that_folder_and_not_tmpdir(tmpdir_, tmp_path, monkeypatch):
    q, batch = compressed("w4-g32")
    monkeypatch.setattr(ort_nbits, "save_nbits", _full)
    target = tmp_path / "out" / "m.onnx"
    with pytest.raises(compactnn.CompactnnError, match="another path=") as info:
        to_ort_nbits(q, batch, accuracy_level=0, threads=1, path=target)
    assert str(target.parent) in str(info.value) and "TMPDIR" not in str(info.value)
    assert list(tmpdir_.iterdir()) == []  # path= given: TMPDIR is not written at all
    assert list(target.parent.iterdir()) == []  # the float export's folder is gone too


def test_path_keeps_the_float_export_out_of_tmpdir(tmpdir_, tmp_path, monkeypatch):
    q, batch = compressed("w4-g32")
    seen = []
    real = ort_nbits.export_dynamic

    def spy(model, example, path):
        seen.append(path.parent.parent)
        return real(model, example, path)

    monkeypatch.setattr(ort_nbits, "export_dynamic", spy)
    fast = to_ort_nbits(q, batch, accuracy_level=0, threads=1, path=tmp_path / "out" / "m.onnx")
    assert seen == [tmp_path / "out"] and list(tmpdir_.iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.onnx", "m.onnx.data"]
    assert fast.path == tmp_path / "out" / "m.onnx"


def test_another_os_error_is_not_dressed_as_a_disk_problem(tmpdir_, monkeypatch):
    q, batch = compressed("w4-g32")

    def broken(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(ort_nbits, "export_dynamic", broken)
    with pytest.raises(OSError, match="Input/output error") as info:
        to_ort_nbits(q, batch, accuracy_level=0, threads=1)
    assert not isinstance(info.value, compactnn.CompactnnError)
    assert list(tmpdir_.iterdir()) == []
