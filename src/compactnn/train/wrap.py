"""Wrapping a model for quantization-aware training, and freezing it to standard layers.

``prepare_qat`` returns a copy of the model in which every targeted layer sits inside a
:class:`QATLayer` (or a :class:`~compactnn.quant.binary.BinaryBlock` for 1-bit activations)
under its own name. The result is an ordinary ``nn.Module``: train it with any loop, then
``freeze`` it into ``QuantLinear``/``QuantConv2d`` layers that ``compactnn.save`` packs.

First and last layers follow the recipe's ``first_last_bits`` convention; when that raises
their bits, they get LSQ quantizers at those bits whatever the method (binary, ternary and
power-of-two grids do not exist at 8 bits).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from compactnn.core.calib import as_batches, check_batch, detect_call_mode
from compactnn.core.context import CompressContext
from compactnn.core.modules import set_module
from compactnn.core.qlayers import make_quant_layer
from compactnn.core.spec import QuantSpec
from compactnn.errors import CompactnnError
from compactnn.quant.base import layer_specs, prepare_model, split_supported
from compactnn.quant.binary import BinaryBlock, check_binary_layer
from compactnn.quant.lsq import LSQAct, LSQWeight
from compactnn.quant.qat import QATConfig
from compactnn.recipe import Recipe, resolve_recipe


class QATLayer(nn.Module):
    """A float layer whose weight and input pass through trainable quantizers.

    Args:
        layer: the float ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` (trained in place).
        weight_quantizer: ``forward(w) -> w_hat`` and ``export(w)``.
        input_quantizer: activation quantizer with ``export()``, or None (weight-only).
    """

    def __init__(self, layer: nn.Module, weight_quantizer: nn.Module, input_quantizer=None):
        super().__init__()
        self.layer = layer
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        w = self.weight_quantizer(self.layer.weight)
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, w, self.layer.bias)
        return self.layer._conv_forward(x, w, self.layer.bias)


def _build_wrapper(
    name: str, layer: nn.Module, wspec: QuantSpec, aspec: QuantSpec | None, config: QATConfig
) -> nn.Module:
    """The training wrapper of one layer under ``config``'s method (or LSQ at raised bits)."""
    raised_w = wspec.bits != config.weight.bits
    wq = LSQWeight(layer.weight, wspec.bits) if raised_w else config.weight_quantizer(layer, wspec)
    if aspec is not None and aspec.bits == 1:
        if config.binary_block is None:
            raise CompactnnError(
                f"layer {name!r}: {type(config).method_name} cannot quantize activations to "
                "1 bit; 1-bit activations need a binary method (w1a1-xnor, w1a1-bireal, "
                "w1a1-reactnet)."
            )
        check_binary_layer(name, layer)
        return BinaryBlock(layer, config.binary_block, wq)
    aq = None
    if aspec is not None:
        raised_a = config.act is not None and aspec.bits != config.act.bits
        aq = LSQAct(aspec.bits) if raised_a or config.binary_block else config.act_quantizer(aspec)
    return QATLayer(layer, wq, aq)


def wrap_layers(
    model: nn.Module, targets: dict[str, nn.Module], config: QATConfig, ctx: CompressContext
) -> nn.Module:
    """Fold batch norms and wrap every supported target of ``model`` in place."""
    if not isinstance(config, QATConfig):
        raise CompactnnError(f"{type(config).__name__} is not a training-aware method's config.")
    prepare_model(model, config, ctx)
    layers = split_supported(targets, ctx)
    specs = layer_specs(model, layers, config, ctx)
    blocks = ctx.extra.setdefault("binary_blocks", {})
    for name, (wspec, aspec) in specs.items():
        wrapper = _build_wrapper(name, layers[name], wspec, aspec, config)
        if isinstance(wrapper, BinaryBlock):
            blocks[name] = wrapper.kind
        set_module(model, name, wrapper)
    if not blocks:
        ctx.extra.pop("binary_blocks")
    return model


def _observers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "start_observing") and m is not model]


def init_quantizers(model: nn.Module, ctx: CompressContext) -> None:
    """Initialise activation quantizers and binary shifts from the calibration batches."""
    observers = _observers(model)
    if not observers:
        return
    if not ctx.batches:
        raise CompactnnError(
            "this recipe quantizes activations: pass calibration data (calib_data= for "
            "compress, or training data for train) so their ranges can be initialised."
        )
    for m in observers:
        m.start_observing()
    was_training = model.training
    model.eval()
    ctx.run_all(model, desc="initialising quantizers")
    for m in observers:
        m.finish_observing()
    model.train(was_training)


def _freeze_one(layer: nn.Module, wq: nn.Module, aq: nn.Module | None) -> nn.Module:
    exp = wq.export(layer.weight)
    aspec = qparams = None
    if aq is not None:
        aspec, *qparams = aq.export()
    q = make_quant_layer(layer, exp.spec, aspec)
    if exp.levels is not None:
        q.set_codebook(exp.levels)
    q.set_quantized_weight(exp.codes, exp.scale, exp.zero)
    if qparams:
        q.input_quantizer.set_qparams(*qparams)
    return q


def freeze_layers(model: nn.Module, ctx: CompressContext | None = None) -> nn.Module:
    """Replace every wrapper in ``model`` (in place) by standard quantized layers."""
    for name, m in list(model.named_modules()):
        if isinstance(m, QATLayer):
            set_module(model, name, _freeze_one(m.layer, m.weight_quantizer, m.input_quantizer))
        elif isinstance(m, BinaryBlock) and m.weight_quantizer is not None:
            m.fold_norm()
            m.layer = _freeze_one(m.layer, m.weight_quantizer, None)
            m.weight_quantizer = None
    model.eval()
    return model


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
    torch.manual_seed(seed)
    qat = copy.deepcopy(model)
    qat.eval()
    batches = as_batches(calib_data)
    mode = detect_call_mode(qat, batches[0]) if batches else "auto"
    if batches:
        check_batch(qat, batches[0], mode)
    ctx = CompressContext(batches=batches, call_mode=mode, seed=seed, progress=progress)
    from compactnn.core.modules import select_modules

    wrap_layers(qat, select_modules(qat, step.targets), step.config, ctx)
    init_quantizers(qat, ctx)
    qat._compactnn_qat = {"recipe": recipe, "ctx": ctx}
    return qat


def qat_step(recipe: Recipe):
    """The recipe's single training-aware step (training recipes have exactly one)."""
    steps = [s for s in recipe.steps if isinstance(s.config, QATConfig)]
    if len(recipe.steps) != 1 or len(steps) != 1:
        raise CompactnnError(
            f"recipe {recipe.name!r} is not a training recipe: it needs exactly one step with "
            "a training-aware method (ste, dorefa, pact, lsq, twn, ttq, xnor, bireal, "
            "reactnet, inq), e.g. w2a2-lsq."
        )
    return steps[0]


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
        "extra": copy.deepcopy(ctx.extra),
    }
    return model
