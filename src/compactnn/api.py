"""The public entry points: ``compress``, ``save``, ``load``."""

from __future__ import annotations

import copy
import dataclasses
import numbers
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

import compactnn.methods  # noqa: F401  (registers every method, once, before any recipe runs)
from compactnn import registry
from compactnn.core.calib import (
    all_zero,
    as_batches,
    check_batch,
    detect_call_mode,
    model_dtype,
    to_dtype,
)
from compactnn.core.context import CompressContext
from compactnn.core.modules import (
    check_patterns,
    check_target_names,
    conv1d_to_linear,
    is_hf_conv1d,
    select_modules,
    weight_layers,
)
from compactnn.core.qlayers import ActQuantizer, has_integer_weight, is_quant_layer
from compactnn.errors import CompactnnError, name_list
from compactnn.export.artifact import info_of, load, save
from compactnn.export.ctensors import install_save_pretrained
from compactnn.export.hf import hf_header
from compactnn.prune.channel import ChannelConfig
from compactnn.prune.probe import EXTRA_KEY as PROBE_KEY
from compactnn.quant.base import QuantConfig, calibrate_activations, quantize_embeddings
from compactnn.recipe import Recipe, Step, resolve_recipe

__all__ = ["compress", "info_of", "load", "save"]


def compress(
    model: nn.Module | str | os.PathLike,
    recipe: str | Recipe,
    calib_data: Any = None,
    *,
    seed: int = 0,
    progress: bool = True,
    inplace: bool = False,
    ignore: Sequence[str] = (),
    max_memory: str | int | None = None,
    out: str | os.PathLike | None = None,
    force: bool = False,
) -> Any:
    """Compress ``model`` with ``recipe`` and return the compressed model.

    With ``max_memory`` (``"512MiB"``), ``model`` is a Hugging Face model directory of
    safetensors shards: it is compressed block by block without ever being whole in memory,
    the artifact is written to ``out`` as it goes (``force`` replaces one there), an
    interrupted run resumes from its last finished block, and a
    :class:`~compactnn.streaming.StreamReport` (digest, peak resident memory) is returned
    instead of a model (:mod:`compactnn.streaming`; weight-only GPTQ and AWQ recipes).

    Args:
        model: a trained float PyTorch model; it is deep-copied and never changed unless
            ``inplace=True``.
        recipe: a short name (``"w4a8"``, ``"w4-g128-gptq"``), a YAML path, or a Recipe.
        calib_data: a tensor of inputs, or an iterable of tensors, tuples or dicts of
            tensors. Needed for activation quantization and data-driven methods.
        seed: seed for stochastic methods.
        progress: show progress bars.
        inplace: modify ``model`` itself instead of a copy.
        ignore: module names or ``fnmatch`` patterns left untouched by every step (added to
            each step's ``targets.ignore``; a container's name covers its children; channel
            pruning keeps their whole shape, so the layers feeding them keep their channels
            too). A name that matches no module raises ``CompactnnError`` listing close names.

    Example:
        >>> qmodel = compactnn.compress(model, "w4a8", calib_data=images)  # doctest: +SKIP
        >>> sparse = compactnn.compress(model, "nm2:4", ignore=["conv1"])  # doctest: +SKIP
        >>> compactnn.compress("llama/", "w4-g128-gptq", calib_data=ids, max_memory="512MiB",
        ...                    out="out/llama-w4")  # doctest: +SKIP
    """
    _check_flags(seed=seed, progress=progress, inplace=inplace, force=force)
    if max_memory is not None:
        if isinstance(model, nn.Module):
            raise CompactnnError(
                "max_memory= streams a model from its files: pass the Hugging Face model "
                "directory (save_pretrained) instead of the loaded model."
            )
        from compactnn.streaming import compress_streamed

        return compress_streamed(
            model,
            recipe,
            calib_data,
            max_memory=max_memory,
            out=out,
            compress_model=_compress,
            seed=seed,
            progress=progress,
            ignore=ignore,
            force=force,
        )
    if not isinstance(model, nn.Module):
        raise CompactnnError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    _check_tensors(model)
    return _compress(
        model, recipe, calib_data, seed=seed, progress=progress, inplace=inplace, ignore=ignore
    )


def _check_flags(seed: Any, **flags: Any) -> None:
    """Refuse a ``seed`` that is not an integer and flags that are not True/False (a string
    such as ``"yes"`` is truthy and was taken silently)."""
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise CompactnnError(f"seed={seed!r}: pass an integer, e.g. seed=0.")
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise CompactnnError(f"{name}={value!r}: pass True or False.")


def _compress(
    model: nn.Module,
    recipe: str | Recipe,
    calib_data: Any,
    *,
    seed: int,
    progress: bool,
    inplace: bool,
    ignore: Sequence[str],
) -> nn.Module:
    """The body of :func:`compress` once the model is checked (streaming calls it on a
    skeleton whose blocks are loaded one at a time)."""
    recipe = resolve_recipe(recipe)
    check_target_names(model, recipe)
    recipe = with_ignored(recipe, model, ignore)
    torch.manual_seed(seed)
    qmodel = model if inplace else copy.deepcopy(model)
    qmodel.eval()
    batches = as_batches(calib_data)
    if (dtype := model_dtype(qmodel)) is not None:  # e.g. float64 from numpy: as the CLI does
        batches = [to_dtype(b, dtype) for b in batches]
    mode = detect_call_mode(qmodel, batches[0]) if batches else "auto"
    if batches:
        check_batch(qmodel, batches[0], mode)
    previous = info_of(model)
    ctx = CompressContext(batches=batches, call_mode=mode, seed=seed, progress=progress)
    if all_zero(batches):
        ctx.warn(
            "calib_data is all zeros: activation ranges and statistics computed from it say "
            "nothing about real inputs; pass real samples."
        )
    quantized = [n for n, m in qmodel.named_modules() if is_quant_layer(m)]
    if quantized and any(isinstance(step.config, QuantConfig) for step in recipe.steps):
        earlier = getattr(previous.get("recipe"), "name", "an earlier compress")
        ctx.warn(
            f"{len(quantized)} layers are already quantized (by {earlier}; e.g. "
            f"{name_list(quantized, 3)}): {recipe.name} leaves them as they are. To apply "
            f"{recipe.name} to them, compress the float model they came from."
        )
    ctx.folded_bn.extend(previous.get("folded_bn", []))
    ctx.extra.update(previous.get("extra", {}))
    _linearize_conv1d(qmodel, ctx)
    for step in recipe.steps:
        entry = registry.get_method(step.method)
        targets = select_modules(qmodel, step.targets)
        before = _uncalibrated(qmodel)
        if isinstance(step.config, QuantConfig):  # tables and tied heads: RTN, here, once
            targets = quantize_embeddings(qmodel, targets, step.targets, step.config, ctx)
        heads = [q for q in _uncalibrated(qmodel) if id(q) not in {id(b) for b in before}]
        qmodel = entry.handler(qmodel, targets, step.config, ctx)
        if any(not q.calibrated for q in heads):  # a tied head's input grid, if still unset
            calibrate_activations(qmodel, ctx)
    _report_float_layers(qmodel, ctx)
    _warn_float_bytes(qmodel, ctx)
    if (hf := hf_header(qmodel)) is not None:  # lets load(dir) rebuild HF models unaided
        ctx.extra["hf"] = hf
    qmodel._compactnn = {
        "recipe": recipe,
        "folded_bn": ctx.folded_bn,
        "float_layers": ctx.float_layers,
        "notes": ctx.notes,
        "extra": ctx.extra,
        "measured": ctx.measured,  # this run's measurements (peak memory); not saved
    }
    return install_save_pretrained(qmodel)  # HF models: never a dequantized float folder


def _uncalibrated(model: nn.Module) -> list[ActQuantizer]:
    return [m for m in model.modules() if isinstance(m, ActQuantizer) and not m.calibrated]


CONV1D_KEY = "conv1d_as_linear"  # extra: GPT-2 Conv1D modules saved as nn.Linear


def _linearize_conv1d(model: nn.Module, ctx: CompressContext) -> None:
    """GPT-2 ``Conv1D`` layers become ``nn.Linear`` (weight transposed, outputs equal) so every
    method and engine quantizes them; ``load`` converts the same names in its skeleton."""
    convs = [n for n, m in model.named_modules() if n and is_hf_conv1d(m)]
    if convs:
        conv1d_to_linear(model, convs)
        ctx.extra[CONV1D_KEY] = sorted({*ctx.extra.get(CONV1D_KEY, []), *convs})


def with_ignored(recipe: Recipe, model: nn.Module, ignore: Sequence[str]) -> Recipe:
    """``recipe`` with the module names or patterns ``ignore`` added to every step's ignore
    list (``name`` also ignores ``name.*``, the modules inside it), and to channel pruning's
    ``keep_whole`` (an ignored layer keeps its whole shape, input channels included).

    Raises:
        CompactnnError: ``ignore`` is not a list of strings, or one of them matches no
            module of ``model`` (the message lists the closest module names).

    Example:
        >>> m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4, 2))
        >>> with_ignored(resolve_recipe("w8"), m, ["0"]).steps[0].targets.ignore
        ('0', '0.*')
        >>> with_ignored(resolve_recipe("ch50"), m, ["0"]).steps[0].config.keep_whole
        ('0',)
    """
    ignore = [ignore] if isinstance(ignore, str) else ignore
    if not isinstance(ignore, Sequence) or not all(isinstance(p, str) and p for p in ignore):
        raise CompactnnError(
            f"ignore={ignore!r} must be a list of module names or fnmatch patterns, "
            "e.g. ignore=['conv1', 'classifier.*']."
        )
    if not ignore:
        return recipe
    check_patterns(model, ignore, "ignore")
    extra = tuple(p for pattern in ignore for p in (pattern, f"{pattern}.*"))
    steps = [
        Step(
            s.method,
            _keep_whole(s.config, ignore),
            dataclasses.replace(s.targets, ignore=s.targets.ignore + extra),
        )
        for s in recipe.steps
    ]
    return Recipe(recipe.name, steps)


def _keep_whole(config: Any, ignore: Sequence[str]) -> Any:
    """A channel-pruning config that keeps the ignored layers' whole shape (their input
    channels too: the layers feeding them are not pruned); any other config as it is."""
    if not isinstance(config, ChannelConfig):
        return config
    added = tuple(p for p in ignore if p not in config.keep_whole)
    return dataclasses.replace(config, keep_whole=config.keep_whole + added)


def _check_tensors(model: nn.Module) -> None:
    """Refuse weights compactnn cannot compress: meta, non-CPU or half precision."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta:
            raise CompactnnError(
                f"model tensor {name!r} is on the meta device (no data was loaded): load the "
                "real weights first (e.g. model.to_empty(device='cpu') then load_state_dict)."
            )
        if t.device.type != "cpu":
            raise CompactnnError(
                f"model tensor {name!r} is on {t.device}; compactnn compresses on CPU: "
                "call model.cpu() first."
            )
        if t.dtype in (torch.float16, torch.bfloat16):
            raise CompactnnError(
                f"model tensor {name!r} is {t.dtype}; compactnn compresses float32 models "
                "(its ranges and solvers need full precision): call model.float() first."
            )


NOT_TARGETED = "not targeted by the recipe"


def _report_float_layers(model: nn.Module, ctx: CompressContext) -> None:
    """Give every float weight layer its reason (the one a step that skipped it recorded,
    else not targeted), and warn once, naming the layers a step could not quantize.

    A float layer a pruning step zeroed (unstructured or N:M) is compressed, stored sparse:
    it is left out (``extra["pruning"]`` gives its sparsity), as is a table tied to it; so
    is a projection of an MLP that probe pruning slices per batch (``extra["probe_prune"]``)."""
    pruned = _pruned_weights(model, ctx)
    known = set(ctx.float_layers) | set(probe_pruned_layers(ctx.extra))  # reason known, or pruned
    for name, m in weight_layers(model).items():
        if has_integer_weight(m) or name in known or id(m.weight) in pruned:
            continue
        ctx.float_layers[name] = ctx.skipped.get(name, NOT_TARGETED)
    failed = {  # a step that skipped a layer warned with its reason already
        n: r for n, r in ctx.float_layers.items() if r not in (NOT_TARGETED, ctx.skipped.get(n))
    }
    if failed:
        listing = "; ".join(f"{n} ({r})" for n, r in failed.items())
        warnings.warn(f"kept in float: {listing}", stacklevel=3)


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


def _warn_float_bytes(model: nn.Module, ctx: CompressContext) -> None:
    """Warn when a quantization recipe leaves most of the weight bytes in float (e.g. token
    embeddings), naming the largest float tensors: the artifact is then barely smaller."""
    if not any(has_integer_weight(m) for m in model.modules()):
        return  # pruning or a float transform: nothing was meant to be quantized
    kept, total, by_name = float_weight_bytes(model)
    if total == 0 or kept / total <= FLOAT_SHARE_WARNING:
        return
    largest = sorted(by_name.items(), key=lambda kv: -kv[1])[:3]
    listing = ", ".join(f"{n} ({b / 2**20:.1f} MiB)" for n, b in largest)
    message = (
        f"{kept / total:.0%} of the weight bytes stay in float after this recipe; the "
        f"largest float tensors: {listing}. The artifact will be much larger than the recipe's "
        "bits suggest: target those layers too (embeddings: targets.classes [Embedding], or a "
        "weight-only recipe), and judge the size `compactnn eval` reports."
    )
    ctx.notes.append(message)
    warnings.warn(message, stacklevel=3)


# re-exported for `compactnn.save` / `compactnn.load`
save = save
load = load
