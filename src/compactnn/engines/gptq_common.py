"""The settings GPTQ shares with the methods built on it (``gptq``, ``gptq_tune``).

Both run the block-sequential engine with GPTQ's layer solver and may add AWQ scaling before
and tuning after each block (:func:`gptq_block_hooks`); ``gptq_tune`` adds stack tuning.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from compactnn.engines.block_scaling import ScaledPairs, awq_scaling
from compactnn.engines.block_tuning import block_tuning
from compactnn.engines.sequential import BlockHooks, gptq_solver
from compactnn.errors import CompactnnError
from compactnn.quant.base import QuantConfig


@dataclasses.dataclass(frozen=True)
class GPTQBaseConfig(QuantConfig):
    """GPTQ settings (the base of :class:`~compactnn.quant.gptq.GPTQConfig` and
    :class:`~compactnn.quant.gptq_tune.GPTQTuneConfig`).

    Args:
        damp: dampening added to the Hessian diagonal, as a fraction of its mean.
        act_order: quantize columns in order of decreasing Hessian diagonal.
        block_size: columns updated lazily together (speed only).
        awq: run an AWQ scale search (folded into the preceding norm / layer) first.
        tune_steps: Adam steps per block that tune the quantization scales and float biases
            against the float block's outputs after GPTQ (0: off).
        tune_lr: learning rate of that tuning.
        tune_rounding: the tuning also learns each integer code's rounding (a code moves by
            at most one grid step from GPTQ's choice).
    """

    needs_calibration: ClassVar[bool] = True

    damp: float = 0.01
    act_order: bool = True
    block_size: int = 128
    awq: bool = False
    tune_steps: int = 0
    tune_lr: float = 1e-3
    tune_rounding: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.damp < 1.0:
            raise CompactnnError(f"damp={self.damp} must lie in [0, 1); 0.01 is typical.")
        if self.block_size < 1 or self.tune_steps < 0:
            raise CompactnnError("block_size must be >= 1 and tune_steps >= 0.")

    @classmethod
    def from_short(cls, wbits, abits, group, range_method="mse", **kwargs):
        """Short names ``w<W>[-g<G>]-gptq``: asymmetric groups with searched ranges."""
        return super().from_short(wbits, abits, group, range_method=range_method, **kwargs)


def gptq_block_hooks(config: GPTQBaseConfig, pairs: ScaledPairs | None = None) -> BlockHooks:
    """GPTQ per layer; AWQ scaling before each block when ``awq`` (its pairs appended to
    ``pairs`` when given), block tuning after each block when ``tune_steps``."""
    return BlockHooks(
        solve_layer=gptq_solver(config.damp, config.act_order, config.block_size),
        before_block=awq_scaling(pairs=pairs) if config.awq else None,
        after_block=(
            block_tuning(config.tune_steps, config.tune_lr, config.tune_rounding)
            if config.tune_steps
            else None
        ),
    )
