"""8-bit codes as two 4-bit halves, for MatMulNBits below ``accuracy_level=4``.

ONNX Runtime (MLAS, 1.32) has float32-compute kernels for 4-bit ``MatMulNBits`` but none for
8-bit: at ``accuracy_level`` 0 to 3 an 8-bit node dequantizes its whole weight on every call.
Measured (AMD Zen 4, 2 threads, block 32): a 32000x512 LM head 181 ms per call at 1 and at 8
tokens; MiniLM's 384x384 query 1.5 ms at 8 tokens. Each code ``c = 16 h + l`` (``h, l`` in
0..15) and zero point ``z = 16 zh + zl`` give ``c - z = 16 (h - zh) + (l - zl)``, so the
layer is ``16 * MatMulNBits(h, zh) + MatMulNBits(l, zl)`` on the same scales: two 4-bit nodes
on the fast kernels, the same bytes (two nibbles a code), the same numbers up to float32
summation order (relative 1e-7 to 1e-6 measured against float64; the 8-bit node 3e-7). The
head above: 6.0 ms at 1 token, 30.6 ms at 8; the query 0.10 ms. ``Mul`` by 16 is exact in
float32. At ``accuracy_level=4`` the 8-bit node is the faster one (1.0 against 2.6 ms for the
head) and stays.

A token table tied to such a head (``GatherBlockQuantized`` on the same 8-bit codes) is split
the same way, ``16 * lookup(h, zh) + lookup(l, zl)``, so it can gather from the two halves'
codes (:func:`~compactnn.kernels.nbits_tables.share_head_codes`): stored once still. Its rows
then differ from ``(c - z) * s`` by float32 rounding (one or two ulps).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from compactnn.kernels.graph_edit import replace_nodes
from compactnn.kernels.nbits_check import PINNED
from compactnn.kernels.nbits_tables import pack_codes

MS_DOMAIN = "com.microsoft"
SIXTEEN = "nbits_split_sixteen"  # the float32 scalar 16 the high halves are scaled by


def _attr(node: Any, name: str) -> int | None:
    return next((a.i for a in node.attribute if a.name == name), None)


def halves(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The high and low 4-bit halves of 8-bit ``codes`` ``(..., n)`` (n even), each packed two
    a byte along the last axis, low nibble first (:func:`pack_codes`).

    Example:
        >>> hi, lo = halves(np.array([[0x12, 0x34]], np.uint8))
        >>> hex(hi[0, 0]), hex(lo[0, 0])
        ('0x31', '0x42')
    """
    c = torch.from_numpy(np.array(codes, dtype=np.uint8))  # a writable copy
    return pack_codes(c >> 4, 4).numpy(), pack_codes(c & 15, 4).numpy()


def _scale_by_16(onnx: Any, graph: Any, inits: dict) -> str:
    if SIXTEEN not in inits:
        inits[SIXTEEN] = onnx.numpy_helper.from_array(np.array(16.0, np.float32), SIXTEEN)
        graph.initializer.append(inits[SIXTEEN])
    return SIXTEEN


def _combine(onnx: Any, graph: Any, inits: dict, out: str, name: str) -> list[Any]:
    """``out = 16 * out_hi + out_lo``."""
    make = onnx.helper.make_node
    sixteen = _scale_by_16(onnx, graph, inits)
    return [
        make("Mul", [f"{out}_hi", sixteen], [f"{out}_hi16"], name=f"{name}_hi16"),
        make("Add", [f"{out}_hi16", f"{out}_lo"], [out], name=f"{name}_halves"),
    ]


def split_byte_nodes(onnx: Any, graph: Any) -> int:
    """Replace every 8-bit ``MatMulNBits`` of ``graph`` below ``accuracy_level=4`` (not
    :data:`~compactnn.kernels.nbits_check.PINNED`; inputs ``A, B, scales, zero_points`` as
    initializers) by its two 4-bit halves (module doc), in place; returns how many."""
    to_array = onnx.numpy_helper.to_array
    inits = {i.name: i for i in graph.initializer}
    nodes, dropped, count = [], set(), 0
    for node in list(graph.node):
        fits = (
            node.op_type == "MatMulNBits"
            and _attr(node, "bits") == 8
            and (_attr(node, "accuracy_level") or 0) != 4
            and PINNED not in node.name
            and len(node.input) == 4
            and all(i in inits for i in node.input[1:])
        )
        if not fits:
            nodes.append(node)
            continue
        a, b, scales, zeros = node.input
        rows, blocks = _attr(node, "N"), _attr(node, "K") // _attr(node, "block_size")
        z = to_array(inits[zeros]).reshape(rows, blocks)
        for half, codes, zero in _named_halves(onnx, graph, b, to_array(inits[b]), zeros, z, 1):
            nodes.append(_half_node(onnx, node, [a, codes, scales, zero], half))
        nodes += _combine(onnx, graph, inits, node.output[0], node.name)
        dropped.update((b, zeros))
        count += 1
    replace_nodes(graph, nodes, dropped)
    return count


def split_tied_gathers(onnx: Any, graph: Any) -> int:
    """Replace every 8-bit ``GatherBlockQuantized`` (``quantize_axis=1``, its tensors in
    initializers) whose codes are those a split ``MatMulNBits`` pair holds (a tied LM head,
    :func:`split_byte_nodes`) by two 4-bit lookups of the halves, ``16 * hi + lo``, on
    tensors of their own, in place (:func:`~compactnn.kernels.nbits_tables.share_head_codes`
    then reads the head's instead); returns how many."""
    to_array = onnx.numpy_helper.to_array
    inits = {i.name: i for i in graph.initializer}
    halves_held = {
        to_array(inits[n.input[1]]).tobytes()
        for n in graph.node
        if n.op_type == "MatMulNBits" and n.name.endswith("_hi") and n.input[1] in inits
    }
    if not halves_held:
        return 0
    nodes, dropped, count = [], set(), 0
    for node in list(graph.node):
        own = [node.input[0], *node.input[2:]] if len(node.input) == 4 else []
        fits = (
            node.op_type == "GatherBlockQuantized"
            and _attr(node, "bits") == 8
            and _attr(node, "quantize_axis") == 1
            and own
            and all(i in inits for i in own)
        )
        codes = to_array(inits[own[0]]) if fits else None
        if codes is None or halves(codes)[0].tobytes() not in halves_held:
            nodes.append(node)
            continue
        data, ids, scales, zeros = node.input
        z = to_array(inits[zeros])
        for half, packed, zero in _named_halves(onnx, graph, data, codes, zeros, z, 2):
            nodes.append(_half_node(onnx, node, [packed, ids, scales, zero], half))
        nodes += _combine(onnx, graph, inits, node.output[0], node.name)
        dropped.update((data, zeros))
        count += 1
    replace_nodes(graph, nodes, dropped)
    return count


def _named_halves(
    onnx: Any, graph: Any, codes_name: str, codes: Any, zeros_name: str, zeros: Any, zero_dims: int
) -> list[tuple[str, str, str]]:
    """Add the high and low halves of ``codes`` and of ``zeros`` (kept ``zero_dims``-D) to
    ``graph`` as initializers; returns ``(half, codes name, zero points name)`` per half."""
    from_array, out = onnx.numpy_helper.from_array, []
    for half, c, z in zip(("hi", "lo"), halves(codes), halves(zeros), strict=True):
        z = z.reshape(-1) if zero_dims == 1 else z  # MatMulNBits' zero points are 1-D
        names = (f"{codes_name}_{half}", f"{zeros_name}_{half}")
        graph.initializer.extend([from_array(c, names[0]), from_array(z, names[1])])
        out.append((half, *names))
    return out


def _half_node(onnx: Any, node: Any, inputs: list[str], half: str) -> Any:
    """``node`` (an 8-bit MatMulNBits or GatherBlockQuantized) as its 4-bit ``half`` on
    ``inputs``, writing ``<output>_<half>``."""
    attrs = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
    return onnx.helper.make_node(
        node.op_type,
        inputs,
        [f"{node.output[0]}_{half}"],
        name=f"{node.name}_{half}",
        domain=MS_DOMAIN,
        **(attrs | {"bits": 4}),
    )
