"""Sizes and per-layer formats of float and compressed models."""

from __future__ import annotations

import torch
from torch import nn

import compactnn
from compactnn.measure.size import artifact_bytes, float_artifact_bytes, layer_formats


def test_layer_formats_name_quantized_and_float_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 4))
    q = compactnn.compress(model, "w4a8", calib_data=torch.randn(8, 8), progress=False)
    formats = layer_formats(q)
    assert formats["2"] == "uint4-asym-channel / act uint8"
    assert formats["0"].startswith("int8-sym-channel")
    assert layer_formats(model) == {"0": "float32", "2": "float32", "3": "float32"}


def test_float_artifact_bytes_is_the_size_of_a_saved_float_model(tmp_path):
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    compactnn.save(model, tmp_path / "a")
    assert float_artifact_bytes(model) == artifact_bytes(tmp_path / "a")
