"""``compactnn compress`` without data: a pruning recipe is pointed at pruning that needs
none, and ``--data data-free`` reads the model's ``input_shape`` and speaks CLI words."""

from __future__ import annotations

import pytest
from safetensors.torch import save_file

from tests.commands._compress_cli import assert_one_error_line, fake_generate, run_cli

SHAPED = (
    "import torch\nfrom torch import nn\n\n"
    "class Net(nn.Sequential):\n    input_shape = {shape}\n\n"
    "def make():\n    torch.manual_seed(0)\n"
    "    return Net(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), "
    "nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))\n"
)


def _project(tmp_path, monkeypatch, shape="(1, 8, 8)", name="shapednet"):
    (tmp_path / f"{name}.py").write_text(SHAPED.format(shape=shape))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    module = __import__(name)
    save_file(module.make().state_dict(), "w.safetensors")
    return [f"{name}:make", "--weights", "w.safetensors"]


@pytest.mark.parametrize(
    ("recipe", "suggested"), [("sp50-wanda", "sp50"), ("sp70-sparsegpt", "sp70")]
)
def test_a_pruning_recipe_without_data_suggests_magnitude_pruning_or_data_free(
    tmp_path, capsys, monkeypatch, recipe, suggested
):
    model = _project(tmp_path, monkeypatch)
    err = assert_one_error_line(
        capsys, ["compress", *model, "-r", recipe, "-o", "art"], "pass --data FILE"
    )
    assert f"prune without data: {suggested} (magnitude pruning" in err
    assert "--data data-free" in err and "weight-only" not in err
    err = assert_one_error_line(capsys, ["compress", *model, "-r", "w4a8", "-o", "art"], "--data")
    assert "weight-only recipe such as w8 or w4-g32" in err  # quantization: as before


def test_data_free_uses_the_models_input_shape_attribute(tmp_path, capsys, monkeypatch):
    from compactnn import datafree

    model = _project(tmp_path, monkeypatch, shape="(1, 8, 8)")
    made = []
    monkeypatch.setattr(datafree, "generate", fake_generate(made))
    argv = ["compress", *model, "-d", "data-free", "-r", "w4a8", "--no-progress"]
    code, _, err = run_cli(capsys, *argv, "-o", "a")
    assert code == 0, err
    assert made == [(1, 8, 8)]  # the attribute; no --input-shape needed
    code, _, err = run_cli(capsys, *argv, "-o", "b", "--input-shape", "1,12,12")
    assert code == 0, err
    assert made[-1] == (1, 12, 12)  # --input-shape wins


@pytest.mark.parametrize("given", ["1,28", "1,0,28", "1,2.5,28"])
def test_a_bad_input_shape_is_refused_in_command_line_words(tmp_path, capsys, monkeypatch, given):
    model = _project(tmp_path, monkeypatch, shape="None", name=f"plainnet{len(given)}")
    argv = ["compress", *model, "-d", "data-free", "-r", "w4a8", "-o", "art"]
    err = assert_one_error_line(
        capsys, [*argv, "--input-shape", given], f"--input-shape {given}: give the per-sample"
    )
    assert "e.g. --input-shape 1,28,28" in err and "input_shape=(" not in err


def test_a_bad_input_shape_attribute_is_named(tmp_path, capsys, monkeypatch):
    model = _project(tmp_path, monkeypatch, shape="(28, 28)", name="flatshapenet")
    argv = ["compress", *model, "-d", "data-free", "-r", "w4a8", "-o", "art"]
    err = assert_one_error_line(capsys, argv, "Net.input_shape=(28, 28): give the per-sample")
    assert "--input-shape 1,28,28" in err
