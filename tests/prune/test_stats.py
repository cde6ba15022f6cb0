"""Parameter and MAC counts recorded by every pruning method, and printed by the CLI."""

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import compactnn
from compactnn.cli import main
from compactnn.prune.stats import count_macs, count_params


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    ).eval()


def hand_macs(c1_out: int, c2_out: int) -> int:
    """MACs on one (1, 3, 8, 8) input: out.numel() * fan-in for each layer."""
    return 64 * c1_out * 3 * 9 + 64 * c2_out * c1_out * 9 + c2_out * 4


X = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("recipe", ["sp50", "nm2:4", "sp50-wanda", "sp50-sparsegpt"])
def test_unstructured_pruning_records_params_nonzeros_and_macs(recipe):
    m = cnn()
    p = compactnn.compress(m, recipe, calib_data=X, progress=False)
    method = next(iter(compactnn.info_of(p)["extra"]["pruning"]))
    stats = compactnn.info_of(p)["extra"]["pruning"][method]
    dense = 8 * 3 * 9 + 8 + 16 * 8 * 9 + 16 + 16 * 4 + 4
    assert (
        stats["params"]
        == {"before": dense, "after": dense}
        == {
            "before": count_params(m),
            "after": count_params(p),
        }
    )
    assert stats["macs"] == {"before": 16 * hand_macs(8, 16), "after": count_macs(p, X)}
    nonzero = sum(int((t != 0).sum()) for t in p.parameters())
    assert stats["nonzero"] == {"before": dense, "after": nonzero}
    assert nonzero < 0.75 * dense


def test_channel_pruning_records_the_macs_it_removes():
    m = cnn()
    p = compactnn.compress(m, "ch50", calib_data=X, progress=False)
    c1, c2 = p[0].out_channels, p[2].out_channels
    assert (c1, c2) != (8, 16)
    stats = compactnn.info_of(p)["extra"]["pruning"]["channel"]
    assert stats["macs"] == {"before": 16 * hand_macs(8, 16), "after": 16 * hand_macs(c1, c2)}
    assert stats["macs"]["after"] == count_macs(p, X)
    assert stats["params"] == {"before": count_params(m), "after": count_params(p)}


def test_no_counts_without_a_calibration_batch():
    p = compactnn.compress(cnn(), "sp50", progress=False)
    stats = compactnn.info_of(p)["extra"]["pruning"]["magnitude"]
    assert "macs" not in stats and "params" not in stats and stats["0"] == 0.5


def test_compress_command_prints_counts_and_ignore_mistakes_are_one_line(
    tmp_path, monkeypatch, capsys
):
    (tmp_path / "stats_cli_factory.py").write_text(_FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    save_file(cnn().state_dict(), tmp_path / "w.safetensors")
    save_file({"x": X}, tmp_path / "x.safetensors")
    args = ["compress", "stats_cli_factory:make", "--weights", str(tmp_path / "w.safetensors")]
    args += ["--data", str(tmp_path / "x.safetensors"), "--no-progress"]
    out = tmp_path / "o"
    assert main([*args, "--recipe", "ch50", "--out", str(out), "--ignore", "0"]) == 0
    printed = capsys.readouterr().out
    p = compactnn.load(out, model=cnn())
    assert p[0].out_channels == 8 and p[2].out_channels < 16  # the stem was ignored
    c2 = p[2].out_channels
    params, macs = count_params(p), 16 * hand_macs(8, c2)
    assert params == 8 * 3 * 9 + 8 + c2 * 8 * 9 + c2 + c2 * 4 + 4 < 1000
    assert macs == count_macs(p, X) < 1e6
    want = f"pruning (channel): params 1.5k -> {params}, MACs 1.4M -> {macs / 1e3:.1f}k"
    want += " (whole first calibration batch)\n"
    assert want in printed
    rc = main([*args, "--recipe", "nm2:4", "--out", str(tmp_path / "b"), "--ignore", "conv1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ignore: 'conv1' matches no module")
    assert len(err.strip().splitlines()) == 1


_FACTORY = """
import torch
from torch import nn


def make():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )
"""
