"""Output paths too long for the file system (``ENAMETOOLONG``) are refused up front by the
checks every command runs before its work (a security review found compress failing only
after compressing, with a 54-line chained traceback)."""

from __future__ import annotations

import errno
import os

import pytest

from compactnn.errors import CompactnnError
from compactnn.export.artifact import check_writable, removed_if_failed
from compactnn.export.fs import TMP_NAME_ROOM, check_file_path, check_path_length

NAME_MAX = 255  # ext4, tmpfs, xfs, btrfs


def test_a_name_over_the_limit_less_the_temporary_room_is_refused(tmp_path):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX") - TMP_NAME_ROOM
    check_path_length(tmp_path / ("x" * limit), "--json")
    with pytest.raises(CompactnnError, match=rf"is {limit + 1} bytes, .* allows \({limit}\)"):
        check_path_length(tmp_path / ("x" * (limit + 1)), "--json")
    # a folder on the way may use the whole limit
    check_path_length(tmp_path / ("d" * NAME_MAX) / "m.json", "--json")
    with pytest.raises(CompactnnError, match=rf"is {NAME_MAX + 1} bytes, .* \({NAME_MAX}\)"):
        check_path_length(tmp_path / ("d" * (NAME_MAX + 1)) / "m.json", "--json")


def test_a_name_is_counted_in_bytes(tmp_path):
    with pytest.raises(CompactnnError, match="is 300 bytes"):
        check_path_length(tmp_path / ("é" * 150), "--json")  # 150 characters, 300 bytes


@pytest.mark.parametrize("deep", [False, True])
def test_the_output_checks_refuse_before_any_write(tmp_path, deep):
    out = tmp_path / ("/".join(["d" * 200] * 25) if deep else "y" * 300)
    for check in (
        lambda: check_file_path(out, "--json"),
        lambda: check_writable(out, force=False, what="--out"),
    ):
        with pytest.raises(CompactnnError) as info:
            check()  # before: an OSError traceback from Path.is_dir, or no error at all
        message = str(info.value)
        assert "more characters)" in message and "choose a shorter" in message
        assert len(message) < 600 and "\n" not in message
    assert os.listdir(tmp_path) == []


def test_a_failed_save_of_a_long_path_keeps_its_own_error(tmp_path):
    out = tmp_path / ("y" * 300)
    error = OSError(errno.ENAMETOOLONG, "File name too long", str(out))
    with pytest.raises(OSError) as info, removed_if_failed(out):
        raise error
    assert info.value is error  # not a second ENAMETOOLONG raised by the cleanup
