"""Empirical bias correction (Nagel et al. 2019): undo the mean output shift of quantization.

Quantizing weights and activations shifts each output channel's mean,
``E[W x] - E[W_hat x_hat]``; that shift is measured on the calibration data and added to the
layer's bias. Layers are corrected in execution order, so each one sees the already
corrected layers before it. Run as its own quantization step (round-to-nearest followed by
the correction); it can follow a ``cle`` step in a recipe.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from compactnn.core.capture import capture_batches
from compactnn.core.context import CompressContext
from compactnn.engines.layerwise import quantize_all_rtn
from compactnn.engines.reconstruct import NotReconstructable
from compactnn.quant.base import QuantConfig
from compactnn.registry import register


@dataclasses.dataclass(frozen=True)
class BiasCorrectionConfig(QuantConfig):
    """Round-to-nearest quantization followed by empirical bias correction.

    Defaults (short name ``w4a8-biascorr``): the RTN defaults of :class:`QuantConfig`;
    512 calibration samples recommended (a per-channel mean converges fast).

    Args:
        num_samples: calibration samples recommended (fewer gives a warning).
    """

    needs_calibration: ClassVar[bool] = True

    num_samples: int = 512


def channel_mean(model: nn.Module, name: str, ctx: CompressContext) -> tuple[torch.Tensor, int]:
    """Per-output-channel mean of module ``name``'s output over the calibration data.

    Channels are dim 1 for convs and the last dim for linear layers; returns ``(C,)`` and the
    count of values averaged per channel.
    """
    module = model.get_submodule(name)
    total, count = None, 0

    def hook(m, _args, out):
        nonlocal total, count
        y = out.detach().double()
        y = y.movedim(-1, 0) if isinstance(m, nn.Linear) else y.movedim(1, 0)
        y = y.reshape(y.shape[0], -1)  # (C, values)
        total = y.sum(1) if total is None else total + y.sum(1)
        count += y.shape[1]

    capture_batches(model, module, ctx, hook, output=True)
    if total is None:
        raise NotReconstructable(f"{name} did not run on the calibration data")
    return total / count, count


def correct_biases(
    qmodel: nn.Module, fp_model: nn.Module, names: list[str], ctx: CompressContext
) -> dict[str, float]:
    """Add ``E[float output] - E[quantized output]`` to each layer's bias, in order.

    Returns the largest absolute correction per layer (for the report).
    """
    shifts = {}
    for name in ctx.bar(names, desc="bias correction"):
        try:
            want, _ = channel_mean(fp_model, name, ctx)
            have, _ = channel_mean(qmodel, name, ctx)
        except NotReconstructable as exc:
            ctx.notes.append(f"bias correction: {name} left as is ({exc}).")
            continue
        layer = qmodel.get_submodule(name)
        delta = (want - have).float()
        with torch.no_grad():
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros_like(delta), requires_grad=False)
            layer.bias.add_(delta)
        shifts[name] = float(delta.abs().max())
    return shifts


@register("biascorr", BiasCorrectionConfig, "round-to-nearest plus empirical bias correction")
def apply_bias_correction(
    model: nn.Module,
    targets: dict[str, nn.Module],
    config: BiasCorrectionConfig,
    ctx: CompressContext,
) -> nn.Module:
    """Quantize ``targets`` round-to-nearest, then correct each layer's mean output shift."""
    ctx.require_calibration("biascorr", config.num_samples)
    fp_model, names = quantize_all_rtn(model, targets, config, ctx)
    shifts = correct_biases(model, fp_model, names, ctx)
    ctx.extra.setdefault("bias_correction", {}).update(shifts)
    return model
