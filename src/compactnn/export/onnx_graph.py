"""Edits of an exported QDQ ONNX graph (``export.onnx``'s second half): the layers' integer
codes and int32 biases stored as the kernels take them, grids hoisted before reshapes and max
pools, float-output heads folded for the deployed session. Each keeps the numbers the graph
computes (the one exception, int32 biases, is listed in the model's metadata).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from torch import nn

from compactnn._optional import require

onnx = require("onnx", "onnx")
numpy_helper = require("onnx.numpy_helper", "onnx")

INT32_KEY = "compactnn.int32_bias_layers"  # metadata: the layers with int32 biases


def _readers(graph: Any) -> dict[str, list]:
    """Each value's name -> the nodes that read it."""
    readers: dict[str, list] = {}
    for n in graph.node:
        for name in n.input:
            readers.setdefault(name, []).append(n)
    return readers


RESHAPES = ("Flatten", "Reshape", "Squeeze", "Unsqueeze")
# ops that commute with a per-tensor rounding: they move or select values (a max of rounded
# values is the rounding of the max, as rounding is monotone)
HOISTABLE = (*RESHAPES, "MaxPool")


def quantize_before_moves(proto: onnx.ModelProto) -> None:
    """``Flatten -> Q -> DQ`` becomes ``Q -> DQ -> Flatten -> Q -> DQ`` (same grid twice);
    the same for ``MaxPool``.

    Moving or selecting data does not change a per-tensor rounding (for a max pool: rounding
    is monotone, so the max of the rounded values is the rounding of the max) and rounding
    twice on one grid is idempotent, so the numbers stay the same; but now the value is
    quantized right where it is computed (a global average pool before a classifier's
    flatten), which ONNX Runtime fuses into ``QLinearGlobalAveragePool``, and the second
    pair around the reshape is one it removes. Around a max pool, one grid on both sides is
    what ONNX Runtime needs to run the pool on uint8 codes (without it, ResNet's stem pool ran
    in float32 between layout changes); ``quantize_residuals(grids="all")`` leaves a max
    pool's input without a grid of its own for this reason.
    """
    nodes = list(proto.graph.node)
    readers = _readers(proto.graph)
    for node in nodes:
        users = readers.get(node.output[0], []) if node.op_type in HOISTABLE else []
        if len(users) != 1 or users[0].op_type != "QuantizeLinear":
            continue
        q = users[0]
        after = readers.get(q.output[0], [])
        if len(q.input) < 3 or not after or any(u.op_type != "DequantizeLinear" for u in after):
            continue
        src = node.input[0]
        q2 = onnx.helper.make_node(
            "QuantizeLinear", [src, *q.input[1:]], [src + "_q"], name=q.name + "_hoisted"
        )
        dq2 = onnx.helper.make_node(
            "DequantizeLinear", [src + "_q", *q.input[1:]], [src + "_dq"],
            name=q.name + "_hoisted_dq",
        )  # fmt: skip
        node.input[0] = src + "_dq"
        graph = proto.graph.node
        # after the grid's constants (they precede q), then the reshape itself
        graph.remove(node)
        at = list(graph).index(q)
        for k, new in enumerate((q2, dq2, node)):
            graph.insert(at + k, new)


def fold_float_outputs(data: bytes) -> bytes:
    """The model ``data`` with the weights of the layers ONNX Runtime runs in float stored
    dequantized.

    ONNX Runtime fuses ``DQ -> Conv`` into ``QLinearConv`` only when a ``QuantizeLinear``
    follows (after a ``Relu`` / ``Clip``), and ``DQ -> Gemm`` into ``QGemm`` only when its bias
    is int32 codes or absent; any other such layer (a convolution before a hardswish, a
    squeeze-excite gate or a float residual add; a float-output ``MatMul``) runs in float on a
    weight its constant folding never folds, so it dequantized the int8 weight on every call
    and, the weight not being a constant, got no NCHWc kernel (measured: MobileNetV3-Small w8a8
    64x64 b1, 38 such convolutions, 1.9 ms against 0.35 ms folded). Storing
    ``(codes - zero) * scale`` (float32, what ``DequantizeLinear`` computes) gives the same
    numbers without that per-call work. The deployed ONNX Runtime session runs this form; the
    exported file keeps the codes.
    """
    proto = onnx.load_from_string(data)
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    readers = _readers(graph)
    for node in list(graph.node):
        if node.op_type not in ("Conv", "Gemm", "MatMul") or _fused(node, readers, producer):
            continue
        for k, name in list(enumerate(node.input))[1:]:
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear" or len(readers[name]) != 1:
                continue
            consts = [_constant(i, inits, producer) for i in dq.input]
            if None in consts or (k == 1 and len(dq.input) < 3):
                continue
            graph.initializer.append(numpy_helper.from_array(_dequantized(dq, consts), name))
            graph.node.remove(dq)
            for used in dq.input:
                if used in inits and not any(used in n.input for n in graph.node):
                    graph.initializer.remove(inits[used])
    return proto.SerializeToString()


def _fused(node: Any, readers: dict[str, list], producer: dict[str, Any]) -> bool:
    """Whether ONNX Runtime's QDQ fusion turns ``node`` into an integer kernel: a layer whose
    output is quantized again, or a ``Gemm`` on a dequantized input with an int32 bias (or
    none), which becomes a float-output ``QGemm``."""
    if _requantized(readers, node):
        return True
    if node.op_type != "Gemm" or not _dequantizes(producer, node.input[0]):
        return False
    return len(node.input) < 3 or _dequantizes(producer, node.input[2])


def _dequantizes(producer: dict[str, Any], name: str) -> bool:
    return producer.get(name) is not None and producer[name].op_type == "DequantizeLinear"


def _constant(name: str, inits: dict, producer: dict[str, Any]) -> Any:
    """The initializer ``name`` stands for, through the exporter's ``Identity`` nodes (it shares
    equal constants, such as all-zero zero points, that way); None when it is computed."""
    while name not in inits and name in producer and producer[name].op_type == "Identity":
        name = producer[name].input[0]
    return inits.get(name)


def _dequantized(dq: Any, consts: list) -> np.ndarray:
    """What ``DequantizeLinear`` ``dq`` computes from its constant inputs ``consts``
    (initializers: codes, scale and zero point), in float32."""
    codes, scale = (numpy_helper.to_array(c) for c in consts[:2])
    zero = numpy_helper.to_array(consts[2]) if len(consts) > 2 else np.zeros(())
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) if codes.ndim > 1 else 0
    shape = [1] * codes.ndim
    if scale.ndim == 1:
        shape[axis] = -1
    centred = codes.astype(np.int64) - zero.astype(np.int64).reshape(shape if zero.ndim else ())
    return centred.astype(np.float32) * scale.astype(np.float32).reshape(shape)


def store_codes(proto: onnx.ModelProto, model: nn.Module, layers: dict[str, Any]) -> None:
    """Replace ``QuantizeLinear(float weight)`` by the layer's own integer codes."""
    inits = {i.name: i for i in proto.graph.initializer}
    params = {id(p): n for n, p in model.named_parameters()}
    by_name = {params[id(q.weight)]: q.codes for q in layers.values() if q.per_channel}
    for q in layers.values():  # a codebook's second int8 term (see export.onnx._QDQLayer)
        if q.per_channel and getattr(q, "weight2", None) is not None:
            by_name[params[id(q.weight2)]] = q.codes2
    for node in list(proto.graph.node):
        if node.op_type != "QuantizeLinear" or node.input[0] not in by_name:
            continue
        layer_codes = by_name[node.input[0]]
        dtype = np.int8 if layer_codes.dtype == torch.int8 else np.uint8
        codes = numpy_helper.from_array(
            layer_codes.numpy().astype(dtype), node.output[0] + "_codes"
        )
        proto.graph.initializer.append(codes)
        for user in proto.graph.node:
            for i, name in enumerate(user.input):
                if name == node.output[0]:
                    user.input[i] = codes.name
        proto.graph.node.remove(node)
        if not any(node.input[0] in n.input for n in proto.graph.node):
            proto.graph.initializer.remove(inits[node.input[0]])  # the float copy is unused


def store_bias_codes(
    proto: onnx.ModelProto, model: nn.Module, layers: dict[str, Any], gemms: bool = False
) -> None:
    """Store the bias of each layer ONNX Runtime fuses into an integer kernel as
    ``DequantizeLinear(int32 codes, scale)``: a layer whose output is quantized again
    (``QLinearConv`` / ``QGemm``) and, with ``gemms``, every ``Gemm``, which ONNX Runtime fuses
    into a float-output ``QGemm`` only with an int32 bias (with the simulation's float bias, a
    classifier head stayed a float ``Gemm`` dequantizing its int8 weight on every call; the
    exported file, which keeps the codes, takes this; the deployed session folds such a head's
    weight instead, :func:`fold_float_outputs`). Every other layer gets the simulation's float
    bias back (ONNX Runtime runs it in float, so no rounding is needed). The names of the int32
    layers go in the model's metadata (:data:`INT32_KEY`, read by :func:`int32_bias_layers`).

    Each such ``DequantizeLinear`` carries its all-zero int32 zero point, optional in ONNX:
    without it ORT Mobile's converter (``convert_onnx_models_to_ort --optimization_style
    Runtime``, the style of NNAPI / XNNPACK QDQ models) refused every file ("the sum of input
    arg count is not equal to size of input defs")."""
    inits = {i.name: i for i in proto.graph.initializer}
    params = {id(p): n for n, p in model.named_parameters()}
    _unshare_biases(proto, params, layers, inits)
    readers = _readers(proto.graph)
    int32 = []
    for layer_name, layer in layers.items():
        name = params.get(id(layer.bias)) if layer.bias_codes is not None else None
        if name not in inits:
            continue  # renamed or folded by the exporter: nothing to store
        users = readers.get(name, [])
        fused = (_requantized(readers, n) or (gemms and n.op_type == "Gemm") for n in users)
        if not any(fused):
            inits[name].CopyFrom(numpy_helper.from_array(layer.float_bias.numpy(), name))
            continue
        int32.append(layer_name)
        codes = numpy_helper.from_array(layer.bias_codes.numpy(), name + "_int32")
        scale = numpy_helper.from_array(layer.bias_scale.numpy(), name + "_scale")
        zero = numpy_helper.from_array(np.zeros(scale.dims, np.int32), name + "_zero")
        proto.graph.initializer.extend([codes, scale, zero])
        proto.graph.initializer.remove(inits[name])
        dq = onnx.helper.make_node(
            "DequantizeLinear", [codes.name, scale.name, zero.name], [name], name=name + "_dq",
            axis=0,
        )  # fmt: skip
        proto.graph.node.insert(0, dq)  # its inputs are initializers: first is topological
    entry = proto.metadata_props.add()
    entry.key, entry.value = INT32_KEY, json.dumps(int32)


def _unshare_biases(proto: onnx.ModelProto, params: dict, layers: dict, inits: dict) -> None:
    """Give back each layer its own bias initializer where the exporter shares equal biases
    of several layers through ``Identity`` nodes (its initializer deduplication): each layer's
    int32 codes are on its own accumulator grid, and a bias read through ``Identity`` (from
    another layer's ``DequantizeLinear``) kept ONNX Runtime from fusing the layer into
    ``QLinearConv`` (measured: 10 of MobileNetV2's 52 convolutions ran in float)."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    for layer in layers.values():
        name = params.get(id(layer.bias)) if layer.bias_codes is not None else None
        node = producer.get(name) if name not in inits else None
        if node is None or node.op_type != "Identity":
            continue
        proto.graph.node.remove(node)
        inits[name] = numpy_helper.from_array(layer.float_bias.numpy(), name)
        proto.graph.initializer.append(inits[name])


def int32_bias_layers(data: bytes) -> list[str]:
    """The layers whose biases the ONNX model ``data`` (``export.onnx.to_onnx_bytes``) stores
    on the int32 accumulator grid."""
    proto = onnx.load_from_string(data)
    found = [e.value for e in proto.metadata_props if e.key == INT32_KEY]
    return json.loads(found[0]) if found else []


def _requantized(readers: dict[str, list], node: Any) -> bool:
    """Whether ``node``'s output (after one ``Relu`` / ``Clip``, if that is its only reader)
    is read by ``QuantizeLinear`` nodes only."""
    after = readers.get(node.output[0], [])
    if len(after) == 1 and after[0].op_type in ("Relu", "Clip"):
        after = readers.get(after[0].output[0], [])
    return bool(after) and all(n.op_type == "QuantizeLinear" for n in after)
