"""`compactnn eval ART`: a float model other than the one the artifact was made from is
refused (other weights, or another class), naming what the artifact records."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import save_file

from compactnn.cli import main

FACTORY = """
from torch import nn


def make():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 3))
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    """An artifact compressed (by the CLI, which records its source) from w0.safetensors."""
    (tmp_path / "eval_refusal_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import eval_refusal_factory

    for seed in (0, 1):
        torch.manual_seed(seed)
        save_file(eval_refusal_factory.make().state_dict(), f"w{seed}.safetensors")
    x = torch.randn(48, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    save_file({"x": x[:32]}, "calib.safetensors")
    save_file({"x": x[32:], "y": torch.arange(16) % 3}, "xy.safetensors")
    args = ["compress", "eval_refusal_factory:make", "--weights", "w0.safetensors"]
    assert main([*args, "--recipe", "w8a8", "--data", "calib.safetensors", "--out", "art",
                 "--no-progress"]) == 0  # fmt: skip
    yield tmp_path
    sys.modules.pop("eval_refusal_factory", None)


def _eval(*model: str) -> int:
    return main(["eval", "art", *model, "--data", "xy.safetensors", "--quick", "--no-progress"])


def test_other_weights_are_refused_naming_both_files(project, capsys):
    assert _eval("--model", "eval_refusal_factory:make", "--weights", "w1.safetensors") == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: 'w1.safetensors' (SHA-256 "), err
    assert (
        "is not the file this artifact was made from ('eval_refusal_factory:make' with " in err[0]
    )
    assert "weights 'w0.safetensors' (SHA-256 " in err[0]
    assert "pass the --weights (MODEL) it was made from." in err[0]
    assert "quality" not in captured.out  # no float-vs-compressed table of another model


def test_the_right_weights_are_evaluated(project, capsys):
    assert _eval("--model", "eval_refusal_factory:make", "--weights", "w0.safetensors") == 0
    assert "error" not in capsys.readouterr().err


def test_a_float_model_of_another_class_names_the_recorded_source(project, capsys):
    assert _eval("--model", "digits-resnet") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0] == (
        "error: artifact 'art' holds a Sequential (made from 'eval_refusal_factory:make' with "
        f"weights 'w0.safetensors' (SHA-256 {err[0].split('SHA-256 ')[1][:16]}...)), but "
        "--model digits-resnet builds a DigitsResNet: pass --model eval_refusal_factory:make "
        "--weights FILE."
    )
