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


def test_a_deployed_artifact_is_as_big_as_its_model_whatever_its_verification_batch(tmp_path):
    from compactnn.deployment.ship import save_deployed
    from compactnn.measure.size import companion_bytes

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()  # fmt: skip
    small, big = torch.randn(8, 3, 8, 8), torch.randn(8, 3, 96, 96)
    q = compactnn.compress(model, "w8a8", calib_data=small, progress=False)
    compactnn.save(q, tmp_path / "q")
    fast = compactnn.deploy(q, "onednn", example=small)
    save_deployed(fast, tmp_path / "dep-small", example=small)
    save_deployed(fast, tmp_path / "dep-big", example=big)
    model_bytes = artifact_bytes(tmp_path / "q")
    assert companion_bytes(tmp_path / "q") == 0
    assert companion_bytes(tmp_path / "dep-big") > 8 * 3 * 96 * 96 * 4 > 10 * model_bytes
    for name in ("dep-small", "dep-big"):  # the model's bytes: only the header is bigger
        header = (tmp_path / name / "compactnn.json").stat().st_size
        extra = header - (tmp_path / "q" / "compactnn.json").stat().st_size
        assert 0 < extra < 2048 and artifact_bytes(tmp_path / name) == model_bytes + extra
    gap = artifact_bytes(tmp_path / "dep-big") - artifact_bytes(tmp_path / "dep-small")
    assert abs(gap) < 64  # the recorded shape and hash, not the batch
