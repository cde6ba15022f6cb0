"""A disk error on a temporary file a command made (``eval --recipe`` saves the compressed
model into a folder of ``TMPDIR`` to measure it) is fixed with ``TMPDIR``, not with a path
the user chose: ``eval`` has no ``--out``."""

from __future__ import annotations

import errno
import os
import tempfile

import torch
from safetensors.torch import save_file
from torch import nn

from compactnn import cli
from compactnn.export import artifact
from tests._cli import run_cli

FULL = "No space left on device"


def _scratch(*parts: str) -> str:
    return os.path.join(tempfile.gettempdir(), *parts)


def test_a_full_disk_under_a_command_s_temporary_folder_names_tmpdir():
    path = _scratch("compactnn-eval-ab_12cd3", "a", ".cnn-0123456789abcdef-model.safetensors")
    message = cli.os_error_message(OSError(errno.ENOSPC, FULL, path))
    assert (
        message == f"{path!r}: {FULL}; free some space there or set TMPDIR to a folder with room."
    )
    plain = _scratch("tmpk2_x9qzp")  # tempfile's own names: tmp + 8 characters
    assert "set TMPDIR to a folder with room" in cli.os_error_message(
        OSError(errno.ENOSPC, FULL, plain)
    )
    ro = cli.os_error_message(OSError(errno.EROFS, "Read-only file system", path))
    assert ro.endswith("that file system is read-only: set TMPDIR to a folder you can write.")


def test_a_path_the_user_chose_keeps_its_own_advice():
    for path in ("out/m", _scratch("my-artifact", "model.safetensors"), _scratch("x")):
        message = cli.os_error_message(OSError(errno.ENOSPC, FULL, path))
        assert message == f"{path!r}: {FULL}; free some disk space or choose another --out."


def test_eval_with_a_full_tmpdir_says_set_tmpdir(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "fg_evalnet.py").write_text(
        "from torch import nn\n\n\ndef make():\n    return nn.Sequential(nn.Linear(4, 2))\n"
    )
    torch.manual_seed(0)
    save_file(nn.Sequential(nn.Linear(4, 2)).state_dict(), tmp_path / "w.safetensors")
    save_file({"x": torch.randn(64, 4)}, tmp_path / "x.safetensors")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    def full(tensors, filename):  # the disk of TMPDIR is full
        raise OSError(errno.ENOSPC, FULL, str(filename))

    monkeypatch.setattr(artifact, "write_tensors", full)
    argv = ["eval", "fg_evalnet:make", "--weights", "w.safetensors", "--recipe", "w8"]
    code, _out, err = run_cli(capsys, *argv, "--data", "x.safetensors", "--no-progress")
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: '{scratch}{os.sep}compactnn-eval-"), err
    assert line.endswith(f"{FULL}; free some space there or set TMPDIR to a folder with room.")
    assert "--out" not in err
    assert list(scratch.iterdir()) == []  # the temporary folder is gone


def test_eval_recipe_refuses_a_missing_tmpdir_before_compressing(tmp_path, monkeypatch, capsys):
    """Python's tempfile would silently fall back to /tmp: refused first, naming TMPDIR."""
    import compactnn
    from compactnn import cli

    def no_work(*args, **kwargs):
        raise AssertionError("compressed before refusing TMPDIR")

    monkeypatch.setattr(compactnn, "compress", no_work)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "missing"))
    assert cli.main(["eval", "mnist-cnn", "--recipe", "w8a8", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "TMPDIR" in err and err.count("\n") == 1
