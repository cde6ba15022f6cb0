"""Round-to-nearest quantization with min-max, percentile or MSE-searched ranges."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import nn

from compactnn.core.context import CompressContext
from compactnn.engines.layerwise import quantize_layers
from compactnn.quant.base import QuantConfig
from compactnn.registry import register


@dataclasses.dataclass(frozen=True)
class RTNConfig(QuantConfig):
    """Round-to-nearest: each weight goes to its nearest grid point; no data needed for
    weight-only recipes. Ranges come from ``weight.range_method`` / ``act.range_method``."""

    group_act: ClassVar[bool] = True  # act granularity 'group' (MatMulNBits level 4)


@register("rtn", RTNConfig, "round-to-nearest (min-max, percentile or MSE ranges)")
def apply_rtn(
    model: nn.Module, targets: dict[str, nn.Module], config: RTNConfig, ctx: CompressContext
) -> nn.Module:
    """Round-to-nearest weights; activations calibrated on the calibration data."""
    return quantize_layers(model, targets, config, ctx)
