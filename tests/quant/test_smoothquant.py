"""SmoothQuant: migration leaves float outputs unchanged; W8A8 with dynamic activations."""

import copy
import warnings

import pytest
import torch

import compactnn
from compactnn.core.context import CompressContext
from compactnn.errors import CompactnnError
from compactnn.models.tiny_hf import outputs, tiny_model
from compactnn.quant.smoothquant import smooth_model, smooth_scale

warnings.filterwarnings("ignore", message=".*calibration samples")


def test_migration_leaves_float_outputs_unchanged():
    model, calib = tiny_model("opt")
    ref = outputs(model, calib[0])
    m = copy.deepcopy(model)
    names = [n for n, x in m.named_modules() if isinstance(x, torch.nn.Linear)]
    done = smooth_model(m, names, 0.8, CompressContext(batches=calib, progress=False))
    assert done >= 4  # per layer: norm -> qkv, norm -> fc1, v -> out_proj, fc1 -> fc2 (ReLU)
    changed = m.model.decoder.layers[0].self_attn_layer_norm.weight
    assert not torch.equal(changed, model.model.decoder.layers[0].self_attn_layer_norm.weight)
    torch.testing.assert_close(outputs(m, calib[0]), ref, rtol=1e-4, atol=1e-4)


def test_smooth_scale_formula():
    xmax, w = torch.tensor([4.0, 1.0]), torch.tensor([[1.0, 4.0]])
    s = smooth_scale(xmax, [w], 0.5)
    torch.testing.assert_close(s, torch.tensor([2.0, 0.5]))  # sqrt(4/1), sqrt(1/4)


def test_w8a8_smoothquant_close_and_round_trips(tmp_path):
    model, calib = tiny_model("llama")
    q = compactnn.compress(model, "w8a8-smoothquant", calib_data=calib, progress=False)
    ref, out = outputs(model, calib[0]), outputs(q, calib[0])
    assert float((out - ref).norm() / ref.norm()) < 0.03
    assert q._compactnn["extra"]["dynamic_act"]
    compactnn.save(q, tmp_path / "a")
    loaded = compactnn.load(tmp_path / "a")
    assert torch.equal(outputs(loaded, calib[0]), out)


def test_smoothquant_needs_activation_bits():
    with pytest.raises(CompactnnError, match="w8a8-smoothquant"):
        compactnn.compress(tiny_model("opt")[0], "w8-smoothquant", progress=False)
