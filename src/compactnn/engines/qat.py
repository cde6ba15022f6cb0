"""The training-aware engine: QAT, ternary, binary and INQ methods run through it.

A method plugs in a :class:`QATMethod`, its hooks:

* ``weight_quantizer(layer, spec, config)`` returns a module with ``forward(w) -> w_hat``
  (differentiable: the method's gradient) and ``export(w) -> WeightExport``, the integer
  codes and grid (or binary basis) that reproduce ``w_hat`` in a standard quantized layer
  (the freeze rule);
  optionally ``start_epoch(w, epoch, epochs)`` (INQ stages, ReActNet's real-weight epochs),
  and ``wrapper(name, layer, act_quantizer, ctx) -> QATWrapper`` for a weight whose frozen
  form is not a standard quantized layer (binary augmented pruning's binary + sparse sum);
* ``act_quantizer(layer, spec, config)`` returns a module on a ``scale * [qmin, qmax]`` grid
  with zero point 0 whose ``export() -> (spec, scale, zero)`` freezes into the layer's
  ``ActQuantizer`` (default: LSQ); one with ``export_levels()`` (sorted float16 levels,
  called first) freezes into a non-uniform grid (``ActQuantizer.set_levels``);
* ``block(name, layer, weight_quantizer, ctx)``, for methods that take 1-bit activations:
  the :class:`QATWrapper` that replaces the layer (binary blocks, see
  :mod:`compactnn.engines.binary`); it records in ``ctx.extra`` what loading needs.

The engine wraps every target (:func:`wrap_layers`), initialises the quantizers from the
calibration batches (:func:`init_quantizers`) and freezes wrappers into
``QuantLinear``/``QuantConv2d`` layers (:func:`freeze_layers`). Through
:func:`compactnn.compress` a method runs this post-training variant (:func:`apply_qat`);
:func:`compactnn.train` trains between wrapping and freezing.

First and last layers follow the recipe's ``first_last_bits`` convention; when that raises
their bits, they get LSQ quantizers at those bits whatever the method (binary, ternary and
power-of-two grids do not exist at 8 bits).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn import functional as F

from compactnn.core.context import CompressContext
from compactnn.core.modules import set_module
from compactnn.core.qlayers import make_quant_layer
from compactnn.core.spec import QuantSpec
from compactnn.engines.binary_checks import check_binary_layers
from compactnn.engines.qat_quantizers import LSQAct, LSQWeight, WeightExport
from compactnn.errors import CompactnnError
from compactnn.quant.base import (
    QuantConfig,
    layer_specs,
    ordered_ends,
    prepare_model,
    split_supported,
)


@dataclass(frozen=True)
class QATConfig(QuantConfig):
    """Settings shared by training-aware methods (defaults are each recipe's, see
    ``docs/training.md``).

    Args:
        epochs: training epochs of :func:`compactnn.train` unless it is given ``epochs=``.
        lr: Adam learning rate of weights and biases (cosine-decayed to 0).
        lr_quant: learning rate of quantizer parameters (step sizes, clips, scales, shifts).
        batch_size: training batch size.
        distill: weight of the distillation term (0: labels only; 1: teacher only).
        temperature: distillation temperature ``T`` (the KD term is scaled by ``T**2``).
    """

    epochs: int = 3
    lr: float = 1e-3
    lr_quant: float = 1e-3
    batch_size: int = 64
    distill: float = 0.0
    temperature: float = 4.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise CompactnnError(f"epochs={self.epochs!r} must be a non-negative integer.")
        if not (self.lr > 0 and self.lr_quant >= 0 and self.batch_size >= 1):
            raise CompactnnError("lr must be > 0, lr_quant >= 0 and batch_size >= 1.")
        if not 0.0 <= self.distill <= 1.0 or self.temperature <= 0:
            raise CompactnnError("distill must lie in [0, 1] and temperature be > 0.")


class TrainableWeightQuantizer(Protocol):
    """What a ``weight_quantizer`` hook returns (an ``nn.Module``)."""

    def __call__(self, w: torch.Tensor) -> torch.Tensor: ...

    def export(self, w: torch.Tensor) -> WeightExport: ...


class TrainableActQuantizer(Protocol):
    """What an ``act_quantizer`` hook returns (an ``nn.Module``)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def export(self) -> tuple[QuantSpec, torch.Tensor, torch.Tensor]: ...


QuantizerHook = Callable[[nn.Module, QuantSpec, Any], nn.Module]


def lsq_act_quantizer(layer: nn.Module, spec: QuantSpec, config: QATConfig) -> nn.Module:
    """The default activation hook: LSQ, a learned step per tensor."""
    return LSQAct(spec.bits)


@dataclass(frozen=True)
class QATMethod:
    """The hooks of a training-aware method; calling it is the method's ``compress``
    handler (the post-training variant, :func:`apply_qat`).

    Args:
        weight_quantizer: ``(layer, spec, config) -> module``; ``spec.bits`` is decided.
        act_quantizer: ``(layer, spec, config) -> module`` (default: LSQ).
        block: ``(name, layer, weight_quantizer, ctx) -> QATWrapper`` for layers with 1-bit
            activations; None refuses them.
        check_layers: ``(layers, config) -> None``, called before any layer is wrapped with
            every layer (name -> layer) ``weight_quantizer`` will take (not those raised to
            other bits): refuses, in one message, the layers the method cannot take (PE-wise:
            those its tile does not divide).
        plain_ends: the layers of the first/last-layer convention get LSQ weights at their
            bits even where the convention does not raise them (PE-wise pruning at 8 bits:
            its tile masks would prune them); ``first_last_bits=None`` turns it off too.

    Example:
        >>> lsq = QATMethod(lambda layer, spec, cfg: LSQWeight(layer.weight, spec.bits))
        >>> # register("lsq", LSQConfig, "...")(lsq)
    """

    weight_quantizer: QuantizerHook
    act_quantizer: QuantizerHook = lsq_act_quantizer
    block: Callable[[str, nn.Module, nn.Module, CompressContext], nn.Module] | None = None
    check_layers: Callable[[dict[str, nn.Module], QATConfig], None] | None = None
    plain_ends: bool = False

    def __call__(
        self,
        model: nn.Module,
        targets: dict[str, nn.Module],
        config: QATConfig,
        ctx: CompressContext,
    ) -> nn.Module:
        return apply_qat(model, targets, config, ctx, self)


class QATWrapper(nn.Module):
    """Base of the modules that hold a float ``layer`` and its ``weight_quantizer`` while
    training; ``weight_quantizer`` is None once frozen. Subclasses implement ``freeze``."""

    layer: nn.Module
    weight_quantizer: nn.Module | None

    def freeze(self) -> nn.Module:
        """The module that replaces this wrapper in the frozen model (may be ``self``)."""
        raise NotImplementedError


def freeze_layer(layer: nn.Module, wq: nn.Module, aq: nn.Module | None) -> nn.Module:
    """The standard quantized layer of ``layer`` under quantizers ``wq`` and ``aq``."""
    exp = wq.export(layer.weight)
    aspec = qparams = levels = None
    if aq is not None:
        # a non-uniform input grid (LQ-Nets): sorted float16 levels, read before export()
        levels = aq.export_levels() if hasattr(aq, "export_levels") else None
        aspec, *qparams = aq.export()
    q = make_quant_layer(layer, exp.spec, aspec)
    if exp.levels is not None or exp.basis is not None:
        q.set_codebook(exp.levels, basis=exp.basis)
    q.set_quantized_weight(exp.codes, exp.scale, exp.zero)
    if qparams:
        q.input_quantizer.set_qparams(*qparams)
    if levels is not None:
        q.input_quantizer.set_levels(levels)
    return q


class QATLayer(QATWrapper):
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

    def freeze(self) -> nn.Module:
        return freeze_layer(self.layer, self.weight_quantizer, self.input_quantizer)


def build_wrapper(
    name: str,
    layer: nn.Module,
    specs: tuple[QuantSpec, QuantSpec | None],
    config: QATConfig,
    method: QATMethod,
    ctx: CompressContext,
    plain: bool = False,
) -> nn.Module:
    """The training wrapper of one layer under ``method`` (or LSQ at raised bits, and with
    ``plain``: a first or last layer of a method with ``plain_ends``)."""
    wspec, aspec = specs
    if plain or wspec.bits != config.weight.bits:
        wq = LSQWeight(layer.weight, wspec.bits)
    else:
        wq = method.weight_quantizer(layer, wspec, config)
    if aspec is not None and aspec.bits == 1:
        if method.block is None:
            raise CompactnnError(
                f"layer {name!r}: {type(config).method_name} cannot quantize activations to "
                "1 bit; 1-bit activations need a binary method (w1a1-xnor, w1a1-bireal, "
                "w1a1-reactnet)."
            )
        return method.block(name, layer, wq, ctx)
    aq = None
    if aspec is not None:
        raised_a = config.act is not None and aspec.bits != config.act.bits
        aq = LSQAct(aspec.bits) if raised_a else method.act_quantizer(layer, aspec, config)
    wrap = getattr(wq, "wrapper", None)  # a weight whose frozen form is its own module (BAP)
    if wrap is not None:
        return wrap(name, layer, aq, ctx)
    return QATLayer(layer, wq, aq)


def wrap_layers(
    model: nn.Module,
    targets: dict[str, nn.Module],
    config: QATConfig,
    ctx: CompressContext,
    method: QATMethod,
) -> nn.Module:
    """Fold batch norms and wrap every supported target of ``model`` in place."""
    if not isinstance(config, QATConfig):
        raise CompactnnError(f"{type(config).__name__} is not a training-aware method's config.")
    prepare_model(model, config, ctx)
    layers = split_supported(targets, ctx)
    specs = layer_specs(model, layers, config, ctx)
    if method.block is not None:  # every layer a binary block cannot wrap, in one message
        check_binary_layers({n: layers[n] for n, (_, a) in specs.items() if a and a.bits == 1})
    plain = set()
    if method.plain_ends and config.first_last_bits is not None:
        plain = ordered_ends(model, layers, ctx)[1]
    if method.check_layers is not None:  # the layers its weight quantizer will take
        ours = {
            n: layers[n]
            for n, (w, _) in specs.items()
            if w.bits == config.weight.bits and n not in plain
        }
        method.check_layers(ours, config)
    for name, spec in specs.items():
        wrapper = build_wrapper(name, layers[name], spec, config, method, ctx, name in plain)
        set_module(model, name, wrapper)
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


def start_epoch(model: nn.Module, epoch: int, epochs: int) -> None:
    """Tell every weight quantizer with a ``start_epoch`` hook that ``epoch`` begins."""
    for m in model.modules():
        if isinstance(m, QATWrapper) and hasattr(m.weight_quantizer, "start_epoch"):
            m.weight_quantizer.start_epoch(m.layer.weight, epoch, epochs)


def keep_eligible(model: nn.Module) -> bool:
    """Whether every weight quantizer with a ``keep_eligible`` hook lets ``keep_best`` keep
    the model of the epoch under way (PE-wise: its masks prune the recipe's tiles)."""
    return all(
        m.weight_quantizer.keep_eligible()
        for m in model.modules()
        if isinstance(m, QATWrapper) and hasattr(m.weight_quantizer, "keep_eligible")
    )


def freeze_layers(model: nn.Module, ctx: CompressContext | None = None) -> nn.Module:
    """Replace every wrapper in ``model`` (in place) by standard quantized layers."""
    for name, m in list(model.named_modules()):
        if isinstance(m, QATWrapper) and m.weight_quantizer is not None:
            frozen = m.freeze()
            if frozen is not m:
                set_module(model, name, frozen)
    model.eval()
    return model


def apply_qat(
    model: nn.Module,
    targets: dict[str, nn.Module],
    config: QATConfig,
    ctx: CompressContext,
    method: QATMethod,
) -> nn.Module:
    """Post-training variant of a QAT method (what ``compress`` runs): wrap, initialise the
    quantizers from the calibration data, freeze. ``compactnn.train`` trains in between."""
    wrap_layers(model, targets, config, ctx, method)
    init_quantizers(model, ctx)
    freeze_layers(model, ctx)
    return model
