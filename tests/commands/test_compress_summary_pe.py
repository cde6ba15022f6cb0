"""``compactnn compress`` with a PE-wise pruning recipe prints what it pruned as for the other
pruning recipes: each pruned layer (its share of PE tiles and of zero weights, counted here
from the artifact), the parameter / non-zero / MAC line, and the collapse warning."""

from __future__ import annotations

import numpy as np
import pytest

from tests.commands._compress_cli import run_cli

FACTORY = """
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 36, 8),
    )
"""


@pytest.fixture
def pe_project(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    (tmp_path / "pe_cli_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import pe_cli_factory

    save_file(pe_cli_factory.make().state_dict(), "w.safetensors")
    np.save("x.npy", np.random.default_rng(0).standard_normal((32, 1, 6, 6), dtype=np.float32))
    return tmp_path


@pytest.mark.parametrize("recipe", ["w8a8-pe50", "w2a8-pe50"])
def test_pe_pruning_is_listed_counted_and_checked(pe_project, capsys, recipe):
    import pe_cli_factory
    import torch

    import compactnn
    from compactnn.commands.compress_summary import human_count
    from compactnn.prune.stats import count_macs

    code, out, err = run_cli(
        capsys, "compress", "pe_cli_factory:make", "--weights", "w.safetensors",
        "-r", recipe, "--data", "x.npy", "--out", "art", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    net = pe_cli_factory.make()
    art = compactnn.load("art", model=pe_cli_factory.make())
    assert "  quantized layers: 4 (2 of them pruned first); kept in float: 0\n" in out
    zeroed = 0
    for name in ("2", "4"):  # the interior layers, zero shares counted from the artifact
        w = art.get_submodule(name).weight
        share = float((w == 0).float().mean())
        assert f"    {name}: pruned (50% of its 1x8 PE tiles; {share:.0%} of weights zero), " in out
        zeroed += int((w == 0).sum())
    assert "    0: quantized, not pruned\n" in out and "    7: quantized, not pruned\n" in out
    params = sum(p.numel() for p in net.parameters())
    x = torch.from_numpy(np.load("x.npy"))
    macs = human_count(count_macs(net, x))
    p, nz = human_count(params), human_count(params - zeroed)
    assert f"  pruning (pe): params {p} -> {p} ({nz} non-zero), MACs {macs} -> {macs} " in out
    with torch.no_grad():
        agree = float((net(x).argmax(1) == art(x).argmax(1)).float().mean())
    assert agree < 0.9  # untrained: the calibration samples' argmax moved
    assert f"warning: pe step (50% of the 1x8 PE tiles, {recipe[:4]}, calibrated" in err
    assert f"agrees with the float model's on {agree:.1%}" in err


def test_a_pe_record_names_its_tiles():
    from compactnn.commands.compress_summary import pruned_layers

    record = {"pe": {"3": 0.7188, "tiles": {"group": [2, 4], "sparsity": 0.25}}}
    assert pruned_layers({"pruning": record}) == {
        "3": "25% of its 2x4 PE tiles; 72% of weights zero"
    }
