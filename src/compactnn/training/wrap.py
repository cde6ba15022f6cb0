"""Wrapping a model for quantization-aware training, and freezing it to standard layers.

``prepare_qat`` returns a copy of the model in which every targeted layer sits inside a
:class:`~compactnn.engines.qat.QATLayer` (or a :class:`~compactnn.engines.binary.BinaryBlock`
for 1-bit activations) under its own name. The result is an ordinary ``nn.Module``: train it
with any loop, then ``freeze`` it into ``QuantLinear``/``QuantConv2d`` layers that
``compactnn.save`` packs. Wrapping, initialising and freezing are the training-aware
engine's (:mod:`compactnn.engines.qat`); this module resolves the recipe and its method.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from compactnn import registry
from compactnn.core.calib import as_batches, check_batch, detect_call_mode
from compactnn.core.context import CompressContext
from compactnn.core.model_input import unwrap_model, working_copy
from compactnn.core.modules import select_modules
from compactnn.core.seeding import keeps_global_rng, reseed
from compactnn.engines.qat import (
    QATConfig,
    QATMethod,
    freeze_layers,
    init_quantizers,
    wrap_layers,
)
from compactnn.errors import CompactnnError
from compactnn.recipe import Recipe, resolve_recipe

__all__ = ["freeze", "prepare_qat", "qat_method", "qat_step"]


@keeps_global_rng  # the caller's torch stream is the same after the call
def prepare_qat(
    model: nn.Module,
    recipe: str | Recipe,
    calib_data: Any = None,
    *,
    seed: int = 0,
    progress: bool = True,
) -> nn.Module:
    """A copy of ``model`` wrapped for quantization-aware training (train it with any loop).

    Args:
        model: the float model (never changed).
        recipe: a QAT recipe (``"w2a2-lsq"``, ``"w1a1-reactnet"``, ...).
        calib_data: inputs to initialise activation quantizers (a tensor or batches).
        seed: torch seed for any random initialisation.
        progress: show progress bars.

    Example:
        >>> qat = prepare_qat(model, "w4a4-lsq", x_train[:256])   # doctest: +SKIP
        >>> ... your training loop on qat ...                      # doctest: +SKIP
        >>> qmodel = freeze(qat); compactnn.save(qmodel, "out/")   # doctest: +SKIP
    """
    recipe = resolve_recipe(recipe)
    step = qat_step(recipe)
    reseed(seed)
    qat = working_copy(unwrap_model(model, "preparing QAT for"))
    qat.eval()
    batches = as_batches(calib_data)
    mode = detect_call_mode(qat, batches[0]) if batches else "auto"
    if batches:
        check_batch(qat, batches[0], mode)
    ctx = CompressContext(batches=batches, call_mode=mode, seed=seed, progress=progress)
    wrap_layers(qat, select_modules(qat, step.targets), step.config, ctx, qat_method(step.config))
    init_quantizers(qat, ctx)
    qat._compactnn_qat = {"recipe": recipe, "ctx": ctx}
    return qat


def qat_step(recipe: Recipe):
    """The recipe's single training-aware step (training recipes have exactly one)."""
    steps = [s for s in recipe.steps if isinstance(s.config, QATConfig)]
    if len(recipe.steps) != 1 or len(steps) != 1:
        raise CompactnnError(
            f"recipe {recipe.name!r} is not a training recipe: it needs exactly one step with "
            f"a training-aware method ({', '.join(training_methods())}), e.g. w2a2-lsq."
        )
    return steps[0]


def training_methods() -> list[str]:
    """Names of the registered methods that ``train`` can run, sorted."""
    return sorted(
        name
        for name, entry in registry.METHODS.items()
        if issubclass(entry.config_cls, QATConfig) and isinstance(entry.handler, QATMethod)
    )


def qat_method(config: QATConfig) -> QATMethod:
    """The engine hooks registered for ``config``'s method."""
    handler = registry.method_for_config(config).handler
    if not isinstance(handler, QATMethod):
        raise CompactnnError(
            f"{type(config).__name__} is a training-aware config, but its method is not "
            "registered with the training-aware engine's hooks (a QATMethod)."
        )
    return handler


def freeze(qat: nn.Module) -> nn.Module:
    """Freeze a model from :func:`prepare_qat` into standard quantized layers (a copy).

    The result saves with ``compactnn.save`` and loads back bit-exactly.
    """
    state = getattr(qat, "_compactnn_qat", None)
    if state is None:
        raise CompactnnError("freeze() takes a model returned by prepare_qat() or train().")
    model = copy.deepcopy(qat)
    del model._compactnn_qat
    ctx: CompressContext = state["ctx"]
    freeze_layers(model, ctx)
    model._compactnn = {
        "recipe": state["recipe"],
        "folded_bn": list(ctx.folded_bn),
        "float_layers": dict(ctx.float_layers),
        "notes": list(ctx.notes),
        "measured": {},  # what compress measures (its calibration run) has no counterpart here
        # trained: out of the training-aware wrapper (train(), or your own loop), not
        # calibrated only as by compress (compactnn.report.delivery.untrained_label)
        "extra": copy.deepcopy(ctx.extra) | {"trained": True},
    }
    return model
