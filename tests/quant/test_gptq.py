"""GPTQ's config, short name and hooks (the solver is tested in tests/core/test_gptq_solver.py)."""

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
