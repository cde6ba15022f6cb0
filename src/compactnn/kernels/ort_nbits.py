"""Weight-only quantized transformers on ONNX Runtime's ``com.microsoft::MatMulNBits``.

The model is exported to ONNX with each weight-only ``QuantLinear`` as a plain linear layer
on its dequantized weight; every such ``MatMul`` is then replaced by a ``MatMulNBits`` node
holding compactnn's own codes, scales and zero points (packed two 4-bit codes per byte, or
one 8-bit code), so ONNX Runtime runs *our* quantized weights: no dense copy exists in the
running model. ONNX Runtime's MLAS kernels dequantize blocks on the fly; with
``accuracy_level=4`` they quantize the activations to int8 per block and run AVX-512 VNNI
dot products (faster, a small extra rounding: verify against the simulated model), with
``accuracy_level=0`` they compute in float32.

The whole graph (attention, LayerNorm, GELU) runs in ONNX Runtime, which also removes the
per-op overhead of eager PyTorch at batch 1. Needs the ``onnx`` extra.

Example:
    >>> fast = to_ort_nbits(qmodel, example)        # doctest: +SKIP
    >>> hidden = fast(**example)[0]                 # doctest: +SKIP
"""

from __future__ import annotations

import copy
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compactnn._optional import require
from compactnn.core.modules import set_module
from compactnn.core.onnx_trace import export_dynamic
from compactnn.core.qlayers import QuantLinear
from compactnn.errors import CompactnnError

NBITS = (4, 8)  # ONNX Runtime's MatMulNBits bit widths used here (codes below 4 bits fit 4)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


def _nbits_format(layer: QuantLinear) -> tuple[int, int] | None:
    """(bits, block size) of ``layer`` on MatMulNBits, or None when it does not fit."""
    if layer.input_quantizer is not None or getattr(layer, "weight_levels", None) is not None:
        return None
    spec = layer.weight_spec
    k = layer.in_features
    block = spec.group_size if spec.granularity == "group" else k
    bits = 4 if spec.bits <= 4 else 8 if spec.bits == 8 else None
    # MLAS blocks: powers of two from 16; per-channel layers become one block of K
    if bits is None or block < 16 or block & (block - 1) or k % block:
        return None
    return bits, block


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``(..., n)`` as bytes, low nibble first for 4 bits (pads odd n)."""
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes
    if codes.shape[-1] % 2:
        codes = torch.cat([codes, torch.zeros_like(codes[..., :1])], -1)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def nbits_tensors(layer: QuantLinear, bits: int, block: int) -> dict[str, torch.Tensor]:
    """MatMulNBits' ``B`` ``(N, K/block, block*bits/8)`` uint8, ``scales`` ``(N*K/block,)``
    float32 and ``zero_points`` (packed uint8) from ``layer``'s codes: ``w = (q - z) * s``."""
    n, k = layer.out_features, layer.in_features
    shift = 1 << (bits - 1) if layer.weight_spec.qtype.signed else 0  # into 0..2^bits-1
    q = layer.weight_codes.to(torch.int32) + shift  # (N, K)
    zero = layer.weight_zero.float() + shift  # (N, K/block)
    if not torch.equal(zero, zero.round()) or zero.min() < 0 or zero.max() >= 1 << bits:
        raise ValueError("MatMulNBits needs integer zero points on the code grid")
    blob = _pack(q.reshape(n, k // block, block), bits)
    return {
        "B": blob.contiguous(),
        "scales": layer.weight_scale.float().reshape(-1).contiguous(),
        "zero_points": _pack(zero.to(torch.int32), bits).reshape(-1).contiguous(),
    }


def _key(t: torch.Tensor) -> str:
    a = t.detach().float().contiguous().numpy()
    return hashlib.sha1(a.tobytes()).hexdigest() + str(a.shape)


def dequantized_model(model: nn.Module) -> tuple[nn.Module, dict[str, tuple]]:
    """A copy of ``model`` with MatMulNBits-compatible layers as plain float ``nn.Linear`` on
    their dequantized weights; returns it and ``{weight^T key: (name, layer, bits, block)}``."""
    out = copy.deepcopy(model)
    found = {}
    for name, m in list(out.named_modules()):
        if not isinstance(m, QuantLinear) or (fmt := _nbits_format(m)) is None:
            continue
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        lin.weight.data = m.weight.detach().float().clone()
        if m.bias is not None:
            lin.bias.data = m.bias.detach().float().clone()
        set_module(out, name, lin)
        found[_key(lin.weight.T)] = (name, m, *fmt)
    return out, found


def nbits_onnx(
    model: nn.Module,
    example: dict[str, torch.Tensor],
    accuracy_level: int = 4,
    bf16_tables: bool = True,
) -> tuple[bytes, list[str]]:
    """The serialized ONNX model with MatMulNBits nodes, and the layers left as float MatMul.

    Args:
        model: a compressed (simulated) model taking keyword tensors, e.g. a Hugging Face
            encoder from ``compactnn.compress`` or ``compactnn.load``.
        example: one batch of its keyword inputs (``input_ids``, ``attention_mask``).
        accuracy_level: MatMulNBits' ``accuracy_level`` (4: int8 activations on VNNI).
        bf16_tables: store large float lookup tables (token embeddings) in bfloat16, cast to
            float32 after the lookup: half their memory, values rounded to 8 significant
            bits (as ``to_kernels``' bfloat16 model does).
    """
    onnx = require("onnx", "onnx")
    if accuracy_level not in ACCURACY_LEVELS:
        raise CompactnnError(f"accuracy_level={accuracy_level} must be one of {ACCURACY_LEVELS}")
    if not isinstance(example, dict):
        raise CompactnnError("nbits_onnx example must be a dict of keyword tensors")
    plain, found = dequantized_model(model)
    with tempfile.TemporaryDirectory(prefix="compactnn-nbits-") as tmp:
        export_dynamic(plain, example, Path(tmp) / "m.onnx")
        proto = onnx.load(str(Path(tmp) / "m.onnx"))
    used = _replace_matmuls(onnx, proto.graph, found, accuracy_level)
    if bf16_tables:
        _bf16_tables(onnx, proto.graph)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    left = sorted(name for key, (name, *_) in found.items() if key not in used)
    return proto.SerializeToString(), left


def _replace_matmuls(onnx: Any, graph: Any, found: dict, accuracy_level: int) -> set[str]:
    """Swap each MatMul on a known dequantized weight for MatMulNBits; returns their keys."""
    to_array, from_array = onnx.numpy_helper.to_array, onnx.numpy_helper.from_array
    inits = {i.name: i for i in graph.initializer}
    keys = {
        n: _key(torch.from_numpy(to_array(t).copy())) for n, t in inits.items() if len(t.dims) == 2
    }
    used, dropped, nodes = set(), set(), []
    for node in graph.node:
        w = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else ""
        key = keys.get(w)
        if key not in found:
            nodes.append(node)
            continue
        _, layer, bits, block = found[key]
        tensors = nbits_tensors(layer, bits, block)
        names = [f"{w}_nbits_{s}" for s in tensors]
        graph.initializer.extend(
            from_array(t.numpy(), n) for n, t in zip(names, tensors.values(), strict=True)
        )
        nodes.append(
            onnx.helper.make_node(
                "MatMulNBits",
                [node.input[0], *names],
                list(node.output),
                name=f"{node.name}_nbits",
                domain="com.microsoft",
                K=layer.in_features,
                N=layer.out_features,
                bits=bits,
                block_size=block,
                accuracy_level=accuracy_level,
            )
        )
        used.add(key)
        dropped.add(w)
    del graph.node[:]
    graph.node.extend(nodes)
    keep = [i for i in graph.initializer if i.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return used


def _bf16_tables(onnx: Any, graph: Any, min_elements: int = 1 << 20) -> None:
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


class OrtNBitsModel(nn.Module):
    """A model exported by :func:`nbits_onnx`, run by ONNX Runtime behind the model's keyword
    call; returns ``(last_hidden_state,)`` as float32."""

    def __init__(self, data: bytes, names: list[str], threads: int | None = None) -> None:
        super().__init__()
        ort = require("onnxruntime", "onnx")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # spinning idle threads steal the CPU from the caller and other jobs
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        self.names = names
        self.nbytes = len(data)
        self.runtime = "onnxruntime MatMulNBits"

    def forward(self, **kwargs: torch.Tensor) -> tuple[torch.Tensor]:
        feed = {n: kwargs[n].numpy() for n in self.names if n in kwargs}
        return (torch.from_numpy(self.session.run(None, feed)[0]),)


def to_ort_nbits(
    model: nn.Module,
    example: dict[str, torch.Tensor],
    *,
    accuracy_level: int = 4,
    bf16_tables: bool = True,
    threads: int | None = None,
    path: str | os.PathLike | None = None,
) -> OrtNBitsModel:
    """``model`` on ONNX Runtime with its weight-only layers as MatMulNBits (see module doc).

    Args:
        model: a compressed model taking keyword tensors (Hugging Face encoders, decoders
            without KV cache).
        example: one batch of keyword inputs (shapes are dynamic in batch and sequence).
        accuracy_level: 4 (int8 activations, VNNI; default) or 0 (float32 compute).
        bf16_tables: token embeddings stored in bfloat16 (see :func:`nbits_onnx`).
        threads: intra-op threads (default: ``torch.get_num_threads()``).
        path: also write the ONNX file here (it runs on any ONNX Runtime >= 1.20 CPU).

    Returns:
        An :class:`OrtNBitsModel`.
    """
    data, _ = nbits_onnx(model, example, accuracy_level, bf16_tables)
    if path is not None:
        Path(path).write_bytes(data)
    return OrtNBitsModel(data, list(example), threads)
