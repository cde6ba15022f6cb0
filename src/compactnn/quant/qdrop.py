"""QDrop (Wei et al. 2022): BRECQ with activation quantization randomly dropped.

While a block is reconstructed, each activation entering a quantized layer keeps its float
value with probability ``drop_prob`` (and the block's input mixes float and quantized inputs
the same way); the rounding learned this way lands in a flatter minimum that survives the
full quantization of the final model.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from compactnn.core.context import CompressContext
from compactnn.engines.reconstruct import ReconConfig, recon_hooks, reconstruct
from compactnn.errors import CompactnnError
from compactnn.registry import register


@dataclasses.dataclass(frozen=True)
class QDropConfig(ReconConfig):
    """QDrop: BRECQ plus random dropping of activation quantization during reconstruction.

    Defaults (short name ``w4a4-qdrop``): as :class:`~compactnn.quant.brecq.BRECQConfig`
    with ``drop_prob=0.5``. See :class:`ReconConfig` for every field.
    """

    unit: str = "block"
    learn_act: bool = True
    drop_prob: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.drop_prob <= 0:
            raise CompactnnError("QDropConfig.drop_prob must be > 0; use brecq for no dropping.")


@register("qdrop", QDropConfig, "QDrop: block reconstruction with dropped activation quantization")
def apply_qdrop(
    model: nn.Module, targets: dict[str, nn.Module], config: QDropConfig, ctx: CompressContext
) -> nn.Module:
    """Quantize ``targets`` and reconstruct them block by block with activation dropping."""
    return reconstruct(model, targets, config, ctx, recon_hooks(config, "qdrop"))
