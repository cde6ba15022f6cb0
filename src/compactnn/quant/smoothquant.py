"""SmoothQuant (Xiao et al. 2022): migrate activation outliers into the weights for W8A8.

For each foldable ``(producer, consumers)`` pair (see :mod:`compactnn.core.scale_fold`), the input
channels are divided by ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` (``alpha``: the
migration strength) and the consumers' weight columns multiplied by ``s_j``; the float model
is unchanged, the activations become easier to quantize per tensor. Pairs whose folding would
change the model (post-norm encoders: the norm output also feeds the residual) are skipped and
named in the notes. Then weights and activations are quantized round-to-nearest (layer-wise
engine); with ``dynamic`` the activations get per-token grids at run time
(:class:`~compactnn.core.dynact.DynamicActQuantizer`), which fit only Linear layers: a model
whose targets include convolutions is refused with ``dynamic`` (:func:`check_dynamic_targets`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from compactnn.core.context import CompressContext
from compactnn.core.dynact import per_token_misfits, use_dynamic_act
from compactnn.core.qlayers import is_quant_layer
from compactnn.core.scale_fold import find_scale_pairs, fold_is_exact, fold_scale
from compactnn.core.spec import QuantSpec
from compactnn.engines.layerwise import quantize_layers
from compactnn.errors import CompactnnError, name_list
from compactnn.quant.base import QuantConfig, short_act_spec
from compactnn.registry import register, register_artifact_hook


@dataclasses.dataclass(frozen=True)
class SmoothQuantConfig(QuantConfig):
    """SmoothQuant settings; the defaults are those of ``w8a8-smoothquant``.

    Args:
        alpha: migration strength in [0, 1]; 0.5 balances activations and weights, larger
            values move more of the difficulty into the weights.
        dynamic: quantize activations per token at run time (asymmetric, the grid the int8
            kernels use) instead of with one static per-tensor range.
    """

    needs_calibration: ClassVar[bool] = True

    act: QuantSpec | None = dataclasses.field(default_factory=lambda: short_act_spec(8))
    alpha: float = 0.5
    dynamic: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise CompactnnError(f"alpha={self.alpha} must lie in [0, 1]; 0.5 is typical.")

    @classmethod
    def from_short(cls, wbits, abits, group, range_method="minmax", **kwargs):
        """``w8a8-smoothquant``: symmetric per-channel weights, per-tensor activations."""
        if abits is None:
            raise CompactnnError("smoothquant quantizes activations: use e.g. w8a8-smoothquant.")
        return super().from_short(wbits, abits, group, range_method=range_method, **kwargs)


@register_artifact_hook("after_layers")
def restore_dynamic_act(model: nn.Module, extra: dict) -> None:
    """After ``load``: give back the dynamic quantizers recorded in ``extra["dynamic_act"]``.

    Example:
        >>> restore_dynamic_act(model, {"dynamic_act": ["fc"]})  # doctest: +SKIP
    """
    use_dynamic_act(model, list(extra.get("dynamic_act", [])))


def check_dynamic_targets(targets: dict[str, nn.Module]) -> None:
    """Refuse per-token dynamic activations on convolutions among ``targets``: their input's
    last dimension is spatial (a grid per row of pixels), and no int8 kernel runs that.

    Example:
        >>> check_dynamic_targets({"fc": nn.Linear(4, 4)})  # Linear layers only: nothing
    """
    convs = per_token_misfits(targets)
    if convs:
        more = f", {len(convs)} in all" if len(convs) > 3 else ""
        raise CompactnnError(
            "smoothquant's per-token dynamic activations (dynamic: true, its default) are for "
            "the (tokens, features) inputs of Linear layers; on this model's convolutions "
            f"({name_list([repr(n) for n in convs], 3)}{more}) they would give "
            "each row of pixels its own grid, which no int8 kernel runs: compress a CNN with "
            "'w8a8' (static per-tensor activations), keep the convolutions in float "
            "(targets.ignore), or set dynamic: false."
        )


def smooth_scale(x_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float):
    """Per-channel migration scale ``(C,)`` from activation maxima ``(C,)`` and weights."""
    w_absmax = torch.stack([w.abs().amax(0) for w in weights]).amax(0).clamp(min=1e-5)
    s = x_absmax.clamp(min=1e-5).pow(alpha) / w_absmax.pow(1.0 - alpha)
    return s.clamp(min=1e-5)


def _input_absmax(model: nn.Module, names: list[str], ctx: CompressContext) -> dict:
    """Per-channel ``max|x|`` ``(C,)`` of each named layer's input over the calibration data."""
    stats: dict[str, torch.Tensor] = {}

    def hook(_m, args, name):
        a = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0)
        stats[name] = a if name not in stats else torch.maximum(stats[name], a)

    hooks = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n))
        for n in names
    ]
    try:
        ctx.run_all(model, desc="smoothquant statistics")
    finally:
        for h in hooks:
            h.remove()
    return stats


def smooth_model(model: nn.Module, names: list[str], alpha: float, ctx: CompressContext) -> int:
    """Fold SmoothQuant scales into every exact pair among linear layers ``names``."""

    def run() -> torch.Tensor:
        out = ctx.run(model, ctx.batches[0])
        if isinstance(out, torch.Tensor):
            return out
        return out[0] if isinstance(out, (tuple, list)) else next(iter(out.values()))

    pairs = find_scale_pairs(model, run, names)
    stats = _input_absmax(model, [c for _, cs in pairs for c in cs[:1]], ctx)
    done = 0
    for producer, consumers in pairs:
        if not fold_is_exact(model, run, producer, consumers):
            ctx.notes.append(f"smoothquant: {producer} -> {consumers} not foldable, left as is")
            continue
        mods = [model.get_submodule(c) for c in consumers]
        s = smooth_scale(stats[consumers[0]], [m.weight.detach() for m in mods], alpha)
        fold_scale(model.get_submodule(producer), mods, s)
        done += 1
    return done


@register("smoothquant", SmoothQuantConfig, "SmoothQuant: outlier migration, then W8A8")
def apply_smoothquant(
    model: nn.Module,
    targets: dict[str, nn.Module],
    config: SmoothQuantConfig,
    ctx: CompressContext,
) -> nn.Module:
    """Smooth the exact producer/consumer pairs, then quantize weights and activations."""
    runtime = config.act is not None and (config.act.dynamic or config.act.granularity == "group")
    per_token = config.dynamic and config.act is not None and not runtime
    if per_token:  # before any calibration: the model, not the data, is the problem
        check_dynamic_targets(targets)
    ctx.require_calibration("smoothquant", 64)
    names = [n for n, m in targets.items() if isinstance(m, nn.Linear)]
    done = smooth_model(model, names, config.alpha, ctx)
    ctx.notes.append(f"smoothquant: {done} producer/consumer pairs smoothed (alpha={config.alpha})")
    model = quantize_layers(model, targets, config, ctx)
    if per_token:  # a8d / a8g keep their own run-time grid
        quantized = [n for n, m in model.named_modules() if is_quant_layer(m)]
        dyn = use_dynamic_act(model, quantized)
        ctx.extra["dynamic_act"] = sorted({*ctx.extra.get("dynamic_act", []), *dyn})
    return model
