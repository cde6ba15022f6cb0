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

``grids="all"`` goes as far as ONNX Runtime's ``quantize_static``: every add operand and sum,
every layer output a non-layer op reads, hardswish (split into ``x * hardsigmoid(x)``),
squeeze-excite gates and products and average pools get a calibrated 8-bit grid, so that the
QDQ export runs on ONNX Runtime as ``QLinearConv`` / ``QLinearAdd`` / ``QLinearMul`` /
``QLinearGlobalAveragePool`` only (the model's output stays float).
"""

from __future__ import annotations

import copy
import operator
from typing import Any

import torch
from torch import fx, nn

from compactnn.core.calib import as_batches, call_model
from compactnn.core.qlayers import ActQuantizer, is_quant_layer
from compactnn.errors import CompactnnError
from compactnn.lowering.graph import is_add, is_transparent, module_of, trace, unary_attr

PREFIX = "residual_quantizer"
GRIDS = ("shared", "all")


def quantize_residuals(
    qmodel: nn.Module, calib_data: Any = None, *, grids: str = "shared", output: bool = False
) -> fx.GraphModule:
    """A copy of ``qmodel`` whose residual adds read quantized values (see module docstring).

    Args:
        qmodel: a model from ``compactnn.compress(..., "w8a8")`` (activation quantizers
            calibrated); not modified. Must trace with ``torch.fx``.
        calib_data: optional calibration batches. When given, an add operand that only adds
            read and that a quantized layer computes (a ResNet's 1x1 shortcut convolution)
            gets its own 8-bit grid too, calibrated on this data like the layers' inputs (an
            extra rounding the simulation then has, as ONNX Runtime's int8 graphs do); the
            integer graph then has no float value left between the first and last layers.
        grids: ``"shared"`` quantizes only values on a grid their layers already use (plus
            the shortcut convolution above); ``"all"`` (needs ``calib_data``) also gives
            every other add operand and add output its own 8-bit grid calibrated on
            ``calib_data`` (min-max, the activation spec of the producing layer, else of the
            model's first quantized layer), as ONNX Runtime's ``quantize_static`` does: each
            add then reads and writes uint8 codes, ``y = Q(Q_a(a) + Q_b(b))``, so ONNX
            Runtime runs every convolution as ``QLinearConv`` and every add as
            ``QLinearAdd``. Beyond residuals, every other float activation an integer graph
            would compute in float gets a grid too (a layer output read by a hardswish or
            a multiply, a hardswish, written ``x * hardsigmoid(x)`` with the gate
            quantized, a squeeze-excite gate and product, an average pool), so MobileNetV3's
            convolutions, gates and products run as ``QLinearConv`` / ``QLinearMul`` /
            ``QLinearGlobalAveragePool``. More roundings than ``"shared"``: measure the
            accuracy of the returned model.
        output: with ``grids="all"``, also quantize the model's output when a quantized
            layer computes it (a classifier's logits, 8 bits, calibrated on ``calib_data``),
            as ``quantize_static`` does: ONNX Runtime then runs the head as ``QGemm``
            instead of a float ``Gemm`` (measured: the larger share of MobileNetV3-Small's
            time at 64x64, batch 1). Logits move by up to half a step of their grid.

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
    if grids not in GRIDS:
        raise CompactnnError(f"quantize_residuals: grids={grids!r} is unknown; use one of {GRIDS}.")
    if grids == "all" and calib_data is None:
        raise CompactnnError(
            "quantize_residuals(grids='all') calibrates new grids: pass calib_data= a few "
            "batches of your data."
        )
    gm = trace(copy.deepcopy(qmodel).eval())
    fallback = _first_act_quantizer(gm)
    inserted: dict[str, str] = {}
    calibrate: list[ActQuantizer] = []
    for add in [n for n in gm.graph.nodes if is_add(n)]:
        if add.args[0] is add.args[1]:
            continue
        fresh = _second_layer_operand(gm, add) if calib_data is not None else None
        for value in (*add.args, _sum_value(gm, add)):
            if not isinstance(value, fx.Node) or isinstance(module_of(gm, value), ActQuantizer):
                continue  # a constant, or already quantized by an earlier add of this pass
            quantizer = _shared_quantizer(gm, value)
            if quantizer is None and (value is fresh or grids == "all"):
                quantizer = _fresh_quantizer(gm, value, fallback)
                calibrate.append(quantizer)
            if quantizer is not None:
                inserted[_insert(gm, value, quantizer)] = value.name
    if grids == "all":
        _split_hardswish(gm)
        for value in [n for n in gm.graph.nodes if _needs_grid(gm, n, output)]:
            quantizer = _shared_quantizer(gm, value)
            if quantizer is None:
                quantizer = _fresh_quantizer(gm, value, fallback)
                calibrate.append(quantizer)
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


ELEMENTWISE_MODULES = (nn.Hardswish, nn.Hardsigmoid, nn.AdaptiveAvgPool2d, nn.AvgPool2d)
ELEMENTWISE_FUNCS = (
    operator.mul, torch.mul, nn.functional.hardswish, nn.functional.hardsigmoid,
    nn.functional.adaptive_avg_pool2d, nn.functional.avg_pool2d,
)  # fmt: skip


def _split_hardswish(gm: fx.GraphModule) -> None:
    """``hardswish(x)`` becomes ``x * hardsigmoid(x)`` (the same function), so that the gate
    gets a grid of its own and an integer graph multiplies codes (``QLinearMul``)."""
    for node in list(gm.graph.nodes):
        m = module_of(gm, node)
        is_hswish = isinstance(m, nn.Hardswish) or (
            node.op == "call_function" and node.target is nn.functional.hardswish
        )
        if not is_hswish:
            continue
        x = node.args[0]
        with gm.graph.inserting_before(node):
            gate = gm.graph.call_function(nn.functional.hardsigmoid, (x,))
            prod = gm.graph.call_function(operator.mul, (x, gate))
        node.replace_all_uses_with(prod)
        gm.graph.erase_node(node)


def _needs_grid(gm: fx.GraphModule, value: fx.Node, output: bool = False) -> bool:
    """For ``grids="all"``: a float activation an integer graph would have to compute in
    float (a layer output read by a hardswish or a multiply, a ReLU output a squeeze-excite
    gate reads, a hardswish, a sigmoid gate, an average pool, a product), and that no
    quantizer or quantized layer reads as it is."""
    m = module_of(gm, value)
    if m is not None:
        wanted = is_quant_layer(m) or isinstance(m, ELEMENTWISE_MODULES)
    else:
        wanted = value.op == "call_function" and value.target in ELEMENTWISE_FUNCS
    wanted = wanted or unary_attr(gm, value) is not None  # a ReLU (its input is a layer's)
    if not wanted or not value.users:
        return False
    users = list(value.users)
    if any(isinstance(module_of(gm, u), ActQuantizer) for u in users):
        return False  # already quantized
    if any(u.op == "output" for u in users):  # the model's output: float unless asked
        return output and m is not None and is_quant_layer(m) and len(users) == 1
    if len(users) == 1 and unary_attr(gm, users[0]) is not None:
        return False  # a ReLU follows: the integer kernel applies it, its output is quantized
    return not all(_layers_read(gm, u, value) for u in users)


def _layers_read(gm: fx.GraphModule, user: fx.Node, value: fx.Node) -> bool:
    """Whether ``user`` quantizes ``value`` itself: a quantized layer reading it as input, an
    activation quantizer, or an op that commutes with quantizing (a flatten, reshape or max
    pool) that only such readers read. (ResNet's stem: the max pool's output has the grid
    of the block it feeds, so its input needs no grid of its own.)"""
    m = module_of(gm, user)
    if m is not None and is_quant_layer(m):
        return user.args[0] is value
    if isinstance(m, ActQuantizer):
        return True
    if is_transparent(gm, user) and user.users and unary_attr(gm, user) is None:
        return all(_layers_read(gm, u, user) for u in user.users)
    return False


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
        if (
            aq is None
            or not aq.enabled
            or not aq.calibrated
            or aq.runtime_range
            or getattr(aq, "is_per_token", False)
            or aq.qtype.bits > 8
            or not aq.is_uniform
        ):
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
    return static_grid(aq)


def static_grid(aq: ActQuantizer | None) -> bool:
    """A calibrated uniform grid of at most 8 bits (not one taken at run time)."""
    return (
        aq is not None
        and aq.calibrated
        and not aq.runtime_range
        and not getattr(aq, "is_per_token", False)
        and aq.qtype.bits <= 8
        and aq.is_uniform
    )


def _second_layer_operand(gm: fx.GraphModule, add: fx.Node) -> fx.Node | None:
    """When both operands are layer outputs only adds read, the later one: the earlier layer
    takes the add into its kernel (``plan._fuse``) and the later one needs a grid."""
    both = [a for a in add.args if _layer_output_only_adds_read(gm, a)]
    if len(both) != 2:
        return None
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return max(both, key=order.get)


def _first_act_quantizer(gm: fx.GraphModule) -> ActQuantizer | None:
    """The input quantizer of the model's first quantized layer with a calibrated 8-bit one."""
    for m in gm.modules():
        aq = getattr(m, "input_quantizer", None) if is_quant_layer(m) else None
        if aq is not None and aq.enabled and static_grid(aq):
            return aq
    return None


def _fresh_quantizer(
    gm: fx.GraphModule, value: fx.Node, fallback: ActQuantizer | None
) -> ActQuantizer:
    """A new quantizer with the activation spec of the layer producing ``value`` (or, for a
    value no quantized layer produces, of ``fallback``)."""
    m = module_of(gm, value)
    aq = m.input_quantizer if m is not None and is_quant_layer(m) else None
    if aq is None or aq.qtype.bits > 8 or not aq.is_uniform:
        aq = fallback
    if aq is None:
        raise CompactnnError(
            "quantize_residuals(grids='all') found no calibrated 8-bit activation quantizer "
            "to copy the spec from: compress with a recipe that quantizes activations (w8a8)."
        )
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
