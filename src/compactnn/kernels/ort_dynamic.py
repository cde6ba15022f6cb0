"""Per-tensor dynamic W8A8 linear layers on ONNX Runtime's ``com.microsoft::DynamicQuantizeMatMul``.

A layer whose input quantizer takes one range per tensor at run time (``spec.dynamic``, the
``a8d`` short names: ONNX's ``DynamicQuantizeLinear`` grid, unsigned 8-bit, asymmetric) and
whose weight is symmetric 8-bit per output channel (or per tensor) becomes one
``DynamicQuantizeMatMul`` node holding compactnn's own codes ``B`` ``(K, N)`` int8 and scales
``(N,)``: ONNX Runtime quantizes the input as the simulation does (same float32 formula,
division and rounding half to even, checked code for code in the tests), accumulates
``(q_x - z_x) q_w`` in int32 on its VNNI kernels (MLAS u8s8 GEMM) and scales by
``s_x s_w``: the simulated layer up to float32 summation order. The node is the one ONNX
Runtime's own ``quantize_dynamic`` fuses to, so the delivered model runs at that tool's speed
with the weights compactnn chose (per-channel, GPTQ, SmoothQuant scaling).

One range for the whole tensor means a sentence's result depends on the other sentences of
its batch (and on padding positions): the simulation computes the same, so the two agree, but
batch 1 and batch 8 give slightly different numbers. Per-token grids (``w8a8-smoothquant``'s
dynamic layers) run on ``to_kernels`` instead.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from compactnn._optional import require
from compactnn.core.qlayers import QuantLinear
from compactnn.kernels.graph_edit import replace_nodes

DYNAMIC = 0  # the "block size" :func:`~compactnn.kernels.ort_nbits.dequantized_model` records
INTEGER_OPS = ("MatMulNBits", "DynamicQuantizeMatMul")  # the nodes that run compactnn's codes
# metadata: the INTEGER_OPS a file holds, read back through onnxruntime alone (importing the
# onnx package to list them added 5.6 MiB to the running MiniLM w4 model's resident memory)
OPS_KEY = "compactnn.integer_ops"


def integer_ops(source: bytes | str) -> list[str]:
    """Which of :data:`INTEGER_OPS` the ONNX model ``source`` (bytes or a path) holds."""
    onnx = require("onnx", "onnx")
    if isinstance(source, bytes):
        proto = onnx.load_from_string(source)
    else:
        proto = onnx.load(source, load_external_data=False)
    ops = {n.op_type for n in proto.graph.node}
    return [op for op in INTEGER_OPS if op in ops]


def stamp_integer_ops(proto: Any) -> None:
    """Record :func:`integer_ops` of ``proto`` in its metadata (:data:`OPS_KEY`), in place."""
    ops = {n.op_type for n in proto.graph.node}
    kept = [e for e in proto.metadata_props if e.key != OPS_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    entry = proto.metadata_props.add()
    entry.key, entry.value = OPS_KEY, json.dumps([op for op in INTEGER_OPS if op in ops])


def session_integer_ops(session: Any, source: bytes | str) -> list[str]:
    """The integer ops of the model an ONNX Runtime ``session`` runs: its :data:`OPS_KEY`
    metadata, or (a file written without it) :func:`integer_ops` of ``source``."""
    stamped = session.get_modelmeta().custom_metadata_map.get(OPS_KEY)
    return json.loads(stamped) if stamped is not None else integer_ops(source)


def dynamic_format(layer: QuantLinear) -> tuple[int, int] | None:
    """``(8, DYNAMIC)`` when ``layer`` fits ``DynamicQuantizeMatMul``, else None."""
    aq = layer.input_quantizer
    spec = layer.weight_spec
    fits = (
        aq is not None
        and aq.enabled
        and getattr(aq, "is_dynamic", False)
        and aq.is_uniform
        and aq.spec.bits == 8
        and spec.bits == 8
        and spec.symmetric
        and spec.granularity in ("channel", "tensor")
        and getattr(layer, "weight_levels", None) is None
    )
    return (8, DYNAMIC) if fits else None


def dynamic_tensors(layer: QuantLinear) -> dict[str, torch.Tensor]:
    """``B`` ``(K, N)`` int8 codes and ``b_scale`` ``(N,)`` float32: ``w = q * s``."""
    n = layer.out_features
    codes = layer.weight_codes.reshape(n, -1)
    if layer.weight_zero.abs().max() > 0:  # a symmetric grid keeps zero points at 0
        raise ValueError("DynamicQuantizeMatMul here takes symmetric weights (zero point 0)")
    scale = layer.weight_scale.float().reshape(-1)
    scale = scale.expand(n) if scale.numel() == 1 else scale  # a per-tensor grid
    return {
        "B": codes.to(torch.int8).T.contiguous(),
        "b_scale": scale.contiguous(),
    }


def dynamic_nodes(onnx: Any, node: Any, layer: QuantLinear, names: list[str], out: str) -> list:
    """The ``DynamicQuantizeMatMul`` replacing ``node`` (a MatMul, or a linear Gemm whose bias
    it takes), reading the initializers ``names`` (``B``, ``b_scale``), writing ``out``."""
    bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 else ""
    inputs = [node.input[0], *names, "", bias] if bias else [node.input[0], *names]
    return [
        onnx.helper.make_node(
            "DynamicQuantizeMatMul",
            inputs,
            [out],
            name=f"{node.name}_dynamic_int8",
            domain="com.microsoft",
        )
    ]


def share_dynamic_heads(onnx: Any, graph: Any) -> int:
    """Let each 8-bit ``GatherBlockQuantized`` token table whose codes and row scales are those
    of a ``DynamicQuantizeMatMul`` head (an LM head tied to its table) read the head's ``B``
    ``(D, V)`` and ``b_scale`` instead of a copy: ``Gather(B, ids, axis=1)``, transposed, cast to
    float32 and scaled by the gathered row scales, ``q * s`` as the table's ``(q - z) * s``
    (the same float32 product, the codes stored once). Returns the tables shared."""
    helper, np_ = onnx.helper, onnx.numpy_helper
    inits = {i.name: i for i in graph.initializer}

    def arr(name: str) -> Any:
        return np_.to_array(inits[name])

    heads = [
        n
        for n in graph.node
        if n.op_type == "DynamicQuantizeMatMul"
        and len(n.input) == 3
        and all(i in inits for i in n.input[1:])
    ]

    def head_of(gbq: Any) -> Any:
        attrs = {a.name: a.i for a in gbq.attribute}
        if attrs.get("bits") != 8 or len(gbq.input) != 4:
            return None
        if not all(gbq.input[i] in inits for i in (0, 2, 3)):
            return None
        data, scales, zeros = (arr(gbq.input[i]) for i in (0, 2, 3))
        if data.ndim != 2 or scales.shape != zeros.shape:
            return None
        reps = data.shape[1] // scales.shape[1]
        codes = data.astype("int32") - zeros.astype("int32").repeat(reps, axis=1)
        for head in heads:
            b, s = arr(head.input[1]), arr(head.input[2])
            if b.shape != data.shape[::-1] or s.shape != (data.shape[0],):
                continue
            if (scales == s[:, None]).all() and (codes == b.T.astype("int32")).all():
                return head
        return None

    shared, nodes, dropped = 0, [], set()
    for node in graph.node:
        head = head_of(node) if node.op_type == "GatherBlockQuantized" else None
        if head is None:
            nodes.append(node)
            continue
        b, s, ids, out = head.input[1], head.input[2], node.input[1], node.output[0]
        p = f"{node.name or out}_tied"
        width = np_.from_array(np.array([int(inits[b].dims[0])], np.int64), f"{p}_width")
        flat = np_.from_array(np.array([-1], np.int64), f"{p}_flat")
        last = np_.from_array(np.array([-1], np.int64), f"{p}_last")
        graph.initializer.extend([width, flat, last])
        nodes += [
            helper.make_node("Reshape", [ids, flat.name], [f"{p}_ids"], name=f"{p}_ids"),
            helper.make_node("Gather", [b, f"{p}_ids"], [f"{p}_cols"], name=f"{p}_g", axis=1),
            helper.make_node("Transpose", [f"{p}_cols"], [f"{p}_rows"], name=f"{p}_t", perm=[1, 0]),
            helper.make_node("Cast", [f"{p}_rows"], [f"{p}_f"], name=f"{p}_c", to=1),
            helper.make_node("Gather", [s, f"{p}_ids"], [f"{p}_s"], name=f"{p}_gs", axis=0),
            helper.make_node("Unsqueeze", [f"{p}_s", last.name], [f"{p}_s1"], name=f"{p}_u"),
            helper.make_node("Mul", [f"{p}_f", f"{p}_s1"], [f"{p}_v"], name=f"{p}_m"),
            helper.make_node("Shape", [ids], [f"{p}_shape"], name=f"{p}_shape"),
            helper.make_node(
                "Concat", [f"{p}_shape", width.name], [f"{p}_oshape"], name=f"{p}_cat", axis=0
            ),
            helper.make_node("Reshape", [f"{p}_v", f"{p}_oshape"], [out], name=f"{p}_out"),
        ]
        dropped.update(node.input[i] for i in (0, 2, 3))
        shared += 1
    replace_nodes(graph, nodes, dropped)
    return shared
