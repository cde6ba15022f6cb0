"""What a compression leaves in float, and why: every float weight layer's reason in the
artifact's record (not targeted, skipped by a step, channel-pruned with float weights,
probe-pruned), and a warning when quantization leaves most of the weight bytes in float."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from compactnn.core.context import CompressContext
from compactnn.core.modules import weight_layers
from compactnn.core.qlayers import QUANTIZABLE, has_integer_weight
from compactnn.errors import user_stacklevel
from compactnn.prune.probe import EXTRA_KEY as PROBE_KEY
from compactnn.quant.base import RECURRENT, unquantizable_reason

NOT_TARGETED = "not targeted by the recipe"


def report_float_layers(
    model: nn.Module, ctx: CompressContext, widths: dict[str, int | None], earlier: dict
) -> None:
    """Give every float weight layer its reason (channel pruning removed some of its output
    channels; else the one a step that skipped it recorded; else not targeted), and warn
    once, naming the layers a step could not quantize.

    ``widths``: each weight layer's output width before this run's steps; ``earlier``: the
    float-layer reasons of the run that made ``model`` (an artifact compressed again).
    A float layer a pruning step zeroed (unstructured or N:M) is compressed, stored sparse:
    it is left out (``extra["pruning"]`` gives its sparsity), as is a table tied to it; so
    is a projection of an MLP that probe pruning slices per batch (``extra["probe_prune"]``)."""
    pruned = _pruned_weights(model, ctx)
    known = set(ctx.float_layers) | set(probe_pruned_layers(ctx.extra))  # reason known, or pruned
    quantized = any(has_integer_weight(m) for m in model.modules())
    narrowed = _channel_pruned(model, ctx.extra.get("resized", {}), widths, earlier, ctx.skipped)
    for name, m in weight_layers(model).items():
        if has_integer_weight(m) or name in known or id(m.weight) in pruned:
            continue
        skipped = ctx.skipped.get(name)
        if name in narrowed:  # compressed (a narrower float layer); a later step's skip too
            ctx.float_layers[name] = narrowed[name] + (f": {skipped}" if skipped else "")
        elif skipped is None and quantized and _no_method_quantizes(m):
            ctx.float_layers[name] = unquantizable_reason(m)  # said: no recipe can target it
        else:
            ctx.float_layers[name] = skipped or NOT_TARGETED
    for name, m in model.named_modules():  # weights that are not a .weight (a GRU's)
        if isinstance(m, RECURRENT) and name and name not in ctx.float_layers:
            ctx.float_layers[name] = unquantizable_reason(m)
    failed = {  # a step that skipped a layer warned with its reason already
        n: r
        for n, r in ctx.float_layers.items()
        if r not in (NOT_TARGETED, ctx.skipped.get(n)) and n not in narrowed
    }
    if failed:
        listing = "; ".join(f"{n} ({r})" for n, r in failed.items())
        warnings.warn(f"kept in float: {listing}", stacklevel=user_stacklevel())


def _no_method_quantizes(m: nn.Module) -> bool:
    """A convolution-like layer of a type no method quantizes (``ConvTranspose2d``,
    ``Conv3d``): named when a recipe quantizes the rest, since targeting cannot help."""
    w = getattr(m, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() >= 3 and not isinstance(m, QUANTIZABLE)


def out_width(layer: nn.Module) -> int | None:
    """A layer's output channels (conv) or features (linear); None for other layers.

    Example:
        >>> out_width(nn.Conv2d(1, 8, 3)), out_width(nn.Linear(4, 2)), out_width(nn.Embedding(3, 2))
        (8, 2, None)
    """
    for key in ("out_channels", "out_features"):
        if isinstance(value := getattr(layer, key, None), int):
            return value
    return None


def in_width(layer: nn.Module) -> int | None:
    """A layer's input channels (conv) or features (linear); None for other layers.

    Example:
        >>> in_width(nn.Conv2d(1, 8, 3)), in_width(nn.Linear(4, 2)), in_width(nn.Embedding(3, 2))
        (1, 4, None)
    """
    for key in ("in_channels", "in_features"):
        if isinstance(value := getattr(layer, key, None), int):
            return value
    return None


def widths_of(layer: nn.Module) -> tuple[int | None, int | None]:
    """``(out_width, in_width)`` of ``layer``, recorded before channel pruning runs."""
    return out_width(layer), in_width(layer)


def channel_pruned_reason(before: int, after: int, side: str = "output") -> str:
    """The float-layer reason of a layer channel pruning narrowed from ``before`` outputs (or
    inputs: ``side``) to ``after`` (its weights are compressed by their shape, not quantized).

    Example:
        >>> channel_pruned_reason(32, 22)
        'pruned (10 of 32 output channels removed), weights in float'
    """
    return f"pruned ({before - after} of {before} {side} channels removed), weights in float"


def _channel_pruned(
    model: nn.Module, resized: dict, widths: dict[str, tuple], earlier: dict, skipped: dict
) -> dict[str, str]:
    """Reasons of the float layers channel pruning narrowed: by this run (``resized`` names
    them; fewer outputs, or else fewer inputs (the layer after pruned units; not a layer a
    step ``skipped``, whose reason says why it kept its outputs), now than ``widths``
    (:func:`widths_of`) says) or by the run that made ``model`` (its ``earlier`` reason says
    pruned)."""
    out = {}
    for name, m in weight_layers(model).items():
        if name not in resized or has_integer_weight(m):
            continue
        was, now = widths.get(name, (None, None)), widths_of(m)
        narrower = [
            (side, b, a)
            for side, b, a in zip(("output", "input"), was, now, strict=True)
            if b is not None
            and a is not None
            and a < b
            and (side == "output" or name not in skipped)
        ]
        if narrower:
            out[name] = channel_pruned_reason(*narrower[0][1:], side=narrower[0][0])
        elif str(earlier.get(name, "")).startswith("pruned ("):
            out[name] = earlier[name]
    return out


PROBE_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def probe_pruned_layers(extra: dict) -> list[str]:
    """The projections of the MLPs probe pruning wrapped (``extra["probe_prune"]["mlps"]``):
    their hidden channels are skipped per batch, so the recipe did compress them.

    Example:
        >>> probe_pruned_layers({"probe_prune": {"mlps": ["layers.0.mlp"]}})
        ['layers.0.mlp.gate_proj', 'layers.0.mlp.up_proj', 'layers.0.mlp.down_proj']
    """
    mlps = (extra.get(PROBE_KEY) or {}).get("mlps", [])
    return [f"{mlp}.{p}" for mlp in mlps for p in PROBE_PROJECTIONS]


def _pruned_weights(model: nn.Module, ctx: CompressContext) -> set[int]:
    """``id`` of each weight a pruning step of this run (or an earlier one) zeroed, read from
    ``extra["pruning"]``: method -> {layer: sparsity, "params": {...}, ...}."""
    modules = dict(model.named_modules())
    out = set()
    for stats in ctx.extra.get("pruning", {}).values():
        for name, value in stats.items() if isinstance(stats, dict) else ():
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if numeric and value > 0 and name in modules:
                out.add(id(getattr(modules[name], "weight", None)))
    return out


FLOAT_SHARE_WARNING = 0.5  # warn when quantization leaves more of the weight bytes in float


def float_weight_bytes(model: nn.Module) -> tuple[int, int, dict[str, int]]:
    """Bytes of parameters kept in float, bytes of all parameters (as stored now, quantized
    weights counted at their float size), and the float ones by name (tied ones once)."""
    kept: dict[str, int] = {}
    total = 0
    seen: set[int] = set()  # tied parameters (an LM head sharing the embedding) count once
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            nbytes = p.numel() * p.element_size()
            total += nbytes
            if not (has_integer_weight(module) and p_name == "weight"):
                kept[f"{mod_name}.{p_name}" if mod_name else p_name] = nbytes
    return sum(kept.values()), total, kept


def size_text(n: float) -> str:
    """A byte count in a unit that fits it.

    Example:
        >>> size_text(300), size_text(8192), size_text(3 * 2**20)
        ('300 bytes', '8.0 KiB', '3.0 MiB')
    """
    if n < 2**10:
        return f"{n:.0f} bytes"
    return f"{n / 2**10:.1f} KiB" if n < 2**20 else f"{n / 2**20:.1f} MiB"


def _why_float(
    model: nn.Module, ctx: CompressContext, tensors: list[str]
) -> tuple[dict[str, str], list[str]]:
    """The float layers owning ``tensors``: those that cannot be quantized by this recipe
    (targeted but refused, or of a type no method quantizes), with why ("" where a
    warning said it), and those that targeting would quantize. A quantized layer's bias is
    neither."""
    modules = dict(model.named_modules())
    cannot: dict[str, str] = {}
    could: list[str] = []
    for tensor in tensors:
        name = tensor.rpartition(".")[0]
        m = modules.get(name)
        if m is None or has_integer_weight(m) or name in cannot or name in could:
            continue
        reason = ctx.float_layers.get(name, NOT_TARGETED)
        if reason != NOT_TARGETED:  # a warning gave its reason; repeated if it is the type's
            cannot[name] = reason if reason == unquantizable_reason(m) else ""
        elif isinstance(m, (*QUANTIZABLE, nn.Embedding)) or type(m).__name__ == "Conv1D":
            could.append(name)
        elif isinstance(m, RECURRENT) or isinstance(getattr(m, "weight", None), torch.Tensor):
            cannot[name] = unquantizable_reason(m)  # ConvTranspose2d, Conv3d, ...
    return cannot, could


def warn_float_bytes(model: nn.Module, ctx: CompressContext) -> None:
    """Warn when a quantization recipe leaves most of the weight bytes in float (e.g. token
    embeddings), naming the largest float tensors: the artifact is then barely smaller.
    Targeting those layers is the advice unless they cannot be quantized by this recipe
    (a GRU, a ConvTranspose2d): then the message names why."""
    if not any(has_integer_weight(m) for m in model.modules()):
        return  # pruning or a float transform: nothing was meant to be quantized
    kept, total, by_name = float_weight_bytes(model)
    if total == 0 or kept / total <= FLOAT_SHARE_WARNING:
        return
    largest = sorted(by_name.items(), key=lambda kv: -kv[1])[:3]
    listing = ", ".join(f"{n} ({size_text(b)})" for n, b in largest)
    cannot, could = _why_float(model, ctx, [n for n, _ in largest])
    target = (
        "target those layers too (embeddings: targets.classes [Embedding], or a weight-only or "
        "a8g recipe)"
    )
    if cannot:
        by_reason: dict[str, list[str]] = {}
        for n, r in cannot.items():
            by_reason.setdefault(r, []).append(n)
        why = "; ".join(f"{', '.join(ns)}: {r}" for r, ns in by_reason.items() if r)
        said = " as warned above" if not all(cannot.values()) else ""
        advice = f"{', '.join(cannot)} cannot be quantized by this recipe{said}"
        advice += f" ({why})" if why else ""
        advice += f"; {target.replace('those', ', '.join(could))}" if could else ""
    else:
        advice = target
    message = (
        f"{kept / total:.0%} of the weight bytes stay in float after this recipe; the "
        f"largest float tensors: {listing}. The artifact will be much larger than the recipe's "
        f"bits suggest: {advice}. Judge the size `compactnn eval` reports."
    )
    ctx.notes.append(message)
    warnings.warn(message, stacklevel=user_stacklevel())
