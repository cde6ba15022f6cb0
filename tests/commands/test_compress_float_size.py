"""``compactnn compress`` after the artifact is written: a float model that ``save`` refuses
(spectral_norm's parametrizations) only makes the size comparison unknown."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

import compactnn
from compactnn.commands._common import human_bytes
from compactnn.commands.compress import float_comparison
from compactnn.measure.size import artifact_bytes
from tests.commands._compress_cli import run_cli

MODULE = """
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm
def make():
    torch.manual_seed(0)
    return nn.Sequential(spectral_norm(nn.Linear(8, 16)), nn.ReLU(), nn.Linear(16, 4))
"""


def test_a_float_model_save_refuses_leaves_the_size_unknown_not_the_command_failed(
    tmp_path, capsys, monkeypatch
):
    (tmp_path / "f16_snmod.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import f16_snmod

    model = f16_snmod.make().eval()
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    out = tmp_path / "out"
    code, stdout, err = run_cli(
        capsys,
        "compress",
        "f16_snmod:make",
        "--weights",
        str(tmp_path / "w.safetensors"),
        "-r",
        "w8a8",
        "-d",
        str(tmp_path / "x.safetensors"),
        "-o",
        str(out),
        "--no-progress",
    )
    assert code == 0, err
    assert "error" not in err
    line = next(li for li in stdout.splitlines() if li.strip().startswith("artifact:"))
    assert f"{human_bytes(artifact_bytes(out))} (float artifact size unknown (" in line
    assert "parametrizations" in line and "\n" not in line
    header = json.loads((out / "compactnn.json").read_text())
    assert header["recipe"] == "w8a8"
    loaded = compactnn.load(out, model=f16_snmod.make())
    with torch.no_grad():  # the artifact is the good one the command reported
        assert torch.allclose(loaded(x), model(x), atol=0.1)


def test_the_float_comparison_states_the_ratio():
    assert float_comparison(1024, 4096) == f"float artifact {human_bytes(4096)}, 4.00x smaller"
    assert float_comparison(1024, "no") == "float artifact size unknown (no)"
