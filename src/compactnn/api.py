"""The public entry points: ``compress``, ``save``, ``load``."""

from __future__ import annotations

import copy
import dataclasses
import numbers
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

import compactnn.methods  # noqa: F401  (registers every method, once, before any recipe runs)
from compactnn import registry
from compactnn.core.attention import split_attention, splittable
from compactnn.core.calib import (
    all_zero,
    as_batches,
    check_batch,
    detect_call_mode,
    model_dtype,
    to_dtype,
)
from compactnn.core.context import CompressContext
from compactnn.core.model_input import (
    check_scripted,
    tied_groups,
    untied_message,
    unwrap_model,
    working_copy,
)
from compactnn.core.modules import (
    attention_out_projs,
    check_patterns,
    check_target_names,
    conv1d_to_linear,
    is_hf_conv1d,
    select_modules,
    weight_layers,
)
from compactnn.core.provenance import record_provenance, warn_few_samples
from compactnn.core.qlayers import ActQuantizer, is_quant_layer
from compactnn.core.seeding import keeps_global_rng, reseed
from compactnn.errors import CompactnnError, name_list
from compactnn.export.artifact import check_writable, info_of, load, save
from compactnn.export.ctensors import install_save_pretrained
from compactnn.export.hf import hf_header
from compactnn.export.save_checks import module_classes, note_new_classes
from compactnn.float_layers import report_float_layers, warn_float_bytes, widths_of
from compactnn.kernels.load import meta_copy
from compactnn.prune.channel import ChannelConfig
from compactnn.quant.base import (
    QuantConfig,
    calibrate_activations,
    quantize_embeddings,
    wants_embeddings,
)
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
    Without it, ``out`` saves the compressed model there too (``compactnn.save``; ``force``
    replaces an artifact there; the path is checked before any work); it was ignored before
    session 30.

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
        raise CompactnnError(not_a_module(model, recipe))
    model = unwrap_model(model)  # torch.compile / DataParallel: the model inside, warned
    check_scripted(model)
    _check_tensors(model)
    if out is not None:  # refused before the work, as compactnn.save would refuse it after
        check_writable(out, force, what="out")
    qmodel = _compress(
        model, recipe, calib_data, seed=seed, progress=progress, inplace=inplace, ignore=ignore
    )
    if out is not None:
        save(qmodel, out, force=force)
    return qmodel


def _check_flags(seed: Any, **flags: Any) -> None:
    """Refuse a ``seed`` that is not an integer and flags that are not True/False (a string
    such as ``"yes"`` is truthy and was taken silently)."""
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise CompactnnError(f"seed={seed!r}: pass an integer, e.g. seed=0.")
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise CompactnnError(f"{name}={value!r}: pass True or False.")


def not_a_module(model: Any, recipe: Any = "RECIPE") -> str:
    """The message for a ``model`` that is not an ``nn.Module``; for a string, how to load
    it: a path (a Hugging Face folder, a ``.pt2`` file) or else a reference model's name.

    Example:
        >>> not_a_module("mnist-cnn", "w4a8")[:66]
        "model must be a torch.nn.Module, got the string 'mnist-cnn': load "
    """
    if isinstance(model, type) and issubclass(model, nn.Module):
        return (
            f"model takes an instance, got the class {model.__name__}: pass "
            f"{model.__name__}(), built and trained as usual."
        )
    if not isinstance(model, (str, os.PathLike)):
        return f"model must be a torch.nn.Module, got {type(model).__name__}."
    name = os.fspath(model)
    recipe = recipe if isinstance(recipe, str) else "RECIPE"
    if os.path.exists(name):
        how = (
            "load it first (a Hugging Face folder: transformers' AutoModel...from_pretrained; "
            "a .pt2 file: torch.export.load(...).module()), or pass max_memory= to stream a "
            "Hugging Face folder"
        )
    else:
        how = (
            f"load it first: a reference model as compactnn.models.load_reference({name!r})"
            f".model (its .calib is calibration data), or on the command line `compactnn "
            f"compress {name} --recipe {recipe} --out DIR`"
        )
    return f"model must be a torch.nn.Module, got the string {name!r}: {how}."


@keeps_global_rng  # seeds torch for its own work only: the caller's stream is kept
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
    recipe = _checked_names(model, recipe, ignore)
    reseed(seed)
    qmodel = working_copy(model, inplace)
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
    ctx.extra.update(copy.deepcopy(previous.get("extra", {})))  # never the input's own dicts
    record_provenance(model, ctx.extra, batches, calib_data)  # float digest, calibration
    _linearize_conv1d(qmodel, ctx)
    _split_attention(qmodel, recipe, ctx)
    check_layers_found(qmodel, recipe)
    widths = {n: widths_of(m) for n, m in weight_layers(qmodel).items()}  # before any pruning
    tied = tied_groups(weight_layers(qmodel))  # warned if quantized apart
    # the skeleton's module classes, before any handler runs; then the classes each plugin's
    # step adds (save refuses those no artifact hook rebuilds: save_checks)
    float_classes = frozenset(previous.get("float_classes") or module_classes(qmodel))
    made_by = dict(previous.get("made_by", {}))
    known = set(float_classes) | set(made_by)
    for step in recipe.steps:
        entry = registry.get_method(step.method)
        targets = select_modules(qmodel, step.targets)
        before = _uncalibrated(qmodel)
        if isinstance(step.config, QuantConfig):  # tables and tied heads: RTN, here, once
            targets = _leave_attention_out_projs(qmodel, targets, ctx)
            targets = quantize_embeddings(qmodel, targets, step.targets, step.config, ctx)
        heads = [q for q in _uncalibrated(qmodel) if id(q) not in {id(b) for b in before}]
        qmodel = _handler_result(entry.handler(qmodel, targets, step.config, ctx), step.method)
        note_new_classes(qmodel, known, made_by, entry)
        if any(not q.calibrated for q in heads):  # a tied head's input grid, if still unset
            calibrate_activations(qmodel, ctx)
    qmodel.eval()  # the layers and quantizers the methods made start in training mode
    warn_few_samples(qmodel, ctx)  # once, for any recipe that observed activation ranges
    if (untied := untied_message(qmodel, tied)) is not None:
        ctx.warn(untied)
    report_float_layers(qmodel, ctx, widths, previous.get("float_layers", {}))
    warn_float_bytes(qmodel, ctx)
    if (hf := hf_header(qmodel)) is not None:  # lets load(dir) rebuild HF models unaided
        ctx.extra["hf"] = hf
    qmodel._compactnn = {
        "recipe": recipe,
        "folded_bn": ctx.folded_bn,
        "float_layers": ctx.float_layers,
        "notes": ctx.notes,
        "extra": ctx.extra,
        "measured": ctx.measured,  # this run's measurements (peak memory); not saved
        "float_classes": float_classes,  # not saved: for save's checks (save_checks)
        "made_by": made_by,  # class -> plugin method that put it in; not saved
    }
    return install_save_pretrained(qmodel)  # HF models: never a dequantized float folder


def _handler_result(result: Any, method: str) -> nn.Module:
    """The model a method's handler returned; a CompactnnError naming the method when it
    returned something else (a handler that forgot ``return model`` returns None)."""
    if result is None:
        raise CompactnnError(
            f"method {method!r}: its handler returned None; a handler returns the model "
            "(end it with `return model`)."
        )
    if not isinstance(result, nn.Module):
        raise CompactnnError(
            f"method {method!r}: its handler returned a {type(result).__name__}; a handler "
            "returns the model (an nn.Module)."
        )
    return result


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


SPLIT_KEY = "split_attention"  # extra: nn.MultiheadAttention split into called Linear layers


def _checked_names(model: nn.Module, recipe: Recipe, ignore: Sequence[str]) -> Recipe:
    """:func:`check_target_names`, then :func:`with_ignored`, on the module names the
    compressed model has: those of ``model`` or, when one is refused, of a parameter-free
    copy with its attentions split (``attn.q_proj`` names a layer of the compressed model)."""
    try:
        check_target_names(model, recipe)
        return with_ignored(recipe, model, ignore)
    except CompactnnError:
        if _prunes_channels(recipe) or not splittable(model)[0]:
            raise
    view = meta_copy(model)
    split_attention(view)
    check_target_names(view, recipe)
    return with_ignored(recipe, view, ignore)


def _prunes_channels(recipe: Recipe) -> bool:
    return any(isinstance(step.config, ChannelConfig) for step in recipe.steps)


def _split_attention(model: nn.Module, recipe: Recipe, ctx: CompressContext) -> None:
    """Each ``nn.MultiheadAttention`` that :mod:`compactnn.core.attention` can stand for
    becomes a ``SplitMultiheadAttention`` (equal outputs; q/k/v/out projections as called
    ``nn.Linear``) so every method compresses them; ``load`` splits the same names in its
    skeleton. Not before channel pruning, whose tracer handles ``nn.MultiheadAttention``."""
    if _prunes_channels(recipe):
        return
    names = split_attention(model)
    if names:
        ctx.extra[SPLIT_KEY] = sorted({*ctx.extra.get(SPLIT_KEY, []), *names})


def acts_on_layers(config: Any) -> bool:
    """A quantization or pruning step: it compresses weight layers (a float transform such
    as cross-layer equalization may find nothing to do)."""
    return isinstance(config, QuantConfig) or type(config).__module__.startswith("compactnn.prune.")


def check_layers_found(model: nn.Module, recipe: Recipe) -> None:
    """Refuse a quantization or pruning step that finds no layer of ``model`` to act on
    (nor, for weight-only quantization, an embedding table): compress would return the model
    unchanged under the recipe's name.

    Raises:
        CompactnnError: naming the step, the layer classes it looks for, and why none is
            found (excluded by names/ignore, or used through functional calls).
    """
    modules = [(n, m) for n, m in model.named_modules() if n]
    for step in recipe.steps:
        if not acts_on_layers(step.config) or select_modules(model, step.targets):
            continue
        if _quantizes_tables(step, modules):
            continue
        of_class = [n for n, m in modules if step.targets.class_matches(m)]
        raise CompactnnError(no_layer_message(type(model).__name__, recipe.name, step, of_class))


def _quantizes_tables(step: Step, modules: list[tuple[str, nn.Module]]) -> bool:
    """A quantization step that takes embedding tables (weight-only on the default classes)
    and whose names admit one of ``modules``' tables."""
    if not isinstance(step.config, QuantConfig) or not wants_embeddings(step.config, step.targets):
        return False
    return any(isinstance(m, nn.Embedding) and step.targets.name_matches(n) for n, m in modules)


def no_layer_message(model: str, recipe: str, step: Step, of_class: list[str]) -> str:
    """Why ``step`` of ``recipe`` finds no layer of ``model``: ``of_class`` are the modules of
    its classes that its names/ignore exclude (none: the model has none of those classes).

    Example:
        >>> no_layer_message("Net", "w8", resolve_recipe("w8").steps[0], [])[:56]
        "recipe 'w8' (rtn step) finds no layer of Net to act on: "
    """
    where = f"recipe {recipe!r} ({step.method} step) finds no layer of {model} to act on"
    classes = "/".join(step.targets.classes)
    if of_class:
        return (
            f"{where}: its targets.names/ignore (or ignore=) exclude every {classes} module "
            f"({name_list(of_class, 3)}); leave at least one targeted, or drop the step."
        )
    return (
        f"{where}: it looks for {classes} modules and the model has none. compactnn finds "
        "layers as modules only: weights used through functional calls (F.linear, F.conv2d "
        "on an nn.Parameter) are not seen; rewrite them as nn.Linear / nn.Conv2d modules."
    )


def _leave_attention_out_projs(
    model: nn.Module, targets: dict[str, nn.Module], ctx: CompressContext
) -> dict[str, nn.Module]:
    """``targets`` without the ``out_proj`` of each ``nn.MultiheadAttention`` left unsplit
    (:func:`_split_attention`): the attention reads that Linear's weight and never calls it,
    so its input can be neither calibrated nor seen by a solver. Each is recorded kept in
    float with the reason, with one warning."""
    owners = attention_out_projs(model)
    left = [n for n, m in targets.items() if n in owners and not is_quant_layer(m)]
    new = [n for n in left if n not in ctx.float_layers]
    unsplit = splittable(model)[1]
    left_whole = "left whole before this step; compress leaves it whole for channel pruning"
    why = {n: unsplit.get(owners[n], left_whole) for n in new}
    for n in new:
        ctx.float_layers[n] = ctx.skipped[n] = (
            f"out_proj of nn.MultiheadAttention {owners[n] or '(the model)'}, which reads its "
            f"weight directly and never calls it (not split: {why[n]})"
        )
    if new:
        reasons = sorted(set(why.values()))
        ctx.warn(
            f"kept in float: {len(new)} nn.MultiheadAttention out_proj layers "
            f"({name_list(new, 3)}): these attentions could not be split into called "
            f"layers ({', '.join(reasons)}), so they read their weights directly "
            "(F.multi_head_attention_forward) and never call them; their in_proj weights "
            "are parameters, not layers, and stay float too."
        )
    return {n: m for n, m in targets.items() if n not in left}


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
    """Refuse weights compactnn cannot compress: meta, non-CPU, half or double precision."""
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
        if t.dtype == torch.float64 and isinstance(t, nn.Parameter):  # a raw torch dtype
            raise CompactnnError(  # error deep in calibration otherwise (quantized layers: fp32)
                f"model tensor {name!r} is torch.float64; compactnn compresses float32 models "
                "(its quantized layers and integer kernels compute in float32): call "
                "model.float() first (and pass float32 calib_data)."
            )


# re-exported for `compactnn.save` / `compactnn.load`
save = save
load = load
