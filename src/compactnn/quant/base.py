"""What every post-training quantization method shares: its config base and the steps of
the layer flow (fold batch norms, pick the layers, give the first and last layers their 8-bit
convention, calibrate activation quantizers). The engines in :mod:`compactnn.engines` chain
these steps (:func:`compactnn.engines.layerwise.quantize_layers` is the plain layer-wise flow).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from compactnn.core.config import MethodConfig
from compactnn.core.context import CompressContext
from compactnn.core.fold import fold_batchnorm
from compactnn.core.modules import execution_order
from compactnn.core.qlayers import (
    QUANTIZABLE,
    ActQuantizer,
    is_quant_layer,
)
from compactnn.core.spec import QuantSpec
from compactnn.errors import CompactnnError

LayerSpecs = dict[str, tuple[QuantSpec, QuantSpec | None]]


@dataclasses.dataclass(frozen=True)
class QuantConfig(MethodConfig):
    """Settings shared by quantization methods.

    Args:
        weight: how weights are quantized.
        act: how the activation entering each quantized layer is quantized (None: weight-only).
        first_last_bits: the first and last quantized layers (in execution order) keep at
            least this many bits for weights and activations, the field's convention; None
            quantizes them like the rest.
        fold_bn: fold ``conv -> batchnorm`` pairs before quantizing (CNNs).
    """

    weight: QuantSpec = dataclasses.field(default_factory=lambda: QuantSpec(bits=8))
    act: QuantSpec | None = None
    first_last_bits: int | None = 8
    fold_bn: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.weight, QuantSpec):
            raise CompactnnError(f"{type(self).__name__}.weight must be a QuantSpec")
        if self.act is not None and self.act.granularity != "tensor":
            raise CompactnnError("activation quantization is per-tensor: set granularity='tensor'.")
        if self.first_last_bits is not None and not 1 <= self.first_last_bits <= 8:
            raise CompactnnError(f"first_last_bits={self.first_last_bits} must be 1..8 or None.")

    @classmethod
    def from_short(
        cls,
        wbits: int,
        abits: int | None,
        group: int | None,
        range_method: str = "minmax",
        **kwargs,
    ) -> QuantConfig:
        """Config of a short name ``w<W>[a<A>][-g<G>]``.

        Weights: symmetric int8 at 8 bits (what integer kernels take), asymmetric below 8
        bits (the zero point buys back a level); per output channel, or per group of ``G``.
        Activations: asymmetric unsigned, per tensor.
        """
        weight = short_weight_spec(wbits, group, range_method)
        act = short_act_spec(abits, range_method) if abits is not None else None
        return cls(weight=weight, act=act, **kwargs)


def short_weight_spec(
    bits: int, group: int | None = None, range_method: str = "minmax"
) -> QuantSpec:
    """The weight spec of a short name ``w<bits>[-g<group>]``.

    Symmetric int8 at 8 bits (what integer kernels take), asymmetric below (the zero point
    buys back a level); per output channel, or per group of ``group`` inputs.

    Example:
        >>> short_weight_spec(4, 32).granularity
        'group'
    """
    return QuantSpec(
        bits=bits,
        symmetric=bits == 8,
        granularity="group" if group else "channel",
        group_size=group,
        range_method=range_method,
    )


def short_act_spec(bits: int, range_method: str = "minmax") -> QuantSpec:
    """The activation spec of a short name ``a<bits>``: asymmetric unsigned, per tensor.

    Example:
        >>> short_act_spec(8).symmetric
        False
    """
    return QuantSpec(bits=bits, symmetric=False, granularity="tensor", range_method=range_method)


def prepare_model(model: nn.Module, config: QuantConfig, ctx: CompressContext) -> None:
    """Fold batch norms once per compress call."""
    if config.fold_bn and not ctx.extra.get("bn_folded"):
        ctx.folded_bn.extend(fold_batchnorm(model))
        ctx.extra["bn_folded"] = True


def split_supported(targets: dict[str, nn.Module], ctx: CompressContext) -> dict[str, nn.Module]:
    """Targets this library can quantize; the rest are recorded as kept in float."""
    supported = {}
    for name, m in targets.items():
        if is_quant_layer(m):
            continue  # already quantized by an earlier step
        if isinstance(m, QUANTIZABLE):
            supported[name] = m
        elif getattr(m, "weight", None) is not None:
            ctx.float_layers[name] = f"{type(m).__name__} is not a quantizable layer type"
    return supported


def layer_specs(
    model: nn.Module, layers: dict[str, nn.Module], config: QuantConfig, ctx: CompressContext
) -> LayerSpecs:
    """Weight and activation spec per layer, with the first/last-layer convention applied."""
    names = list(layers)
    if ctx.batches and len(names) > 1:
        names = execution_order(model, names, lambda m: ctx.run(m, ctx.batches[0]))
    specs: LayerSpecs = {n: (config.weight, config.act) for n in names}
    fl = config.first_last_bits
    if fl is not None and names:
        for n in {names[0], names[-1]}:
            w = config.weight
            if w.bits < fl:  # raised to the convention's width, with its 8-bit grid if 8
                w = dataclasses.replace(w, bits=fl, symmetric=w.symmetric or fl == 8)
            a = config.act
            a = dataclasses.replace(a, bits=max(a.bits, fl)) if a is not None else None
            specs[n] = (w, a)
    return specs


def calibrate_activations(model: nn.Module, ctx: CompressContext) -> None:
    """Observe every uncalibrated input quantizer on the calibration data, then fix ranges."""
    quantizers = [m for m in model.modules() if isinstance(m, ActQuantizer) and not m.calibrated]
    if not quantizers:
        return
    if not ctx.batches:
        raise CompactnnError(
            "activation quantization needs calibration data: pass calib_data= or use a "
            "weight-only recipe (e.g. w4-g128)."
        )
    for q in quantizers:
        q.start_observing()
    ctx.run_all(model, desc="calibrating activations")
    for q in quantizers:
        q.finish_observing()


def check_group_sizes(layers: dict[str, nn.Module], specs: LayerSpecs) -> None:
    """Fail before any work when a group size does not divide a layer's input dimension."""
    bad = []
    for name, (wspec, _) in specs.items():
        if wspec.granularity == "group":
            k = layers[name].weight[0].numel()
            if k % wspec.group_size:
                bad.append(f"{name} (input dimension {k})")
    if bad:
        raise CompactnnError(
            f"group_size={specs[next(iter(specs))][0].group_size} does not divide the input "
            f"dimension of: {', '.join(bad)}. Pick a group size that divides them, or exclude "
            "those layers with the step's targets.ignore."
        )
