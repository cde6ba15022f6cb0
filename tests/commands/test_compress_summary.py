"""What ``compactnn compress`` prints about the result: each layer once (pruned, quantized,
kept in float), the pruning counts, Probe Pruning, the methods' notes, and the note that a
training-aware recipe is not trained here."""

from __future__ import annotations

import numpy as np
import pytest

from tests.commands._compress_cli import run_cli


def test_pruned_layers_names_sparsity_and_removed_channels():
    from torch import nn

    from compactnn.commands.compress_summary import pruned_layers

    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    extra = {
        "pruning": {"wanda": {"1": 0.5, "params": {"before": 1, "after": 1}}},
        "resized": {"0": {"kind": "Linear", "in_features": 4, "out_features": 6}},
    }
    assert pruned_layers(extra, model) == {
        "1": "50% of weights zero",
        "0": "2 of 8 output channels removed",
    }
    assert pruned_layers({}, model) == {}


TINY_FACTORY = """
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
"""


@pytest.fixture
def tiny_project(tmp_path, monkeypatch):
    """``tiny_cli_factory:make`` (a small CNN), its ``w.safetensors`` and ``x.npy`` (16 8x8
    inputs), in ``tmp_path`` as the working folder."""
    from safetensors.torch import save_file

    (tmp_path / "tiny_cli_factory.py").write_text(TINY_FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import tiny_cli_factory  # the module the CLI imports

    save_file(tiny_cli_factory.make().state_dict(), "w.safetensors")
    np.save("x.npy", np.random.default_rng(0).standard_normal((16, 1, 8, 8), dtype=np.float32))
    return tmp_path


@pytest.mark.parametrize(("recipe", "noted"), [("w4a4-lsq", True), ("w8a8", False)])
def test_a_training_recipe_says_compress_does_not_train_it(recipe, noted, tiny_project, capsys):
    code, _out, err = run_cli(
        capsys, "compress", "tiny_cli_factory:make", "--weights", "w.safetensors",
        "-r", recipe, "--data", "x.npy", "--out", "art", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    said = f"note: {recipe} is a training-aware recipe; compress calibrates it without training"
    assert (said in err) is noted
    assert ("compactnn train tiny_cli_factory:make --recipe w4a4-lsq" in err) is noted


def test_a_recipe_that_trains_inside_compress_is_not_told_to_train(capsys):
    """TernaryBERT distils on the calibration text inside compress; `compactnn train`
    takes classifiers only, so pointing there would mislead."""
    import compactnn
    from compactnn.commands.compress import note_training_recipe

    note_training_recipe(compactnn.resolve_recipe("w2a8-ternarybert"), "minilm", "w2a8-ternarybert")
    assert capsys.readouterr().err == ""
    note_training_recipe(compactnn.resolve_recipe("w2a8-twn"), "m", "w2a8-twn")
    assert "compactnn train m --recipe w2a8-twn" in capsys.readouterr().err


def test_the_training_hint_names_the_data_given(capsys):
    """With --data given the hint trains on it (not a TRAIN_DATA placeholder); without it
    (or data-free images) the placeholder stays."""
    import compactnn
    from compactnn.commands.compress import note_training_recipe

    recipe = compactnn.resolve_recipe("w4a4-lsq")
    note_training_recipe(recipe, "m.py:f", "w4a4-lsq", "my data.safetensors")
    err = capsys.readouterr().err
    assert "compactnn train m.py:f --recipe w4a4-lsq --data 'my data.safetensors'" in err
    assert "TRAIN_DATA" not in err and "calibrated only, not trained" in err
    for data in (None, "data-free"):
        note_training_recipe(recipe, "m.py:f", "w4a4-lsq", data)
        assert "--recipe w4a4-lsq --data TRAIN_DATA" in capsys.readouterr().err


def test_a_pruned_then_quantized_layer_is_listed_as_both(tiny_project, capsys):
    tmp_path = tiny_project
    (tmp_path / "r.yaml").write_text(
        "steps:\n"
        "  - method: magnitude\n    targets: {names: ['3']}\n    config: {sparsity: 0.5}\n"
        "  - method: rtn\n    config: {weight: {bits: 8}}\n"
    )
    code, out, err = run_cli(
        capsys, "compress", "tiny_cli_factory:make", "--weights", "w.safetensors",
        "-r", "r.yaml", "--data", "x.npy", "--out", "art", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    assert "    3: pruned (50% of weights zero), then quantized\n" in out
    assert "    0: quantized, not pruned\n" in out  # every layer listed once
    assert "quantized layers: 2 (1 of them pruned first); kept in float: 0\n" in out


CH50_THEN_W8A8 = """\
name: ch50-w8a8
steps:
  - method: channel
    config: {ratio: 0.5}
  - method: rtn
    config: {weight: {bits: 8, symmetric: true}, act: {bits: 8, symmetric: false}}
"""


@pytest.mark.parametrize("recipe", ["ch50", "ch50-w8a8.yaml"])
def test_the_summary_counts_each_layer_once_and_lists_it_once(tiny_project, capsys, recipe):
    """Channel pruning: the counts partition the model's weight layers (a pruned float layer
    was counted as pruned and kept in float), and each layer has one line: its output
    channels removed as the float model's and the artifact's shapes say, or why not."""
    import tiny_cli_factory

    import compactnn

    (tiny_project / "ch50-w8a8.yaml").write_text(CH50_THEN_W8A8)
    code, out, err = run_cli(
        capsys, "compress", "tiny_cli_factory:make", "--weights", "w.safetensors",
        "-r", recipe, "--data", "x.npy", "--out", "art", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    model = tiny_cli_factory.make()
    art = compactnn.load("art", model=model)
    before, after = model[0].out_channels, art[0].out_channels
    what = f"pruned ({before - after} of {before} output channels removed)"
    layers = ("0", "3")
    listed = [line.split(":")[0].strip() for line in out.splitlines() if line.startswith("    ")]
    assert sorted(listed) == sorted(layers)
    if recipe == "ch50":
        assert f"    0: {what}, weights in float\n" in out
        assert "    3: channel pruning skipped it (its output channels are the model's" in out
        assert "  quantized layers: 0; pruned layers: 1; kept in float: 1\n" in out
        saved = compactnn.info_of(art)["float_layers"]
        assert saved["0"] == f"{what}, weights in float"  # the record says what the summary does
    else:
        assert all(hasattr(art.get_submodule(n), "weight_codes") for n in layers)
        assert f"    0: {what}, then quantized\n" in out and "    3: quantized, not pruned\n" in out
        assert "  quantized layers: 2 (1 of them pruned first); kept in float: 0\n" in out


def test_probe_pruned_mlps_are_listed_as_pruned_with_their_macs(tmp_path, capsys, monkeypatch):
    """pp30 slices each MLP's projections per input: the summary lists them as probe-pruned
    (not "not targeted"), and prints parameters and MACs before and after, counted by hand
    from the model's dimensions on the first calibration batch (the whole file here)."""
    import math

    import torch

    from compactnn.commands.compress_summary import human_count
    from compactnn.models.tiny_hf import tiny_model

    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    model, _ = tiny_model("llama")
    model.save_pretrained("llama")
    rows, length = 32, 24
    ids = np.random.default_rng(0).integers(4, 128, (rows, length))
    np.save("ids.npy", ids)
    code, out, err = run_cli(
        capsys, "compress", "llama", "-r", "pp30", "-d", "ids.npy", "-o", "art", "--no-progress"
    )
    assert code == 0, err
    c = model.config
    width, hidden = c.intermediate_size, c.hidden_size
    dropped = math.floor(0.3 * width)
    mlps = [f"model.layers.{i}.mlp" for i in range(c.num_hidden_layers)]
    probed = [f"{m}.{p}" for m in mlps for p in ("gate_proj", "up_proj", "down_proj")]
    for name in probed:
        assert (
            f"    {name}: probe-pruned (dynamic: {dropped} of the MLP's {width} hidden "
            "channels skipped, chosen per sample by a probe)\n"
        ) in out
        assert f"{name}: not targeted" not in out
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    kept_float = len(layers) - len(probed)  # the embedding, attention and head: untouched
    assert f"quantized layers: 0; pruned layers: 6; kept in float: {kept_float}\n" in out
    # per token: attention q, k, v, o; the MLP's three products; the head
    kv = c.num_key_value_heads * hidden // c.num_attention_heads
    attn = hidden * hidden * 2 + hidden * kv * 2
    mlp = 3 * hidden * width
    tokens = rows * length
    dense = tokens * (c.num_hidden_layers * (attn + mlp) + hidden * c.vocab_size)
    probe = 2 * max(2, math.ceil(0.15 * length)) / (3 * length)  # per sample: every row
    after = dense - tokens * len(mlps) * mlp * (dropped / width - probe)
    params = human_count(sum(p.numel() for p in model.parameters()))
    assert (
        f"  pruning (probe): params {params} -> {params} (weights kept whole, sliced at run "
        f"time), MACs {human_count(dense)} -> {human_count(after)} (2 MLPs skip 30% of their "
        f"hidden channels; the probe adds {probe:.1%} of their dense MACs; first calibration "
        f"batch, {rows} x {length})\n"
    ) in out


CLE_THEN_NM = """\
name: cle-nm
steps:
  - method: cle
  - method: nm
    config: {n: 2, m: 4}
"""


def test_the_methods_notes_are_printed_once_under_their_heading(tiny_project, capsys):
    """A step's notes (``info_of(model)["notes"]``: here CLE's equalized pairs) print under
    "notes:"; those also warned (nm keeps the 9-input stem dense) are not printed twice.
    The reference: the same compress through the Python API, its notes and its warnings."""
    import warnings

    import tiny_cli_factory
    import torch

    import compactnn

    (tiny_project / "cle-nm.yaml").write_text(CLE_THEN_NM)
    code, out, err = run_cli(
        capsys, "compress", "tiny_cli_factory:make", "--weights", "w.safetensors",
        "-r", "cle-nm.yaml", "--data", "x.npy", "--out", "art", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    x = torch.from_numpy(np.load("x.npy"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = compactnn.compress(tiny_cli_factory.make(), "cle-nm.yaml", calib_data=x, progress=False)
    warned = {str(w.message) for w in caught}
    notes = compactnn.info_of(q)["notes"]
    plain = [n for n in notes if n not in warned]
    assert plain[0].startswith("cle: equalized") and len(plain) < len(notes)  # the premise
    section = out.split("\n  notes:\n")[1].split("  artifact:")[0]
    assert section == "".join(f"    {n}\n" for n in plain)
    for note in warned & set(notes):
        assert f"warning: {note}" in err and note not in out
