"""Block tuning after GPTQ: codes unchanged, scales moved, calibration error not worse."""

import dataclasses
import warnings

import torch

import compactnn
from compactnn.models.tiny_hf import outputs, tiny_model
from compactnn.recipe import Recipe, Step, resolve_recipe

warnings.filterwarnings("ignore", message=".*calibration samples")


def test_tuning_keeps_codes_and_lowers_calibration_error():
    model, calib = tiny_model("opt")
    base = resolve_recipe("w2-g32-gptq_tune").steps[0].config
    tuned_cfg = dataclasses.replace(base, tune_steps=40, tune_lr=3e-3)
    plain_cfg = dataclasses.replace(base, tune_steps=0)
    tuned = compactnn.compress(model, Recipe("t", (Step("gptq_tune", tuned_cfg),)), calib,
                               progress=False)  # fmt: skip
    plain = compactnn.compress(model, Recipe("p", (Step("gptq_tune", plain_cfg),)), calib,
                               progress=False)  # fmt: skip
    name = "model.decoder.layers.0.self_attn.q_proj"  # first block: same inputs in both runs
    a, b = tuned.get_submodule(name), plain.get_submodule(name)
    assert torch.equal(a.weight_codes, b.weight_codes)
    assert not torch.equal(a.weight_scale, b.weight_scale)
    ref = torch.cat([outputs(model, c) for c in calib])

    def err(m):
        return float((torch.cat([outputs(m, c) for c in calib]) - ref).norm() / ref.norm())

    assert err(tuned) < err(plain)
