"""ONNX export of compressed Hugging Face transformers, verified in ONNX Runtime.

Two forms, chosen from the model's layers:

* **weight-only** (every quantized Linear without an input quantizer: ``w4-g32-gptq``,
  ``w4-g128-gptq``, ``w8``): each fitting ``MatMul`` becomes ONNX Runtime's
  ``com.microsoft::MatMulNBits`` holding compactnn's own codes, scales and zero points
  (:mod:`compactnn.kernels.ort_nbits`); a layer whose grid has no MatMulNBits block (a block
  that is not a power of two from 16) stays a float ``MatMul`` on its dequantized weight.
  So do run-time activation grids (``a8g``: level-4 MatMulNBits; ``a8d``:
  ``DynamicQuantizeMatMul``; else traced as simulated, named by :func:`caveat`).
* **W8A8** (every quantized Linear with an 8-bit per-channel weight and an input quantizer:
  ``w8a8``, ``w8a8-smoothquant``): the weight is ``DequantizeLinear`` of its int8 codes
  (``w = q * s`` per output channel); a quantized token table is ``GatherBlockQuantized`` on
  its codes (as in the weight-only form), a tied LM head dequantizes those bytes (stored
  once); a static activation grid is a ``QuantizeLinear -> DequantizeLinear`` pair, a
  per-token dynamic one (SmoothQuant's) the same rounding in float ops,
  ``s_t = (max_t - min_t) / 255``, ``x' = (clamp(round(x / s_t) + z_t, 0, 255) - z_t) s_t``.

The whole graph (embeddings, attention, norms) runs in ONNX Runtime; batch and sequence axes
are dynamic; a decoder returns the logits of the prompt (no KV cache). The file is written
only after ONNX Runtime's output (QDQ graphs with basic graph optimizations) on ``example``
and a probe batch reaches a mean per-token cosine of ``min_cosine`` to the simulation's; what
was measured is in its metadata (:mod:`~compactnn.export.onnx_hf_verify`). Needs ``onnx``.

Example:
    >>> export(qmodel, "minilm.onnx", example=batch)     # doctest: +SKIP
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compactnn._optional import require
from compactnn.core.dynact import DynamicActQuantizer
from compactnn.core.modules import set_module
from compactnn.core.onnx_trace import export_dynamic
from compactnn.core.qembedding import QuantEmbedding
from compactnn.core.qlayers import QuantLinear, is_quant_layer
from compactnn.errors import CompactnnError, counted, name_list, user_stacklevel
from compactnn.export.fs import atomic_write, names_folder
from compactnn.export.hf_check import ignore_fix, mean_cosine, other_layers  # noqa: F401
from compactnn.export.onnx_hf_inputs import check_example, check_graph
from compactnn.export.onnx_hf_verify import verify, with_line
from compactnn.kernels.nbits_tables import gather_format, gather_tables, replace_gathers
from compactnn.kernels.ort_nbits import integer_format, nbits_onnx  # the MatMulNBits test

MIN_COSINE = 0.999
QDQ_RUN_NOTE = (
    "run it in ONNX Runtime with SessionOptions.graph_optimization_level = ORT_ENABLE_BASIC: "
    "the default ORT_ENABLE_ALL rewrites the per-token activation rounding, so its outputs "
    "drift from the verified ones (the file's ort_config metadata sets BASIC when "
    "ORT_LOAD_CONFIG_FROM_MODEL=1)"
)
# a W8A8 file's metadata: ONNX Runtime's own key (read when ORT_LOAD_CONFIG_FROM_MODEL=1),
# and the same in words for people and other runtimes
QDQ_METADATA = {
    "ort_config": json.dumps({"session_options": {"graph_optimization_level": 1}}),
    "compactnn.graph_optimization_level": "ORT_ENABLE_BASIC",
}


def _is_hf(model: nn.Module) -> bool:
    return hasattr(getattr(model, "config", None), "to_dict")


def form(qmodel: nn.Module) -> str | None:
    """``"nbits"`` (weight-only), ``"qdq"`` (W8A8) or None (no single ONNX form)."""
    layers = [m for m in qmodel.modules() if is_quant_layer(m)]
    if not layers or not all(isinstance(m, QuantLinear) for m in layers):
        return None
    if any(getattr(m, "weight_levels", None) is not None for m in layers):
        return None
    acts = [m.input_quantizer for m in layers]
    if all(a is None for a in acts):
        return "nbits"
    # per-group dynamic activations are MatMulNBits' own grid at accuracy_level 4, per-tensor
    # ones DynamicQuantizeMatMul's; a layer fitting neither is traced as simulated
    if all(a is None or getattr(a, "runtime_range", False) for a in acts):
        return "nbits"
    w8a8 = all(
        a is not None
        and a.qtype.bits == 8
        and (isinstance(a, DynamicActQuantizer) or a.calibrated)
        and not a.runtime_range
        and m.weight_spec.bits == 8
        and m.weight_spec.granularity == "channel"
        and m.weight_spec.qtype.signed
        and bool((m.weight_zero == 0).all())
        for m, a in zip(layers, acts, strict=True)
    )
    return "qdq" if w8a8 else None


def can_export(qmodel: nn.Module) -> str | None:
    """None when :func:`export` can write ``qmodel``, else the reason with the fix.

    Example:
        >>> can_export(torch.nn.Linear(2, 2))[:39]
        'ONNX export for transformers needs a co'
    """
    if not _is_hf(qmodel) or not hasattr(qmodel, "_compactnn"):
        return (
            "ONNX export for transformers needs a compressed Hugging Face model "
            f"(compactnn.compress(hf_model, ...)); got {type(qmodel).__name__}. Other models: "
            "compactnn.export.onnx.export_onnx."
        )
    if hasattr(qmodel, "_compactnn_kernels"):
        return (
            "ONNX export takes the compressed model, not its to_kernels form (its layers are "
            "CPU kernels now): export the model you passed to compactnn.to_kernels."
        )
    if form(qmodel) is None and (others := other_layers(qmodel)):
        return ignore_fix(others, "ONNX for transformers")
    if form(qmodel) is None:
        return (
            "ONNX for transformers takes weight-only recipes (MatMulNBits: w4-g32-gptq, "
            "w4-g128-gptq, w8), run-time activation grids (w4a8g-g32-gptq, w8a8d) or W8A8 "
            "with 8-bit symmetric per-channel weights (w8a8, w8a8-smoothquant); this model "
            "mixes or uses other grids: save it with compactnn.save."
        )
    return None


def _width(m: nn.Module) -> int:
    """The row length a block must divide: input features, or the embedding width."""
    return m.in_features if isinstance(m, QuantLinear) else m.embedding_dim


def _block_reason(m: nn.Module) -> str | None:
    """Why the weight-only form keeps ``m`` (a quantized Linear or embedding) as a float
    MatMul / Gather on its dequantized weight, else None."""
    if isinstance(m, QuantLinear):
        fits = integer_format(m) is not None
    elif isinstance(m, QuantEmbedding):
        fits = gather_format(m) is not None
    else:
        return None
    if fits:
        return None
    spec, width = m.weight_spec, _width(m)
    if (why := _act_reason(m)) is not None:
        return why
    if isinstance(m, QuantLinear) and 4 < spec.bits < 8:
        return f"{spec.bits}-bit codes (MatMulNBits takes 4 or 8 bits)"  # "bit codes": caveat
    if spec.granularity == "group":
        block, what = spec.group_size, f"groups of {spec.group_size}"
    else:  # one block per row (Linear), the largest power of two dividing it (embedding)
        block = width if isinstance(m, QuantLinear) else width & -width
        what = f"a {spec.granularity} grid"
    if block < 16 or block & (block - 1) or width % block:
        return (
            f"{what} in rows of {width} (MatMulNBits/GatherBlockQuantized take blocks that are "
            "a power of two from 16 dividing the row)"
        )
    return f"{what} with zero points off the code grid"


def _act_reason(m: nn.Module) -> str | None:
    """Why ``m``'s run-time activation grid fits no ONNX Runtime integer kernel, else None."""
    aq, spec = getattr(m, "input_quantizer", None), m.weight_spec
    if aq is None or not getattr(aq, "runtime_range", False):
        return None
    if aq.spec.bits != 8:
        return f"{aq.spec.bits}-bit activations (the run-time kernels quantize inputs to 8 bits)"
    grid = f"groups of {spec.group_size}" if spec.granularity == "group" else spec.granularity
    if aq.is_group and grid != f"groups of {aq.spec.group_size}":
        return (
            f"activation groups of {aq.spec.group_size} on weight {grid} (MatMulNBits "
            "quantizes its input on the weight's blocks)"
        )
    if aq.is_group or (spec.bits == 8 and spec.symmetric and spec.granularity != "group"):
        return None  # the weight's own grid is the reason
    return (
        f"per-tensor dynamic activations on {spec.bits}-bit weight {grid} "
        "(DynamicQuantizeMatMul takes 8-bit symmetric per-channel ones)"
    )


def float_layers(qmodel: nn.Module) -> list[tuple[str, str, int]]:
    """``(name, why, float32 bytes)`` of each quantized layer that the ONNX file stores as a
    float ``MatMul`` / ``Gather`` on its dequantized weight: MatMulNBits and
    GatherBlockQuantized take blocks that are a power of two from 16 and divide the row. The
    W8A8 form (``"qdq"``) holds every Linear as int8 codes, so only its tables can be listed.
    Empty when :func:`form` is None."""
    kind = form(qmodel)
    if kind is None:
        return []
    out = []
    for name, m in qmodel.named_modules():
        if kind == "qdq" and not isinstance(m, QuantEmbedding):
            continue
        if (why := _block_reason(m)) is not None:
            out.append((name, why, m.weight.numel() * 4))
    return out


def _kb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"


def caveat(qmodel: nn.Module) -> str | None:
    """What the ONNX file does not compress although :func:`can_export` allows it (the
    layers :func:`float_layers` lists), else None: for ``compactnn export --list``."""
    layers = float_layers(qmodel)
    if not layers:
        return None
    names = [n for n, *_ in layers]
    nbytes = sum(b for *_, b in layers)
    grid = [(n, why) for n, why, _ in layers if "bit codes" not in why and "activ" not in why]
    widths = {_width(qmodel.get_submodule(n)) for n, _ in grid}
    block = min(min((w & -w for w in widths), default=128), 128)  # largest power of two dividing
    bits = any("bit codes" in why for _, why, _ in layers)
    fixes = ["4- or 8-bit recipes keep them as codes"] if bits else []
    if any("activ" in why for _, why, _ in layers):
        fixes.append(
            "run-time activation grids run on codes with 8-bit activations on the weights' own "
            "groups (a8g) or 8-bit symmetric per-channel weights (a8d)"
        )
    if widths:
        fixes.append(
            f"a recipe with power-of-two groups from 16 to {block} (e.g. w4-g{min(block, 32)}) "
            "keeps them as codes"
            if block >= 16
            else f"no such block divides rows of {', '.join(map(str, sorted(widths)))}"
        )
    return (
        f"{counted(len(layers), 'quantized layer')} ({name_list(names, 3)}) left as float32 "
        f"MatMul/Gather on their dequantized weights, {_kb(nbytes)}: e.g. {layers[0][1]}; "
        + "; ".join(fixes)
    )


class _DynamicTokens(nn.Module):
    """Per-token asymmetric fake quantization written in plain traceable ops."""

    def __init__(self, qmin: int, qmax: int) -> None:
        super().__init__()
        self.qmin, self.qmax = qmin, qmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo = x.amin(-1, keepdim=True).clamp(max=0)
        hi = x.amax(-1, keepdim=True).clamp(min=0)
        scale = ((hi - lo) / (self.qmax - self.qmin)).clamp(min=1e-8)  # (..., 1)
        zero = torch.round(self.qmin - lo / scale)
        q = torch.clamp(torch.round(x / scale) + zero, self.qmin, self.qmax)
        return (q - zero) * scale


class _QDQLinear(nn.Module):
    """A W8A8 linear layer as Q/DQ ops: activation grid, int8 per-channel weight."""

    def __init__(self, layer: QuantLinear) -> None:
        super().__init__()
        aq = layer.input_quantizer
        qt = aq.qtype
        self.dynamic = (
            _DynamicTokens(qt.qmin, qt.qmax) if isinstance(aq, DynamicActQuantizer) else None
        )
        self.act = (float(aq.scale), int(aq.zero.round()), qt.qmin, qt.qmax)
        self.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        self.register_buffer("w_scale", layer.weight_scale.reshape(-1).clone())
        self.register_buffer("w_zero", torch.zeros(layer.out_features, dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic is not None:
            x = self.dynamic(x)
        else:
            x = torch.fake_quantize_per_tensor_affine(x, *self.act)
        w = torch.fake_quantize_per_channel_affine(
            self.weight, self.w_scale, self.w_zero, 0, -128, 127
        )
        return nn.functional.linear(x, w, self.bias)


def _key(t: Any) -> str:
    a = t.detach().float().contiguous().numpy() if isinstance(t, torch.Tensor) else t
    return hashlib.sha1(a.astype("float32").tobytes()).hexdigest() + str(a.shape)


def qdq_onnx(qmodel: nn.Module, example: dict[str, torch.Tensor]) -> bytes:
    """The serialized W8A8 QDQ graph of ``qmodel``; weights stored as their int8 codes,
    quantized token tables as GatherBlockQuantized on theirs (a tied head reads them too)."""
    onnx = require("onnx", "onnx")
    model = copy.deepcopy(qmodel).eval()
    tables = gather_tables(model)
    codes = {}
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            codes[_key(m.weight)] = m.weight_codes.clone()
            set_module(model, name, _QDQLinear(m))
    buf = io.BytesIO()
    export_dynamic(model, example, buf)
    proto = onnx.load_from_string(buf.getvalue())
    _store_codes(onnx, proto.graph, codes)
    if tables and replace_gathers(onnx, proto.graph, tables):
        _share_table_bytes(onnx, proto.graph)
        if not any(o.domain == "com.microsoft" for o in proto.opset_import):
            proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    for key, value in QDQ_METADATA.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


def run_note(qmodel: nn.Module) -> str | None:
    """How ONNX Runtime must run the file :func:`export` writes for ``qmodel`` to give the
    verified numbers (W8A8: basic graph optimizations only); None when the defaults do."""
    return QDQ_RUN_NOTE if can_export(qmodel) is None and form(qmodel) == "qdq" else None


def _store_codes(onnx: Any, graph: Any, codes: dict[str, torch.Tensor]) -> None:
    """Replace each ``QuantizeLinear(float weight)`` by the layer's own int8 codes."""
    to_array, from_array = onnx.numpy_helper.to_array, onnx.numpy_helper.from_array
    inits = {i.name: i for i in graph.initializer}
    # a tied head's weight is traced as Identity(table): look through it to the table
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}
    nodes, dropped = [], set()
    renames: dict[str, str] = {}
    for node in graph.node:
        src = node.input[0] if node.op_type == "QuantizeLinear" else ""
        src = alias.get(src, src) if alias.get(src) in inits else src
        key = _key(to_array(inits[src])) if src in inits else None
        if key not in codes:
            nodes.append(node)
            continue
        name = f"{src}_int8"
        if name not in inits:
            inits[name] = from_array(codes[key].numpy().astype("int8"), name)
            graph.initializer.append(inits[name])
        renames[node.output[0]] = name
        dropped.add(src)
    for node in nodes:
        for i, name in enumerate(node.input):
            node.input[i] = renames.get(name, name)
    nodes = _live(nodes, graph)
    still = {n for node in nodes for n in node.input}
    keep = [i for i in graph.initializer if i.name not in dropped or i.name in still]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _live(nodes: list, graph: Any) -> list:
    """``nodes`` without the Identity nodes nothing reads any more."""
    read = {n for node in nodes for n in node.input} | {o.name for o in graph.output}
    return [n for n in nodes if n.op_type != "Identity" or n.output[0] in read]


def _share_table_bytes(onnx: Any, graph: Any) -> None:
    """Let a tied head's ``DequantizeLinear`` read the table's 8-bit GatherBlockQuantized
    bytes ``u = q + 128`` with zero point 128 instead of a second copy of its int8 codes
    ``q`` (W8A8 weights are symmetric): ``(u - 128) * s = q * s``, the same numbers."""
    from_array = onnx.numpy_helper.from_array
    inits = {i.name: i for i in graph.initializer}
    gbq = {
        n.input[0]
        for n in graph.node
        if n.op_type == "GatherBlockQuantized"
        and next(a.i for a in n.attribute if a.name == "bits") == 8
    }
    moved = set()
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3:
            continue
        codes, scale = node.input[0], node.input[1]
        data = codes.removesuffix("_int8") + "_gbq_data"
        if not codes.endswith("_int8") or data not in gbq or scale not in inits:
            continue
        if inits[codes].dims != inits[data].dims:
            continue
        name = f"{data}_zero128"
        if name not in inits:
            zero = torch.full(tuple(inits[scale].dims), 128, dtype=torch.uint8)
            inits[name] = from_array(zero.numpy(), name)
            graph.initializer.append(inits[name])
        moved.update((codes, node.input[2]))
        node.input[0], node.input[2] = data, name
    read = {n for node in graph.node for n in node.input}
    keep = [i for i in graph.initializer if i.name not in moved or i.name in read]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def to_onnx_bytes(
    qmodel: nn.Module, example: dict[str, torch.Tensor], accuracy_level: int = 0
) -> tuple[bytes, str]:
    """The serialized ONNX model of ``qmodel`` and its form (``"nbits"`` or ``"qdq"``)."""
    if (reason := can_export(qmodel)) is not None:
        raise CompactnnError(reason)
    check_example(qmodel, example)  # as to_ort_nbits: a dict, integer ids, keys forward takes
    kind = form(qmodel)
    if kind == "nbits":
        data, left = nbits_onnx(qmodel, example, accuracy_level, bf16_tables=False)
        named = {name for name, *_ in float_layers(qmodel)}  # export's caveat says why
        left = [name for name in left if name not in named]
        if left:
            warnings.warn(
                f"ONNX export: {counted(len(left), 'quantized layer')} left as float "
                f"MatMul/Gemm on their dequantized weights (not MatMulNBits): {name_list(left)}",
                stacklevel=user_stacklevel(),
            )
        return data, kind
    return qdq_onnx(qmodel, example), kind


def ort_runner(data: bytes, kind: str, threads: int | None = None) -> Any:
    """A function running the exported model on keyword tensors, returning the main output.

    A ``"qdq"`` graph runs with ``ORT_ENABLE_BASIC``: the extended fusions of
    ``ORT_ENABLE_ALL`` rewrite the per-token rounding and move MiniLM ``w8a8-smoothquant``
    to cosine 0.998 of the simulation (basic: a few codes a step off, onnx_hf_verify).
    """
    ort = require("onnxruntime", "onnx")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    level = "ORT_ENABLE_BASIC" if kind == "qdq" else "ORT_ENABLE_ALL"
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]

    def run(**kwargs: torch.Tensor) -> torch.Tensor:
        feed = {k: v.detach().cpu().numpy() for k, v in kwargs.items() if k in names}
        return torch.from_numpy(sess.run(None, feed)[0])

    return run


def export(qmodel: nn.Module, out: str | os.PathLike, **opts: Any) -> Path:
    """Write ``qmodel`` as an ONNX file verified in ONNX Runtime.

    Args:
        qmodel: a compressed Hugging Face encoder or decoder; not modified.
        out: the ``.onnx`` file (written atomically, only after the check passes); a
            folder gets ``model.onnx`` inside it.
        **opts: ``example=`` (required) a dict of keyword tensors; ``accuracy_level=`` 0
            (float compute, default) or 4 (MatMulNBits with int8 activations, faster);
            ``min_cosine=`` the verification floor (default 0.999).

    Returns:
        The written file. A W8A8 (QDQ) file gives the verified numbers in ONNX Runtime with
        ``ORT_ENABLE_BASIC`` graph optimizations (:func:`run_note`; its ``ort_config``
        metadata says so).

    Raises:
        CompactnnError: the model has no ONNX form here, ``example`` is missing or holds
            what to_ort_nbits refuses too (float ids, a key the graph drops: ``labels``), or
            ONNX Runtime's output is further from the simulation than ``min_cosine``.
    """
    unknown = set(opts) - {"example", "accuracy_level", "min_cosine", "path"}
    if unknown:
        raise CompactnnError(
            f"ONNX export: unknown option(s) {sorted(unknown)}; it takes example=, "
            "accuracy_level=, min_cosine=."
        )
    example = opts.get("example")
    data, kind = to_onnx_bytes(qmodel, example, int(opts.get("accuracy_level", 0)))
    check_graph(data, example)  # a key the graph drops (labels) is refused, as to_ort_nbits
    floor = float(opts.get("min_cosine", MIN_COSINE))
    checks = verify(qmodel, data, kind, example)  # the example, then a probe batch
    for check in checks:
        if not check.cosine >= floor:  # NaN fails too
            raise CompactnnError(
                f"ONNX export: ONNX Runtime's output has mean cosine {check.cosine:.6f} to the "
                f"simulated model on {check.what}, below min_cosine={floor}; nothing was "
                "written. Try accuracy_level=0."
            )
    data = with_line(data, max(checks, key=lambda c: c.tokens).line())  # read_line reads it
    path = Path(opts.get("path") or out)
    if path.is_dir() or path.suffix != ".onnx" or names_folder(opts.get("path") or out):
        path = path / "model.onnx"  # atomic_write creates the folder

    def write(tmp: str) -> None:
        Path(tmp).write_bytes(data)

    atomic_write(path, write)
    if (note := caveat(qmodel)) is not None:
        nbytes = sum(b for *_, b in float_layers(qmodel))
        warnings.warn(
            f"ONNX {path.name}: {note}. They are {nbytes / len(data):.0%} of the "
            f"{_kb(len(data))} file.",
            stacklevel=user_stacklevel(),
        )
    return path
