"""``export/fs.py``: a file path under a system folder is refused before any work, and a
folder that refuses the temporary file is reported under the user's path."""

from __future__ import annotations

import errno
import os

import pytest

from compactnn.errors import CompactnnError
from compactnn.export import fs
from compactnn.export.fs import atomic_write, check_file_path, system_folder


@pytest.mark.parametrize(
    ("path", "system"),
    [("/sys/x.onnx", "/sys"), ("/proc/self/x.json", "/proc"), ("/dev/x.gguf", "/dev")],
)
def test_a_file_under_a_system_folder_is_refused_up_front(path, system):
    with pytest.raises(CompactnnError) as refused:
        check_file_path(path, "--onnx", force=False, suggest="model.onnx")
    message = str(refused.value)
    assert message.startswith(f"--onnx {path!r} lies under {system}, a system folder")
    assert "'model.onnx'" in message and "\n" not in message


def test_dev_shm_and_own_folders_are_not_system_folders(tmp_path):
    assert system_folder("/dev/shm/x.onnx") is None
    assert system_folder(tmp_path / "x.onnx") is None
    assert system_folder("/devices/x") is None  # a name that only starts like one
    link = tmp_path / "to-sys"
    os.symlink("/sys", link)
    assert system_folder(link / "x.onnx") == "/sys"  # links resolved


def test_a_folder_refusing_the_temporary_file_names_the_target(tmp_path, monkeypatch):
    def refuse(prefix, suffix, dir):  # what mkstemp raises in /sys, even for root
        raise PermissionError(errno.EACCES, "Permission denied", f"{dir}/{prefix}abc{suffix}")

    monkeypatch.setattr(fs.tempfile, "mkstemp", refuse)
    target = tmp_path / "m.onnx"
    with pytest.raises(PermissionError) as failed:
        atomic_write(target, lambda tmp: None)
    assert failed.value.filename == str(target) and failed.value.errno == errno.EACCES
    assert ".tmp" not in str(failed.value)


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="no sysfs here")
def test_a_write_into_sysfs_names_the_target_not_its_temporary_file():
    with pytest.raises(OSError) as failed:
        atomic_write("/sys/compactnn-test.onnx", lambda tmp: None)
    assert failed.value.filename == "/sys/compactnn-test.onnx"
