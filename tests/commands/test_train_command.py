import torch
from safetensors.torch import save_file

import compactnn
from compactnn.cli import main

FACTORY = """
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 8 * 8, 3),
    )
"""


def _setup(tmp_path, monkeypatch):
    (tmp_path / "qat_cli_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    import qat_cli_factory

    model = qat_cli_factory.make()
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(96, 1, 8, 8, generator=gen)
    y = torch.randint(0, 3, (96,), generator=gen)
    save_file({"x": x, "y": y}, tmp_path / "data.safetensors")
    save_file({"x": x}, tmp_path / "nolabels.safetensors")
    return model, x


def test_train_command_writes_a_loadable_artifact(tmp_path, monkeypatch, capsys):
    model, x = _setup(tmp_path, monkeypatch)
    out = tmp_path / "out"
    args = [
        "train",
        "qat_cli_factory:make",
        "--weights",
        str(tmp_path / "w.safetensors"),
        "--recipe",
        "w1a1-bireal",
        "--data",
        str(tmp_path / "data.safetensors"),
        "--epochs",
        "1",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    assert "trained qat_cli_factory:make with w1a1-bireal for 1 epochs" in capsys.readouterr().out
    q = compactnn.load(out, model=model)
    assert q(x).shape == (96, 3)
    assert main(args) == 2  # the artifact exists: refused without --force


def test_train_command_refuses_data_without_labels(tmp_path, monkeypatch, capsys):
    _setup(tmp_path, monkeypatch)
    rc = main(
        [
            "train",
            "qat_cli_factory:make",
            "--weights",
            str(tmp_path / "w.safetensors"),
            "--recipe",
            "w4a4-lsq",
            "--data",
            str(tmp_path / "nolabels.safetensors"),
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
        ]
    )
    assert rc == 2 and "labels" in capsys.readouterr().err
