"""AWQ (Lin et al. 2023): activation-aware per-input-channel scaling before quantization.

For a group of linear layers reading one tensor ``x`` produced by a foldable op (a norm, or a
linear layer through an op linear in it: v -> o, up -> down, fc1 -> ReLU -> fc2), the weight
columns are multiplied by ``s = mean|x|^alpha`` and the producer's output divided by ``s``:
the float function is unchanged, but salient input channels get finer quantization. ``alpha``
is searched per group to minimise the quantized groups' output error. Each candidate pair is
first checked numerically (a random scale must leave the block's output unchanged), so the
method never changes a model it does not understand: post-norm encoders such as BERT, whose
norm output also feeds the residual, keep their norms untouched (see
:mod:`compactnn.core.scale_fold` and :mod:`compactnn.engines.block_scaling`).

Weights are then rounded to nearest, with each group's clipping range searched to minimise
the activation-weighted error (AWQ's clip search), block by block through the block-sequential
engine. The compress notes count the pairs scaled and name each candidate pair left as is
(Phi's ``fc1 -> GELU -> fc2``: GELU is not linear per channel).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import nn

from compactnn.core.context import CompressContext
from compactnn.engines.block_scaling import ScaledPairs, awq_scaling
from compactnn.engines.sequential import BlockHooks, hessian_rtn_solver, run_sequential
from compactnn.errors import CompactnnError
from compactnn.quant.base import QuantConfig
from compactnn.registry import register


@dataclasses.dataclass(frozen=True)
class AWQConfig(QuantConfig):
    """AWQ settings.

    Args:
        grid: number of ``alpha`` values tried in ``[0, 1)``.
        max_tokens: calibration tokens used by the scale search of one group.
    """

    needs_calibration: ClassVar[bool] = True

    grid: int = 20
    max_tokens: int = 4096

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.grid < 1 or self.max_tokens < 16:
            raise CompactnnError("AWQ needs grid >= 1 and max_tokens >= 16.")

    @classmethod
    def from_short(cls, wbits, abits, group, range_method="mse", **kwargs):
        """Short names ``w<W>[-g<G>]-awq``: asymmetric groups, activation-weighted clip search."""
        return super().from_short(wbits, abits, group, range_method=range_method, **kwargs)


def awq_hooks(config: AWQConfig, pairs: ScaledPairs | None = None) -> BlockHooks:
    """AWQ scaling before each block, then activation-weighted round-to-nearest per layer;
    the pairs scaled and skipped are appended to ``pairs`` when given.

    Example:
        >>> awq_hooks(AWQConfig()).after_block is None
        True
    """
    return BlockHooks(
        solve_layer=hessian_rtn_solver,
        before_block=awq_scaling(config.grid, config.max_tokens, pairs),
    )


@register("awq", AWQConfig, "AWQ: activation-aware channel scaling + clip search, per block")
def apply_awq(
    model: nn.Module, targets: dict[str, nn.Module], config: AWQConfig, ctx: CompressContext
) -> nn.Module:
    """AWQ scales folded into the model, then activation-weighted round-to-nearest; the notes
    count the pairs scaled and name each pair left as is."""
    ctx.require_calibration("awq", 64)
    pairs = ScaledPairs()
    model = run_sequential(model, targets, config, ctx, awq_hooks(config, pairs))
    ctx.notes.extend(pairs.notes("awq"))
    return model
