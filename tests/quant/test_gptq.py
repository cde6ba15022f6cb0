"""GPTQ's config, short name and hooks (the solver is tested in tests/core/test_gptq_solver.py)."""

import dataclasses

import pytest

from compactnn.errors import CompactnnError
from compactnn.quant.gptq import GPTQConfig, gptq_hooks


def test_gptq_config_validation_and_short_name():
    with pytest.raises(CompactnnError, match="damp"):
        GPTQConfig(damp=2.0)
    from compactnn.recipe import resolve_recipe

    step = resolve_recipe("w4-g128-gptq").steps[0]
    assert step.method == "gptq" and step.config.weight.group_size == 128
    assert step.config.weight.range_method == "mse"


def test_hooks_follow_the_config():
    plain = gptq_hooks(GPTQConfig())
    assert plain.before_block is plain.after_block is plain.after_stack is None
    full = gptq_hooks(GPTQConfig(awq=True, tune_steps=3))
    assert full.before_block is not None and full.after_block is not None
    assert full.after_stack is None  # end-to-end tuning is gptq_tune's


def test_gptq_with_awq_notes_the_pairs_awq_scales():
    """GPTQ with ``awq=True`` runs AWQ's scaling: its notes count the very pairs AWQ's own
    run scales on the same model."""
    import warnings

    import compactnn
    from compactnn.models.tiny_hf import tiny_model
    from compactnn.recipe import Recipe, Step, resolve_recipe

    def pair_notes(method, config):
        model, calib = tiny_model("llama")
        recipe = Recipe(f"{method}-notes", (Step(method, config),))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*calibration samples")
            q = compactnn.compress(model, recipe, calib_data=calib[:2], progress=False)
        return [n.split(": ", 1)[1] for n in q._compactnn["notes"] if "producer/consumer" in n]

    awq = dataclasses.replace(resolve_recipe("w4-g32-awq").steps[0].config, grid=2)
    gptq = dataclasses.replace(resolve_recipe("w4-g32-gptq").steps[0].config, awq=True)
    want = pair_notes("awq", awq)
    assert len(want) == 1 and int(want[0].split()[0]) >= 2
    assert pair_notes("gptq", gptq) == want
