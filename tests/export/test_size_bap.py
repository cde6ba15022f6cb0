"""Bits per weight as stored of binary augmented pruning artifacts: each BAP layer counts its
binary branch and its sparse branch (float16 values or the int8 twin) over its weights once."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import compactnn
from compactnn.export.artifact import parse_tensors, read_artifact
from compactnn.export.size import stored_bits
from compactnn.quant.bap import BAPConfig
from compactnn.recipe import Recipe, Step
from tests.quant.test_bap import _linear_model  # a layer whose BAP support is known


@pytest.mark.parametrize("value_bits", [16, 8])
def test_bap_layer_counts_both_branches_over_its_weights_once(tmp_path, value_bits):
    cfg = BAPConfig(act=None, first_last_bits=None, density=1 / 16, value_bits=value_bits)
    q = compactnn.compress(_linear_model(), Recipe("t", (Step("bap", cfg),)), progress=False)
    compactnn.save(q, tmp_path / "a")
    # codes 256 bits + levels 4x2 fp16 + 16 positions at 4-bit gaps; the bias is no weight
    common = 32 + 16 + 8
    values = 16 * 2 if value_bits == 16 else 16 * 1 + 4 * 2  # fp16, or int8 + fp16 scales
    bits = stored_bits(tmp_path / "a")
    assert set(bits) == {"0", "total"}  # one layer: no ".binary" / ".sparse" halves
    assert bits["0"] == pytest.approx(8 * (common + values) / 256)  # 2.75 / 2.5 bits
    assert bits["total"] == bits["0"]


def test_bap_cnn_total_is_every_stored_weight_byte_over_the_weights(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16, 5),
    ).eval()  # fmt: skip
    x = torch.randn(16, 3, 6, 6)
    for recipe in ("w1a8-bap", "w1a8-bap-sp95-int8"):
        q = compactnn.compress(m, recipe, calib_data=x, progress=False)
        compactnn.save(q, tmp_path / recipe)
        _, blobs = read_artifact(tmp_path / recipe)
        tensors = parse_tensors(blobs["tensors"], tmp_path / recipe)
        weight_bytes = sum(  # every stored tensor but biases and activation grids
            t.numel() * t.element_size()
            for k, t in tensors.items()
            if not k.endswith(".bias") and ".input." not in k
        )
        weights = sum(p.numel() for n, p in m.named_parameters() if n.endswith("weight"))
        bits = stored_bits(tmp_path / recipe)
        assert set(bits) == {"0", "2", "4", "7", "total"}
        assert bits["total"] == pytest.approx(8 * weight_bytes / weights)
