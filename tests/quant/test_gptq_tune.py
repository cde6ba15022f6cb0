"""Tuning after GPTQ: learned rounding moves codes by at most one step, the per-block and
end-to-end stages lower the error against the float model (the pure pieces are tested in
tests/engines/test_block_tuning.py)."""

import dataclasses
import warnings

import torch

import compactnn
from compactnn.models.tiny_hf import outputs, tiny_model
from compactnn.recipe import Recipe, Step, resolve_recipe

warnings.filterwarnings("ignore", message=".*calibration samples")
Q_PROJ = "model.decoder.layers.0.self_attn.q_proj"  # first block: same inputs in every run


def _compress(model, calib, **overrides):
    base = resolve_recipe("w2-g32-gptq_tune").steps[0].config
    cfg = dataclasses.replace(base, **overrides)
    return compactnn.compress(model, Recipe("t", (Step("gptq_tune", cfg),)), calib, progress=False)


def _error(model, reference, calib) -> float:
    ref = torch.cat([outputs(reference, c) for c in calib])
    out = torch.cat([outputs(model, c) for c in calib])
    return float((out - ref).norm() / ref.norm())


def test_block_tuning_moves_codes_at_most_one_step_and_lowers_error():
    model, calib = tiny_model("opt")
    tuned = _compress(model, calib, tune_steps=40, e2e_steps=0, tune_rounding=True)
    plain = _compress(model, calib, tune_steps=0, e2e_steps=0)
    a, b = tuned.get_submodule(Q_PROJ), plain.get_submodule(Q_PROJ)
    step = (a.weight_codes.int() - b.weight_codes.int()).abs()
    assert int(step.max()) == 1  # some codes moved, none by more than one grid step
    assert not torch.equal(a.weight_scale, b.weight_scale)
    assert _error(tuned, model, calib) < _error(plain, model, calib)


def test_block_tuning_without_rounding_keeps_codes():
    model, calib = tiny_model("opt")
    tuned = _compress(model, calib, tune_steps=40, e2e_steps=0, tune_rounding=False)
    plain = _compress(model, calib, tune_steps=0, e2e_steps=0)
    a, b = tuned.get_submodule(Q_PROJ), plain.get_submodule(Q_PROJ)
    assert torch.equal(a.weight_codes, b.weight_codes)
    assert _error(tuned, model, calib) < _error(plain, model, calib)


def test_end_to_end_stage_keeps_codes_and_lowers_stack_error():
    model, calib = tiny_model("llama")
    tuned = _compress(model, calib, tune_steps=0, e2e_steps=60, e2e_lr=3e-3)
    plain = _compress(model, calib, tune_steps=0, e2e_steps=0)
    record = tuned._compactnn["extra"]["calibration"]["GPTQTuneConfig"]
    before, after = record["e2e_relative_error"]
    assert after < before
    for name, m in tuned.named_modules():
        if hasattr(m, "weight_codes"):
            assert torch.equal(m.weight_codes, plain.get_submodule(name).weight_codes)
    assert _error(tuned, model, calib) < _error(plain, model, calib)
