"""The public entry points: ``compress``, ``save``, ``load``."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

import compactnn.methods  # noqa: F401  (registers every method, once, before any recipe runs)
from compactnn import registry
from compactnn.core.calib import all_zero, as_batches, check_batch, detect_call_mode
from compactnn.core.context import CompressContext
from compactnn.core.modules import select_modules, weight_layers
from compactnn.core.qlayers import is_quant_layer
from compactnn.errors import CompactnnError
from compactnn.export.artifact import info_of, load, save
from compactnn.export.hf import hf_header
from compactnn.recipe import Recipe, resolve_recipe

__all__ = ["compress", "info_of", "load", "save"]


def compress(
    model: nn.Module,
    recipe: str | Recipe,
    calib_data: Any = None,
    *,
    seed: int = 0,
    progress: bool = True,
    inplace: bool = False,
) -> nn.Module:
    """Compress ``model`` with ``recipe`` and return the compressed model.

    Args:
        model: a trained float PyTorch model; it is deep-copied and never changed unless
            ``inplace=True``.
        recipe: a short name (``"w4a8"``, ``"w4-g128-gptq"``), a YAML path, or a Recipe.
        calib_data: a tensor of inputs, or an iterable of tensors, tuples or dicts of
            tensors. Needed for activation quantization and data-driven methods.
        seed: seed for stochastic methods.
        progress: show progress bars.
        inplace: modify ``model`` itself instead of a copy.

    Example:
        >>> qmodel = compactnn.compress(model, "w4a8", calib_data=images)  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise CompactnnError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    _check_tensors(model)
    recipe = resolve_recipe(recipe)
    torch.manual_seed(seed)
    qmodel = model if inplace else copy.deepcopy(model)
    qmodel.eval()
    batches = as_batches(calib_data)
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
    ctx.folded_bn.extend(previous.get("folded_bn", []))
    ctx.extra.update(previous.get("extra", {}))
    for step in recipe.steps:
        entry = registry.get_method(step.method)
        targets = select_modules(qmodel, step.targets)
        qmodel = entry.handler(qmodel, targets, step.config, ctx)
    _report_float_layers(qmodel, ctx)
    if (hf := hf_header(qmodel)) is not None:  # lets load(dir) rebuild HF models unaided
        ctx.extra["hf"] = hf
    qmodel._compactnn = {
        "recipe": recipe,
        "folded_bn": ctx.folded_bn,
        "float_layers": ctx.float_layers,
        "notes": ctx.notes,
        "extra": ctx.extra,
    }
    return qmodel


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


def _report_float_layers(model: nn.Module, ctx: CompressContext) -> None:
    """Warn once, naming every weight layer that a step targeted but could not quantize."""
    for name, m in weight_layers(model).items():
        if not is_quant_layer(m) and name not in ctx.float_layers:
            ctx.float_layers.setdefault(name, "not targeted by the recipe")
    failed = {n: r for n, r in ctx.float_layers.items() if r != "not targeted by the recipe"}
    if failed:
        listing = "; ".join(f"{n} ({r})" for n, r in failed.items())
        warnings.warn(f"kept in float: {listing}", stacklevel=3)


# re-exported for `compactnn.save` / `compactnn.load`
save = save
load = load
