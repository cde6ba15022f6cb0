"""AWQ: its config, its hooks, and a run that scales the float blocks without changing them."""

import warnings

import pytest
import torch

from compactnn.core.context import CompressContext
from compactnn.core.spec import QuantSpec
from compactnn.engines.block_scaling import awq_block
from compactnn.engines.sequential import capture_block_inputs, find_blocks, hessian_rtn_solver
from compactnn.errors import CompactnnError
from compactnn.models.tiny_hf import outputs, tiny_model
from compactnn.quant.awq import AWQConfig, awq_hooks
from compactnn.recipe import resolve_recipe

warnings.filterwarnings("ignore", message=".*calibration samples")


def test_config_validation_short_name_and_hooks():
    with pytest.raises(CompactnnError, match="grid"):
        AWQConfig(grid=0)
    config = resolve_recipe("w4-g32-awq").steps[0].config
    assert isinstance(config, AWQConfig) and config.weight.range_method == "mse"
    hooks = awq_hooks(config)
    assert hooks.solve_layer is hessian_rtn_solver
    assert hooks.before_block is not None and hooks.after_block is hooks.after_stack is None


def test_awq_block_scales_pairs_and_keeps_the_float_block():
    model, calib = tiny_model("llama")
    ref = outputs(model, calib[0])
    prefix, blocks = find_blocks(model)
    calls = capture_block_inputs(model, blocks[0], CompressContext(batches=calib[:2]))
    hidden = [c[0][0] if c[0] else c[1]["hidden_states"] for c in calls]
    spec = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=32)
    specs = {f"{prefix}.0.{n}": (spec, None) for n, m in blocks[0].named_modules()
             if isinstance(m, torch.nn.Linear)}  # fmt: skip
    assert awq_block(blocks[0], f"{prefix}.0", specs, calls, hidden) >= 1
    torch.testing.assert_close(outputs(model, calib[0]), ref, rtol=1e-4, atol=1e-4)
