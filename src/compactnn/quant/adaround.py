"""AdaRound (Nagel et al. 2020): learn, layer by layer, whether each weight rounds up or down.

Each quantized layer's integer codes are ``floor(w / s) + h(V) + zero`` where ``h`` is a
rectified sigmoid of a learned logit per weight; ``V`` is trained so the layer's output on
the calibration data matches the float layer's, while an annealed regulariser drives every
``h`` to 0 or 1. Step sizes stay those of the (MSE-searched) initial grid.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from compactnn.core.context import CompressContext
from compactnn.engines.reconstruct import ReconConfig, recon_hooks, reconstruct
from compactnn.registry import register


@dataclasses.dataclass(frozen=True)
class AdaRoundConfig(ReconConfig):
    """AdaRound: per-layer learned rounding; activation step sizes stay calibrated.

    Defaults (short name ``w4a4-adaround``): MSE-searched weight and activation ranges,
    ``iters=500`` Adam steps per layer on batches of 32 (lr 1e-2), regulariser weight 0.01
    with its exponent decayed 20 -> 2 after 20% warm-up, 1,024 calibration samples
    recommended. The paper uses 10-20k steps per layer at lr 1e-3; 500 keeps a small CNN under a
    minute on 2 cores. See :class:`ReconConfig` for every field.
    """

    unit: str = "layer"
    learn_act: bool = False
    drop_prob: float = 0.0


@register("adaround", AdaRoundConfig, "AdaRound: learned per-weight rounding, layer by layer")
def apply_adaround(
    model: nn.Module, targets: dict[str, nn.Module], config: AdaRoundConfig, ctx: CompressContext
) -> nn.Module:
    """Quantize ``targets`` with learned rounding, reconstructing one layer at a time."""
    return reconstruct(model, targets, config, ctx, recon_hooks(config, "adaround"))
