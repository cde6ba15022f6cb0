"""Sizes of pruned models: the bytes a recipe implies count the sparse storage, and the
float-weight list names the layers a pruning step zeroed (T1: sp50-wanda and nm2:4)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import compactnn
from compactnn.export.size import theoretical_size
from compactnn.measure.size import artifact_bytes, float_weight_layers, theoretical_bytes

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # few samples, collapse


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.Flatten(), nn.Linear(16 * 4 * 4, 4)
    ).eval()


def test_a_pruned_model_implies_fewer_bytes_than_its_artifact_holds(tmp_path):
    model = _cnn()
    calib = torch.randn(32, 1, 8, 8)
    for recipe in ("sp50-wanda", "nm2:4"):
        pruned = compactnn.compress(model, recipe, calib_data=calib, progress=False)
        compactnn.save(pruned, tmp_path / recipe)
        implied, disk = theoretical_bytes(pruned), artifact_bytes(tmp_path / recipe)
        assert implied < disk < theoretical_size(pruned), (recipe, implied, disk)
        assert disk - implied < 4096  # the header's bytes only, not half the weights
    assert theoretical_bytes(model) == theoretical_size(model)  # dense: unchanged


def test_two_of_four_float32_weights_take_17_bits_each():
    layer = nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        layer.weight.view(-1, 4)[:, 1:3] = 0
    assert theoretical_bytes(nn.Sequential(layer)) == 64 * 32 * 17 // 8


def test_float_weight_layers_names_the_layers_pruning_left_in_float():
    model = _cnn()
    calib = torch.randn(32, 1, 8, 8)
    wanda = compactnn.compress(model, "sp50-wanda", calib_data=calib, progress=False)
    assert compactnn.info_of(wanda)["float_layers"] == {}  # the record leaves them out
    found = float_weight_layers(wanda)
    assert found["0"] == "pruned only (wanda: 44% of its weights zeroed), weights in float"
    assert found["2"] == found["4"] == found["0"].replace("44%", "50%")
    # conv 0 has 9 inputs: 2:4 keeps it dense, with its own reason
    nm = compactnn.compress(model, "nm2:4", calib_data=calib, progress=False)
    found = float_weight_layers(nm)
    assert found["0"].startswith("nm 2:4 kept it dense")
    assert (
        found["2"] == found["4"] == "pruned only (nm: 50% of its weights zeroed), weights in float"
    )


def test_float_weight_layers_leaves_out_quantized_layers():
    model = _cnn()
    q = compactnn.compress(model, "w8a8", calib_data=torch.randn(32, 1, 8, 8), progress=False)
    assert float_weight_layers(q) == {}
