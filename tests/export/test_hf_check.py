"""Checks of exported Hugging Face models: the probe input matches the model (token ids or
an image), and layers the formats have no form for are named with the ``--ignore`` fix."""

from __future__ import annotations

import pytest
import torch

import compactnn
from compactnn.errors import CompactnnError

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")
hf_check = pytest.importorskip("compactnn.export.hf_check")
ctensors = pytest.importorskip("compactnn.export.ctensors")
onnx_hf = pytest.importorskip("compactnn.export.onnx_hf")

PATCH = "vit.embeddings.patch_embeddings.projection"


def tiny_vit(seed: int = 0):
    """A random ViT classifier on 3 x 32 x 32 images, and calibration batches."""
    torch.manual_seed(seed)
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=1,
        num_attention_heads=4, intermediate_size=128, num_labels=5,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(seed + 1)
    calib = [{"pixel_values": torch.randn(4, 3, 32, 32, generator=gen)} for _ in range(2)]
    return transformers.ViTForImageClassification(config).eval(), calib


@pytest.fixture(scope="module")
def vit():
    return tiny_vit()


def test_an_image_model_is_probed_with_images_of_its_config_size(vit):
    model, _ = vit
    inputs = hf_check.probe_inputs(model)
    assert list(inputs) == ["pixel_values"]
    assert inputs["pixel_values"].shape == (2, 3, 32, 32)
    assert torch.equal(inputs["pixel_values"], hf_check.probe_inputs(model)["pixel_values"])


def test_models_without_a_buildable_input_are_refused_in_one_line():
    from types import SimpleNamespace

    images = torch.nn.Linear(2, 2)
    images.main_input_name, images.config = "pixel_values", SimpleNamespace(num_channels=3)
    with pytest.raises(CompactnnError, match="no image_size / num_channels"):
        hf_check.probe_inputs(images)
    audio = torch.nn.Linear(2, 2)
    audio.main_input_name, audio.config = "input_features", SimpleNamespace()
    with pytest.raises(CompactnnError, match="reads 'input_features', not token ids"):
        hf_check.probe_inputs(audio)


def test_a_vit_with_a_float_patch_embedding_goes_to_compressed_tensors(vit, tmp_path):
    model, calib = vit
    q = compactnn.compress(model, "w4-g32", calib_data=calib, ignore=[PATCH], progress=False)
    assert ctensors.can_export(q) is None
    folder = ctensors.export(q, tmp_path / "ct")  # raised AttributeError (num_embeddings)
    loaded = transformers.ViTForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        sim, got = q(**calib[1]).logits, loaded(**calib[1]).logits
    assert torch.allclose(got, sim, atol=1e-5, rtol=0)


def test_smoothquant_refuses_per_token_grids_on_the_patch_embedding(vit):
    """Its per-token grid on a convolution's input would be one grid per row of pixels."""
    model, calib = vit
    with pytest.raises(CompactnnError, match=f"'{PATCH}'.*targets.ignore"):
        compactnn.compress(model, "w8a8-smoothquant", calib_data=calib, progress=False)


@pytest.mark.parametrize("recipe", ["w4-g32-gptq"])
def test_a_quantized_patch_embedding_is_named_with_the_ignore_fix(vit, recipe):
    model, calib = vit
    q = compactnn.compress(model, recipe, calib_data=calib, progress=False)
    for reason in (ctensors.can_export(q), onnx_hf.can_export(q)):
        assert f"{PATCH}: QuantConv2d" in reason
        assert f"--ignore {PATCH}" in reason and f"ignore=['{PATCH}']" in reason
        assert recipe not in reason  # not the recipe the user already used
    with pytest.raises(CompactnnError, match=f"--ignore {PATCH}"):
        q.save_pretrained("never-written")
