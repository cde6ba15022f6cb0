"""``commands/_paths.py`` with an output path too long for the file system: no traceback
from ``Path.exists`` (deploy --onnx, eval --json); the file check after it says why."""

from __future__ import annotations

from compactnn.commands._paths import check_not_an_input


def test_check_not_an_input_passes_a_path_too_long_on(tmp_path):
    w = tmp_path / "w.safetensors"
    w.write_bytes(b"")
    out = tmp_path / ("y" * 300)
    check_not_an_input(out, "--json", {"--weights": str(w)}, "eval.json")  # no OSError
