"""The layer-wise engine: each targeted layer is replaced by its quantized twin, one at a
time, by a per-layer weight solver; activation quantizers are calibrated afterwards.

Hook interface: a :data:`WeightSolver`, ``solver(name, float_layer, wspec, aspec) ->
quantized layer`` (round-to-nearest when none is given). Flow of a step: fold batch norms,
pick the layers, give the first and last layers their 8-bit convention, check group sizes,
solve each layer, calibrate activations.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn

from compactnn.core.context import CompressContext
from compactnn.core.modules import set_module
from compactnn.core.qlayers import quantize_layer_rtn
from compactnn.core.spec import QuantSpec
from compactnn.quant.base import (
    QuantConfig,
    calibrate_activations,
    check_group_sizes,
    layer_specs,
    prepare_model,
    split_supported,
)

WeightSolver = Callable[[str, nn.Module, QuantSpec, QuantSpec | None], nn.Module]


def quantize_layers(
    model: nn.Module,
    targets: dict[str, nn.Module],
    config: QuantConfig,
    ctx: CompressContext,
    solver: WeightSolver | None = None,
) -> nn.Module:
    """Replace each supported target by its quantized twin and calibrate activations.

    Args:
        model: the model (already a copy), changed in place.
        targets: name -> module chosen by the step.
        config: weight/activation specs, first/last-layer convention, batch-norm folding.
        ctx: calibration batches and bookkeeping.
        solver: ``solver(name, float_layer, wspec, aspec)`` builds the quantized layer; the
            default is round-to-nearest.

    Returns:
        ``model``.

    Example:
        >>> q = quantize_layers(model, {"fc": model.fc}, RTNConfig(), ctx)  # doctest: +SKIP
    """
    prepare_model(model, config, ctx)
    layers = split_supported(targets, ctx)
    specs = layer_specs(model, layers, config, ctx)
    check_group_sizes(layers, specs)
    solve = solver or (lambda _n, layer, w, a: quantize_layer_rtn(layer, w, a))
    for name in ctx.bar(list(specs), desc="quantizing layers"):
        wspec, aspec = specs[name]
        set_module(model, name, solve(name, layers[name], wspec, aspec))
    calibrate_activations(model, ctx)
    return model


def quantize_all_rtn(
    model: nn.Module,
    targets: dict[str, nn.Module],
    config: QuantConfig,
    ctx: CompressContext,
    calibrate: bool = True,
) -> tuple[nn.Module, list[str]]:
    """Fold BN, keep a float copy, replace targets with RTN layers, calibrate activations.

    The starting point of methods that then improve layers against the float model
    (reconstruction, bias correction, BitSplit).

    Args:
        model: the model (already a copy), changed in place.
        targets: name -> module chosen by the step.
        config: weight/activation specs.
        ctx: calibration batches and bookkeeping.
        calibrate: calibrate the activation quantizers now (False: the caller does later).

    Returns:
        The float reference model and the quantized layer names in execution order.

    Example:
        >>> fp_model, names = quantize_all_rtn(model, targets, config, ctx)  # doctest: +SKIP
    """
    prepare_model(model, config, ctx)
    fp_model = copy.deepcopy(model)
    layers = split_supported(targets, ctx)
    specs = layer_specs(model, layers, config, ctx)
    for name, (wspec, aspec) in specs.items():
        set_module(model, name, quantize_layer_rtn(layers[name], wspec, aspec))
    if calibrate:
        calibrate_activations(model, ctx)
    return fp_model, list(specs)
