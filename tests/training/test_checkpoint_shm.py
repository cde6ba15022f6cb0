"""A checkpoint directory under /dev/shm (a plain tmpfs, the user's) is accepted, as --out
and --onnx there are; /proc, /sys and /dev stay refused (export/fs.system_folder is the one
rule for every output path)."""

from __future__ import annotations

import os

import pytest

from compactnn.errors import CompactnnError
from compactnn.training.checkpoint import check_checkpoint_dir


@pytest.mark.skipif(not os.access("/dev/shm", os.W_OK), reason="no writable /dev/shm")
def test_dev_shm_is_the_users():
    assert str(check_checkpoint_dir("/dev/shm/compactnn-ck-test")) == "/dev/shm/compactnn-ck-test"


@pytest.mark.parametrize("path", ["/dev/ck", "/proc/ck", "/sys/ck"])
def test_system_folders_are_refused(path):
    with pytest.raises(CompactnnError, match=f"lies under /{path.split('/')[1]}, a system folder"):
        check_checkpoint_dir(path, "--checkpoint-dir")
