"""``compactnn compress`` with a pruning-only recipe that collapses the model: the final
warning speaks of the pruned model and pruning, not of quantization or an untrained model."""

from __future__ import annotations

import numpy as np
import torch

from compactnn.commands.compress import what_it_did
from tests.commands._compress_cli import run_cli

DEAD_FACTORY = """
import torch
from torch import nn


def make():
    # channel 0 has the largest L1 norm (ch99 keeps it) and is dead after the ReLU on
    # non-negative inputs: the pruned model's output is the head's bias for every sample
    conv = nn.Conv2d(1, 4, 3)
    with torch.no_grad():
        conv.weight.copy_(torch.full((4, 1, 3, 3), 0.1))
        conv.weight[0] = -1.0
        conv.bias.copy_(torch.tensor([-1.0, 0.0, 0.0, 0.0]))
    torch.manual_seed(0)
    return nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
"""


def test_a_pruning_only_collapse_names_pruning(tmp_path, monkeypatch, capsys):
    from safetensors.torch import save_file

    (tmp_path / "dead_cli_factory.py").write_text(DEAD_FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import dead_cli_factory

    save_file(dead_cli_factory.make().state_dict(), "w.safetensors")
    x = np.abs(np.random.default_rng(0).standard_normal((16, 1, 8, 8), dtype=np.float32))
    np.save("x.npy", x)
    code, _out, err = run_cli(
        capsys, "compress", "dead_cli_factory:make", "--weights", "w.safetensors",
        "-r", "ch99", "--data", "x.npy", "--out", "art", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    assert "warning: the pruned model's output is the same for all 16 samples" in err
    assert "pruning removed weights or channels its outputs depend on" in err
    assert "quantized model" not in err and "compress a trained model" not in err


def test_what_it_did_reads_the_model_and_its_extra():
    float_model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert what_it_did(float_model, {"resized": {"0": {}}}) == {"quantized": False, "pruned": True}
    assert what_it_did(float_model, {}) == {"quantized": True, "pruned": False}  # the old words
