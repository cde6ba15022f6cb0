"""compress refuses an --out inside its input model's folder (export/deploy/report do too)."""

from __future__ import annotations

from compactnn.models.tiny_hf import tiny_model
from tests.commands._compress_cli import assert_one_error_line


def test_out_inside_the_input_model_folder_is_refused(tmp_path, capsys):
    model, _ = tiny_model("llama")
    model.save_pretrained(tmp_path / "hf")
    capsys.readouterr()
    before = sorted(p.name for p in (tmp_path / "hf").iterdir())
    for out in (tmp_path / "hf" / "sub", tmp_path / "hf" / "x" / ".." / "sub"):
        argv = ["compress", str(tmp_path / "hf"), "-r", "w8", "--out", str(out), "--no-progress"]
        assert_one_error_line(
            capsys, argv, f"--out {str(out)!r} is inside the MODEL folder", "--out out/"
        )
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == before  # nothing written
