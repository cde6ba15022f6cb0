"""Opt-in simulation change that lets the integer graph stay uint8 through residual adds.

compactnn's simulation quantizes the *input* of each quantized layer only, so a residual add
sums float values: the block input and a convolution's output. An integer graph that wants
to reproduce it must carry the residual stream in float (float32 accumulators, one more
requantization per block). :func:`quantize_residuals` changes the simulation instead: every
value that takes part in a residual add (an operand, or the sum, after its ReLU when there is
one) and that quantized layers read is quantized *once*, on the grid those layers already use,
and the add reads that quantized value too.

What changes numerically is only what the add sees: the layers reading those values quantize
them with the same grid either way (quantizing twice on one grid is idempotent). The add now
sums the block input's codes instead of its float value, as an integer graph does. Measure
the accuracy of the returned model: it is the model :func:`compactnn.deployment.deploy` then
reproduces (verified against it), with no float residual stream left.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import fx, nn

from compactnn.core.calib import as_batches, call_model
from compactnn.core.qlayers import ActQuantizer, is_quant_layer
from compactnn.errors import CompactnnError
from compactnn.lowering.graph import is_add, module_of, trace, unary_attr

PREFIX = "residual_quantizer"


def quantize_residuals(qmodel: nn.Module, calib_data: Any = None) -> fx.GraphModule:
    """A copy of ``qmodel`` whose residual adds read quantized values (see module docstring).

    Args:
        qmodel: a model from ``compactnn.compress(..., "w8a8")`` (activation quantizers
            calibrated); not modified. Must trace with ``torch.fx``.
        calib_data: optional calibration batches. When given, an add operand that only adds
            read and that a quantized layer computes (a ResNet's 1x1 shortcut convolution)
            gets its own 8-bit grid too, calibrated on this data like the layers' inputs (an
            extra rounding the simulation then has, as ONNX Runtime's int8 graphs do); the
            integer graph then has no float value left between the first and last layers.

    Returns:
        An ``fx.GraphModule`` with an :class:`ActQuantizer` after each such value (for a value
        layers read, a copy of their own input quantizer). ``result.residual_grids`` maps
        each quantizer to the value it quantizes.

    Example:
        >>> qres = quantize_residuals(qmodel)                   # doctest: +SKIP
        >>> evaluate(qres)  # the accuracy the deployed model has  # doctest: +SKIP
        >>> fast = compactnn.deploy(qres, example=images[:8])   # doctest: +SKIP
    """
    if not any(is_quant_layer(m) for m in qmodel.modules()):
        raise CompactnnError(
            "quantize_residuals needs a quantized model: run compactnn.compress(model, "
            "'w8a8', calib_data=...) first."
        )
    gm = trace(copy.deepcopy(qmodel).eval())
    inserted: dict[str, str] = {}
    calibrate: list[ActQuantizer] = []
    for add in [n for n in gm.graph.nodes if is_add(n)]:
        if add.args[0] is add.args[1]:
            continue
        fresh = _second_layer_operand(gm, add) if calib_data is not None else None
        for value in (*add.args, _sum_value(gm, add)):
            quantizer = _shared_quantizer(gm, value)
            if quantizer is None and value is fresh:
                quantizer = _fresh_quantizer(gm, value)
                calibrate.append(quantizer)
            if quantizer is not None:
                inserted[_insert(gm, value, quantizer)] = value.name
    gm.graph.lint()
    gm.recompile()
    if calibrate:
        _calibrate(gm, calibrate, calib_data)
    gm.residual_grids = inserted  # quantizer module -> the value it quantizes
    meta = getattr(qmodel, "_compactnn", None)
    if meta is not None:
        gm._compactnn = copy.deepcopy(meta)
        gm._compactnn.setdefault("notes", []).append(
            f"quantize_residuals: {len(inserted)} residual values quantized once"
        )
    return gm


def _sum_value(gm: fx.GraphModule, add: fx.Node) -> fx.Node:
    """The add's result as the next layers read it: after its ReLU when only a ReLU reads it."""
    users = list(add.users)
    if len(users) == 1 and (unary_attr(gm, users[0]) or ("",))[0] == "relu":
        return users[0]
    return add


def _shared_quantizer(gm: fx.GraphModule, value: fx.Node) -> ActQuantizer | None:
    """The input quantizer every non-add reader of ``value`` applies, if they share one.

    Qualifies only when each reader is either a residual add or a quantized layer taking
    ``value`` as its input, all those layers quantize it on one 8-bit grid, and there is at
    least one such layer. Otherwise quantizing ``value`` would change some reader's numbers.
    """
    if isinstance(module_of(gm, value), ActQuantizer):
        return None  # already quantized by an earlier add of this pass
    grids, quantizer = set(), None
    for user in value.users:
        if is_add(user):
            continue
        m = module_of(gm, user)
        if m is None or not is_quant_layer(m) or user.args[0] is not value:
            return None
        aq = m.input_quantizer
        if aq is None or not aq.enabled or not aq.calibrated or aq.qtype.bits > 8:
            return None
        grids.add((float(aq.scale), float(aq.zero), aq.qtype.name))
        quantizer = aq
    if len(grids) != 1:
        return None
    q = copy.deepcopy(quantizer)
    q.observer = None
    return q


def _layer_output_only_adds_read(gm: fx.GraphModule, value: fx.Node) -> bool:
    m = module_of(gm, value)
    if m is None or not is_quant_layer(m) or not all(is_add(u) for u in value.users):
        return False
    aq = m.input_quantizer
    return aq is not None and aq.calibrated and aq.qtype.bits <= 8


def _second_layer_operand(gm: fx.GraphModule, add: fx.Node) -> fx.Node | None:
    """When both operands are layer outputs only adds read, the later one: the earlier layer
    takes the add into its kernel (``plan._fuse``) and the later one needs a grid."""
    both = [a for a in add.args if _layer_output_only_adds_read(gm, a)]
    if len(both) != 2:
        return None
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return max(both, key=order.get)


def _fresh_quantizer(gm: fx.GraphModule, value: fx.Node) -> ActQuantizer:
    """A new quantizer with the activation spec of the layer producing ``value``."""
    aq = module_of(gm, value).input_quantizer
    return ActQuantizer(aq.spec, aq.seed)


def _calibrate(gm: fx.GraphModule, quantizers: list[ActQuantizer], calib_data: Any) -> None:
    batches = as_batches(calib_data)
    if not batches:
        raise CompactnnError("quantize_residuals: calib_data= holds no batch.")
    for q in quantizers:
        q.start_observing()
    with torch.no_grad():
        for batch in batches:
            call_model(gm, batch)
    for q in quantizers:
        q.finish_observing()


def _insert(gm: fx.GraphModule, value: fx.Node, quantizer: ActQuantizer) -> str:
    """Put ``quantizer`` right after ``value`` and make every reader read its output."""
    name = f"{PREFIX}_{sum(1 for n, _ in gm.named_children() if n.startswith(PREFIX))}"
    gm.add_module(name, quantizer)
    with gm.graph.inserting_after(value):
        node = gm.graph.call_module(name, (value,))
    value.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
    return name
