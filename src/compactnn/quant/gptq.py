"""GPTQ (Frantar et al. 2022): quantize a weight column by column, pushing each column's
rounding error onto the columns not yet quantized through the inverse Hessian of the layer's
calibration inputs.

The math lives in pure functions (:mod:`compactnn.core.gptq_solver`); the handler runs them
block by block through the block-sequential engine (:mod:`compactnn.engines.sequential`), so
only one transformer block's calibration activations are held at a time.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import nn

from compactnn.core.context import CompressContext
from compactnn.engines.block_scaling import ScaledPairs
from compactnn.engines.gptq_common import GPTQBaseConfig, gptq_block_hooks
from compactnn.engines.sequential import BlockHooks, run_sequential
from compactnn.registry import register


@dataclasses.dataclass(frozen=True)
class GPTQConfig(GPTQBaseConfig):
    """GPTQ settings; every field is described in :class:`GPTQBaseConfig` (``damp``,
    ``act_order``, ``block_size``, ``awq``, ``tune_steps``, ``tune_lr``, ``tune_rounding``).

    Example:
        >>> GPTQConfig(damp=0.05).act_order
        True
    """

    group_act: ClassVar[bool] = True  # act granularity 'group' (MatMulNBits level 4)


def gptq_hooks(config: GPTQConfig, pairs: ScaledPairs | None = None) -> BlockHooks:
    """GPTQ per layer; AWQ scaling before (its pairs appended to ``pairs`` when given) and
    tuning after each block when asked for.

    Example:
        >>> gptq_hooks(GPTQConfig()).before_block is None
        True
    """
    return gptq_block_hooks(config, pairs)


@register("gptq", GPTQConfig, "GPTQ: second-order error compensation, block by block")
def apply_gptq(
    model: nn.Module, targets: dict[str, nn.Module], config: GPTQConfig, ctx: CompressContext
) -> nn.Module:
    """GPTQ (optionally with AWQ scaling and block tuning) over the model's repeated blocks;
    with ``awq``, the notes count the pairs scaled and name each pair left as is."""
    ctx.require_calibration("gptq", 128)
    pairs = ScaledPairs()
    model = run_sequential(model, targets, config, ctx, gptq_hooks(config, pairs))
    if config.awq:
        ctx.notes.extend(pairs.notes("gptq (awq)"))
    return model
