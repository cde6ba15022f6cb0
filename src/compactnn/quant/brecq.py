"""BRECQ (Li et al. 2021): AdaRound at block granularity, with learned activation steps.

A block is a module such as a residual block (at most ``max_block_layers`` quantized layers,
run once per forward); its output is reconstructed as a whole, so the rounding of one layer
can compensate the error of another inside the same block. The activation step sizes of the
block's layers are learned jointly (LSQ-style) and written back into the quantizers. When no
such block exists (a plain ``nn.Sequential``), it falls back to layer by layer and says so.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from compactnn.core.context import CompressContext
from compactnn.engines.reconstruct import ReconConfig, recon_hooks, reconstruct
from compactnn.registry import register


@dataclasses.dataclass(frozen=True)
class BRECQConfig(ReconConfig):
    """BRECQ: block reconstruction with learned rounding and activation step sizes.

    Defaults (short name ``w4a4-brecq``): MSE-searched initial ranges, ``iters=500`` per
    block on batches of 32, rounding lr 1e-2, activation-step lr 1e-3 (cosine decay),
    blocks of at most 4 quantized layers, 1,024 calibration samples recommended. See
    :class:`ReconConfig` for every field.
    """

    unit: str = "block"
    learn_act: bool = True
    drop_prob: float = 0.0


@register("brecq", BRECQConfig, "BRECQ: block reconstruction, learned rounding and act steps")
def apply_brecq(
    model: nn.Module, targets: dict[str, nn.Module], config: BRECQConfig, ctx: CompressContext
) -> nn.Module:
    """Quantize ``targets`` and reconstruct them block by block."""
    return reconstruct(model, targets, config, ctx, recon_hooks(config, "brecq"))
