"""Token tables of a weight-only transformer on ONNX Runtime (:mod:`compactnn.kernels.ort_nbits`).

Quantized tables (:class:`~compactnn.core.qembedding.QuantEmbedding`) become
``com.microsoft::GatherBlockQuantized`` nodes on their own codes (uint8 bytes holding two
4-bit codes, or one 8-bit code, per-row blocks of scales and zero points): a lookup gathers
codes and dequantizes ``(q - z) * s`` in float32, the simulation's formula; a table tied to
the LM head gathers from the head's MatMulNBits codes instead (:func:`share_head_codes`: stored
once, same numbers). Large float tables can be stored in bfloat16 with a cast after the
lookup. Also the code packing and the tensor key that ``ort_nbits`` uses to find a layer's
weight in the exported graph.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
from torch import nn

from compactnn.core.qembedding import QuantEmbedding
from compactnn.core.qlayers import QuantLinear

# the block a per-channel row is split into on MatMulNBits and GatherBlockQuantized: MLAS's
# fast 4-bit kernels take blocks of 16 to 256, and K = 384 or 1536 (MiniLM) is 128 times an odd
CHANNEL_BLOCK = 128


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``(..., n)`` as bytes, low nibble first for 4 bits (pads odd n)."""
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes
    if codes.shape[-1] % 2:
        codes = torch.cat([codes, torch.zeros_like(codes[..., :1])], -1)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def tensor_key(t: torch.Tensor) -> str:
    a = t.detach().float().contiguous().numpy()
    return hashlib.sha1(a.tobytes()).hexdigest() + str(a.shape)


def nbits_tensors(layer: QuantLinear, bits: int, block: int) -> dict[str, torch.Tensor]:
    """MatMulNBits' ``B`` ``(N, K/block, block*bits/8)`` uint8, ``scales`` ``(N*K/block,)``
    float32 and ``zero_points`` (packed uint8) from ``layer``'s codes: ``w = (q - z) * s``."""
    n, k = layer.out_features, layer.in_features
    shift = 1 << (bits - 1) if layer.weight_spec.qtype.signed else 0  # into 0..2^bits-1
    q = layer.weight_codes.to(torch.int32) + shift  # (N, K)
    scale = layer.weight_scale.float().reshape(n, -1)  # (N, groups): 1 per channel
    reps = k // block // scale.shape[1]  # > 1 for a per-channel row split in blocks
    scale = scale.repeat_interleave(reps, 1)
    zero = (layer.weight_zero.float().reshape(n, -1) + shift).repeat_interleave(reps, 1)
    if not torch.equal(zero, zero.round()) or zero.min() < 0 or zero.max() >= 1 << bits:
        raise ValueError("MatMulNBits needs integer zero points on the code grid")
    blob = pack_codes(q.reshape(n, k // block, block), bits)
    return {
        "B": blob.contiguous(),
        "scales": scale.reshape(-1).contiguous(),
        "zero_points": pack_codes(zero.to(torch.int32), bits).reshape(-1).contiguous(),
    }


def gemm_weight(onnx: Any, node: Any) -> tuple[str, bool] | None:
    """``(B, transB)`` of a ``Gemm`` that is a plain linear layer (``alpha = beta = 1``, no
    ``transA``), else None."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA"):
        return None
    return node.input[1], bool(attrs.get("transB", 0))


def weight_of(onnx: Any, node: Any) -> tuple[str, bool] | None:
    """``(weight input, stored as (N, K))`` of a ``MatMul`` or linear ``Gemm`` node."""
    if node.op_type == "MatMul" and len(node.input) == 2:
        return node.input[1], False
    return gemm_weight(onnx, node) if node.op_type == "Gemm" else None


def gather_format(table: QuantEmbedding) -> tuple[int, int] | None:
    """(bits, block size) of ``table`` on GatherBlockQuantized, or None when it does not fit.

    Codes of 2-4 bits use the 4-bit form, 5-8 bits the 8-bit form; a per-row grid becomes the
    largest power-of-two block (from 16, at most :data:`CHANNEL_BLOCK`: a per-channel LM head's
    MatMulNBits blocks, so a tied table can share its codes) that divides the row, its scale
    repeated per block.
    Zero points must be integers on the code grid.
    """
    if getattr(table, "weight_levels", None) is not None:
        return None
    spec, d = table.weight_spec, table.embedding_dim
    bits = 4 if spec.bits <= 4 else 8
    if spec.granularity == "group":
        block = spec.group_size
    elif spec.granularity == "channel":
        block = min(d & -d, CHANNEL_BLOCK)  # largest power of two dividing d, capped
    else:
        return None
    if block < 16 or block & (block - 1) or d % block:
        return None
    zero = table.weight_zero.float() - spec.qtype.qmin  # on the unsigned code grid
    if not torch.equal(zero, zero.round()) or zero.min() < 0 or zero.max() >= 1 << bits:
        return None  # a fractional zero point: the table stays a float Gather
    return bits, block


def gather_tensors(table: QuantEmbedding, bits: int, block: int) -> dict[str, torch.Tensor]:
    """GatherBlockQuantized's ``data`` ``(V, D*bits/8)`` uint8 (low nibble first), ``scales``
    ``(V, D/block)`` float32 and ``zero_points`` (uint8, packed like ``data``) from the codes
    of ``table``: ``row[j] = (q[j] - z[j // block]) * s[j // block]``."""
    shift = -table.weight_spec.qtype.qmin  # codes into 0..2^bits-1
    q = table.weight_codes.to(torch.int32) + shift  # (V, D)
    scale, zero = table.weight_scale.float(), table.weight_zero.float() + shift  # (V, groups)
    reps = q.shape[1] // block // scale.shape[1]  # > 1 for a per-row grid on smaller blocks
    scale, zero = scale.repeat_interleave(reps, 1), zero.repeat_interleave(reps, 1)
    if not torch.equal(zero, zero.round()) or zero.min() < 0 or zero.max() >= 1 << bits:
        raise ValueError("GatherBlockQuantized needs integer zero points on the code grid")
    return {
        "data": pack_codes(q, bits).contiguous(),
        "scales": scale.contiguous(),
        "zero_points": pack_codes(zero.to(torch.int32), bits).contiguous(),
    }


def gather_tables(model: nn.Module) -> dict[str, tuple]:
    """``{table key: (name, table, bits, block)}`` of the embedding tables of ``model`` that
    GatherBlockQuantized can hold (the key is their dequantized float table's)."""
    found = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantEmbedding) and (fmt := gather_format(m)) is not None:
            found[tensor_key(m.weight)] = (name, m, *fmt)
    return found


def head_blocks(tables: dict[str, tuple], heads: dict[str, tuple]) -> None:
    """Put each per-row table of ``tables`` whose codes are those of a per-channel head of
    ``heads`` (``{key: (name, layer, bits, block)}``: a tied LM head) on that head's blocks,
    in place, so that :func:`share_head_codes` can let its lookup read the head's tensors. A
    weight-only head has the table's blocks already; an a8g head's are its input's groups (32,
    not 128), a row's scale repeated on each: the same numbers on either."""
    for key, (name, table, bits, block) in tables.items():
        if table.weight_spec.granularity != "channel":
            continue
        for _, layer, head_bits, head_block in heads.values():
            if (
                head_bits == bits
                and 16 <= head_block != block
                and table.embedding_dim % head_block == 0
                and layer.weight_spec.granularity == "channel"
                and layer.weight_codes.shape == table.weight_codes.shape
                and torch.equal(layer.weight_codes, table.weight_codes)
            ):
                tables[key] = (name, table, bits, head_block)
                break


def replace_gathers(onnx: Any, graph: Any, tables: dict) -> set[str]:
    """Swap each Gather (axis 0) on a known dequantized table for GatherBlockQuantized on its
    codes; drops the float table when nothing else reads it. Returns the names swapped."""
    from_array, to_array = onnx.numpy_helper.from_array, onnx.numpy_helper.to_array
    inits = {i.name: i for i in graph.initializer}
    keys = {}
    for node in graph.node:
        w = node.input[0] if node.op_type == "Gather" and node.input else ""
        if w in inits and w not in keys and len(inits[w].dims) == 2:
            keys[w] = tensor_key(torch.from_numpy(to_array(inits[w]).copy()))
    swapped, nodes = set(), []
    for node in graph.node:
        w = node.input[0] if node.op_type == "Gather" else ""
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if keys.get(w) not in tables or axis != 0:
            nodes.append(node)
            continue
        name, table, bits, block = tables[keys[w]]
        names = [f"{w}_gbq_{k}" for k in ("data", "scales", "zero_points")]
        if w not in swapped:
            tensors = gather_tensors(table, bits, block).values()
            graph.initializer.extend(
                from_array(t.numpy(), n) for n, t in zip(names, tensors, strict=True)
            )
        nodes.append(
            onnx.helper.make_node(
                "GatherBlockQuantized",
                [names[0], node.input[1], *names[1:]],
                list(node.output),
                name=f"{node.name or name}_gbq",
                domain="com.microsoft",
                gather_axis=0,
                quantize_axis=1,
                block_size=block,
                bits=bits,
            )
        )
        swapped.add(w)
    del graph.node[:]
    graph.node.extend(nodes)
    still = {n for node in nodes for n in node.input} | {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name not in swapped or i.name in still]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    share_head_codes(onnx, graph)
    return swapped


def share_head_codes(onnx: Any, graph: Any) -> set[str]:
    """Let each GatherBlockQuantized whose ``data``, ``scales`` and ``zero_points`` hold the
    bytes of a MatMulNBits node's ``B``, ``scales`` and ``zero_points`` (an LM head tied to its
    token table: same rows, bits and block) gather from that node's tensors instead of a copy.

    One byte order: ``B`` ``(N, K/block, block*bits/8)`` is the table's ``(V, D*bits/8)`` rows
    of low-nibble-first codes split in blocks, ``scales`` ``(N*K/block,)`` its ``(V, D/block)``.
    The lookup reads ``B`` itself as 3-D data (``quantize_axis=2``; a ``Reshape`` of ``B`` would
    be constant-folded by ONNX Runtime into an in-memory copy of the table) with scales and zero
    points as ``(V, D/block, 1)`` views of the head's (4-bit zero points of several blocks a
    row keep their own ``(V, D/block, 1)`` bytes: packed along the last axis they differ), and
    its ``(..., D/block, block)`` rows are reshaped to ``(..., D)``: the same numbers, and the
    codes stored once. Returns the names of the initializers dropped."""
    to_array, from_array, make_node = (
        onnx.numpy_helper.to_array,
        onnx.numpy_helper.from_array,
        onnx.helper.make_node,
    )
    inits = {i.name: i for i in graph.initializer}

    def attr(node: Any, name: str) -> int | None:
        return next((a.i for a in node.attribute if a.name == name), None)

    def same(a: str, b: str) -> bool:
        x, y = to_array(inits[a]), to_array(inits[b])
        return x.dtype == y.dtype and x.size == y.size and x.tobytes() == y.tobytes()

    def ties(gbq: Any, head: Any) -> bool:
        rows, width = inits[gbq.input[0]].dims
        bits = attr(gbq, "bits")
        fmt = [attr(head, k) for k in ("N", "K", "bits", "block_size")]
        return fmt == [rows, width * 8 // bits, bits, attr(gbq, "block_size")] and all(
            same(a, b) for a, b in zip(gbq.input[:1] + gbq.input[2:4], head.input[1:4], strict=True)
        )

    def view(src: str, name: str, shape: list[int], nodes: list) -> str:
        if name not in inits:  # a second lookup of the same table reuses the first's views
            inits[name] = from_array(np.array(shape, np.int64), f"{name}_shape")
            graph.initializer.append(inits[name])
            nodes.append(make_node("Reshape", [src, f"{name}_shape"], [name], name=name))
        return name

    heads = [
        n
        for n in graph.node
        if n.op_type == "MatMulNBits"
        and len(n.input) >= 4
        and all(i in inits for i in n.input[1:4])
    ]
    if not heads:
        return set()
    dropped, nodes = set(), []
    for node in list(graph.node):
        gbq = node.op_type == "GatherBlockQuantized" and len(node.input) == 4
        own = [node.input[0], *node.input[2:]] if gbq else []
        if own and all(i in inits for i in own) and len(inits[own[0]].dims) == 2:
            head = next((h for h in heads if ties(node, h)), None)
        else:
            head = None
        if head is None:
            nodes.append(node)
            continue
        data, ids, scales, zeros = node.input
        rows, blocks, blob = inits[head.input[1]].dims
        bits, shape = attr(node, "bits"), [rows, blocks, 1]
        scale_view = view(head.input[2], f"{scales}_blocks", shape, nodes)
        if bits == 8 or blocks == 1:  # one zero point a byte in both layouts
            zero_view = view(head.input[3], f"{zeros}_blocks", shape, nodes)
        else:
            zero_view = f"{zeros}_blocks"
            if zero_view not in inits:
                packed = torch.from_numpy(to_array(inits[zeros]).copy())
                z = torch.stack([packed & 15, packed >> 4], -1).reshape(rows, -1)[:, :blocks]
                inits[zero_view] = from_array(z.reshape(shape).numpy(), zero_view)
                graph.initializer.append(inits[zero_view])
        out = node.output[0]
        del node.input[:]
        node.input.extend([head.input[1], ids, scale_view, zero_view])
        next(a for a in node.attribute if a.name == "quantize_axis").i = 2
        node.output[0] = f"{out}_blocks"
        width = f"{out}_width"
        graph.initializer.append(from_array(np.array([blob * 8 // bits * blocks], np.int64), width))
        nodes += [
            node,
            make_node("Shape", [ids], [f"{out}_ids_shape"], name=f"{out}_ids_shape"),
            make_node("Concat", [f"{out}_ids_shape", width], [f"{out}_shape"], axis=0),
            make_node("Reshape", [f"{out}_blocks", f"{out}_shape"], [out], name=f"{out}_rows"),
        ]
        dropped.update((data, scales, zeros))
    del graph.node[:]
    graph.node.extend(nodes)
    read = {n for node in nodes for n in node.input} | {o.name for o in graph.output}
    dropped -= read
    keep = [i for i in graph.initializer if i.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return dropped


def tables_to_bf16(onnx: Any, graph: Any, min_elements: int = 1 << 20) -> None:
    """Large float32 Gather tables stored as bfloat16, with a Cast to float32 after the Gather."""
    tp = onnx.TensorProto
    big = {
        i.name: i
        for i in graph.initializer
        if i.data_type == tp.FLOAT and len(i.dims) == 2 and i.dims[0] * i.dims[1] >= min_elements
    }
    nodes = []
    for node in graph.node:
        nodes.append(node)
        if node.op_type != "Gather" or node.input[0] not in big:
            continue
        out = node.output[0]
        node.output[0] = f"{out}_bf16"
        nodes.append(onnx.helper.make_node("Cast", [f"{out}_bf16"], [out], to=tp.FLOAT))
    for name, init in big.items():
        table = torch.from_numpy(onnx.numpy_helper.to_array(init).copy()).bfloat16()
        init.CopyFrom(_bf16_initializer(onnx, name, table))
    del graph.node[:]
    graph.node.extend(nodes)


def _bf16_initializer(onnx: Any, name: str, table: torch.Tensor) -> Any:
    t = onnx.TensorProto()
    t.name, t.data_type = name, onnx.TensorProto.BFLOAT16
    t.dims.extend(table.shape)
    t.raw_data = table.contiguous().view(torch.int16).numpy().tobytes()
    return t
