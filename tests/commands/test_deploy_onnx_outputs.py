"""``compactnn deploy --onnx``: a system path refused before any work, a refused export that
keeps the verified ``--save``, and the note when the written file ran slower than float."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

import compactnn
from compactnn.cli import main
from compactnn.commands import deploy as deploy_command
from compactnn.errors import CompactnnError
from compactnn.export.artifact import artifact_exists

FACTORY = """
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)
    )
"""

MODEL = ["--model", "deploy_onnx_factory:make", "--weights", "w.safetensors"]
# the backend choice of the tester's MobileNetV3-Small run, in seconds per call
SLOW_FILE = {"onednn": 2.41e-3, "onnxruntime": 36.7e-3, "fp32-onnxruntime": 5.8e-3}


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A factory, its weights, a w8a8 artifact ``art`` and 16 inputs ``x.npy``."""
    (tmp_path / "deploy_onnx_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import deploy_onnx_factory

    model = deploy_onnx_factory.make().eval()
    save_file(model.state_dict(), "w.safetensors")
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    save_file({"x": x}, "x.safetensors")
    compactnn.save(compactnn.compress(model, "w8a8", calib_data=x, progress=False), "art")
    return tmp_path


def _deploy(*extra: str) -> int:
    cmd = ["deploy", "art", *MODEL, "--data", "x.safetensors", "--runs", "2", "--quick"]
    return main([*cmd, "--no-progress", *extra])


def test_an_onnx_file_under_a_system_folder_is_refused_before_any_work(
    project, monkeypatch, capsys
):
    def refuse(args):
        raise AssertionError("the slow work started before the refusal")

    monkeypatch.setattr(deploy_command, "_models", refuse)
    assert _deploy("--onnx", "/sys/x.onnx") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --onnx '/sys/x.onnx' lies under /sys, a system folder")
    assert len(err.strip().splitlines()) == 1 and ".tmp" not in err


def test_a_refused_export_keeps_the_verified_save(project, monkeypatch, capsys):
    import compactnn.export.onnx as onnx_export

    def refused(*args, **kwargs):
        raise CompactnnError(
            "onnx export (QDQ form): max difference 2.39 steps: FAILED. ... deploy with "
            "tolerance=4 (--tolerance 4 on the command line)."
        )

    monkeypatch.setattr(onnx_export, "export_onnx", refused)
    assert _deploy("--onnx", "m.onnx", "--save", "dep") == 2
    out, err = capsys.readouterr()
    assert "saved the deployed model to dep" in out
    assert artifact_exists("dep") and not Path("m.onnx").exists()
    assert err.startswith("error: --onnx 'm.onnx' not written: onnx export (QDQ form)")
    assert "--tolerance 4" in err and "The deployed model was saved to dep all the same" in err
    assert len(err.strip().splitlines()) == 1


def test_the_refusal_says_why_the_deployment_passed_where_the_file_did_not():
    checked = SimpleNamespace(isolated=True)
    deployed = SimpleNamespace(backend="onednn", verification=checked)
    args = SimpleNamespace(onnx="r18.onnx", save=None)
    said = deploy_command._refused_onnx(CompactnnError("onnx export: FAILED."), deployed, args)
    assert said.startswith("--onnx 'r18.onnx' not written: onnx export: FAILED.")
    assert "each of its kernels, run alone" in said and "saved" not in said
    checked.isolated = False
    assert deploy_command._refused_onnx(CompactnnError("x"), deployed, args).endswith("x")


def test_the_note_names_how_much_slower_why_and_the_way_out():
    said = deploy_command.onnx_speed_note(SLOW_FILE, "onednn", (6, 3))
    assert said.startswith(
        "on ONNX Runtime this file ran 6.3x slower than the float model (36.70 against 5.80 ms "
        "on fp32-onnxruntime"
    )
    assert "runs 6 of its 9 convolutions in float" in said
    assert "ship the deployed onednn model (2.41 ms) with --save DIR" in said
    assert "grids='all'" in said
    fused = deploy_command.onnx_speed_note(SLOW_FILE, "onednn", (0, 9))
    assert "runs all 9 convolutions as QLinearConv, but each int8 layer pays" in fused
    assert "grids='all'" not in fused  # nothing left in float for it to quantize
    unknown = deploy_command.onnx_speed_note(SLOW_FILE, "onednn", None)
    assert "fixed cost" in unknown and "QuantizeLinear" in unknown and "grids='all'" in unknown
    both_slow = {**SLOW_FILE, "onednn": 7.0e-3}
    assert "run the float model" in deploy_command.onnx_speed_note(both_slow, "onednn", None)


@pytest.mark.parametrize(
    "selection",
    [
        {},  # --backend onednn: nothing timed, nothing re-timed
        {"onednn": 2.4e-3, "fp32-onnxruntime": 5.8e-3},  # the file's graph failed: not timed
        {"onnxruntime": 6.2e-3, "fp32-onnxruntime": 5.8e-3},  # within the 10% margin
    ],
)
def test_no_note_without_a_timing_that_shows_the_file_slower(selection):
    assert deploy_command.onnx_speed_note(selection, "onednn", (6, 3)) is None


def test_the_note_follows_the_wrote_line(project, monkeypatch, capsys):
    real_deploy = compactnn.deploy

    def deploy(*args, **kwargs):
        deployed = real_deploy(*args, **kwargs)
        deployed.selection = dict(SLOW_FILE)  # the tester's race, whatever this machine's
        return deployed

    monkeypatch.setattr(compactnn, "deploy", deploy)
    assert _deploy("--onnx", "m.onnx") == 0
    lines = capsys.readouterr().out.splitlines()
    wrote = next(i for i, line in enumerate(lines) if line.startswith("wrote m.onnx: "))
    assert lines[wrote + 1].startswith("  note: on ONNX Runtime this file ran 6.3x slower")
    assert Path("m.onnx").is_file()
