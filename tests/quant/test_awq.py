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
    pairs = awq_block(blocks[0], f"{prefix}.0", specs, calls, hidden)
    assert pairs.scaled and not pairs.skipped  # Llama: every candidate pair folds exactly
    assert all(p.startswith(f"{prefix}.0.") for p in pairs.scaled)
    torch.testing.assert_close(outputs(model, calib[0]), ref, rtol=1e-4, atol=1e-4)


def test_notes_count_scaled_pairs_and_name_the_skipped_ones():
    """Phi's fc1 -> GELU -> fc2 is a candidate pair that does not fold: the notes name it in
    every block and count the pairs that were scaled."""
    import dataclasses

    import compactnn
    from compactnn.recipe import Recipe, Step

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.PhiConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    _, calib = tiny_model("llama")
    config = dataclasses.replace(resolve_recipe("w4-g32-awq").steps[0].config, grid=4)
    recipe = Recipe("w4-g32-awq-grid4", (Step("awq", config),))
    q = compactnn.compress(model, recipe, calib_data=calib[:2], progress=False)
    notes = [n for n in q._compactnn["notes"]
             if n.startswith("awq: ") and ("->" in n or n.endswith("pairs scaled"))]  # fmt: skip
    skipped = [f"awq: model.layers.{i}.mlp.fc1 -> ['model.layers.{i}.mlp.fc2'] not foldable, "
               "left as is" for i in range(2)]  # fmt: skip
    assert notes[:2] == skipped
    assert len(notes) == 3 and notes[2].endswith("pairs scaled")
    assert int(notes[2].split()[1]) >= 2  # each block's input_layernorm -> [q, k, v, fc1]
