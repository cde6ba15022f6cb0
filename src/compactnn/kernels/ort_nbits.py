"""Weight-only quantized transformers on ONNX Runtime's ``com.microsoft::MatMulNBits``.

The model is exported to ONNX with each weight-only ``QuantLinear`` as a plain linear layer
on its dequantized weight; every such ``MatMul`` is then replaced by a ``MatMulNBits`` node
holding compactnn's own codes, scales and zero points (packed two 4-bit codes per byte, or
one 8-bit code), so ONNX Runtime runs *our* quantized weights: no dense copy exists in the
running model. ONNX Runtime's MLAS kernels dequantize blocks on the fly; with
``accuracy_level=4`` they quantize the activations to int8 per block and run AVX-512 VNNI
dot products (faster, an extra rounding), with ``accuracy_level=0`` they compute in float32
(the simulated model's outputs up to summation order). By default :func:`to_ort_nbits` builds
level 4, compares it with the simulated model on the example and falls back to level 0, with
a warning, when the outputs drift beyond what float32 compute reaches
(:mod:`compactnn.kernels.nbits_check`); ``accuracy_level=4`` forces level 4.

Quantized token tables (:class:`~compactnn.core.qembedding.QuantEmbedding`) become
``com.microsoft::GatherBlockQuantized`` nodes on the same codes (uint8 bytes holding two 4-bit
codes, or one 8-bit code, per-row blocks of scales and zero points): a lookup gathers codes
and dequantizes ``(q - z) * s`` in float32, the simulation's formula, so no float table exists
either (MiniLM's word embeddings: 7.5 MB instead of 47 MB float32 or 23 MB bfloat16;
:mod:`compactnn.kernels.nbits_tables`).

The whole graph runs in ONNX Runtime (no per-op overhead of eager PyTorch at batch 1), from
an ``.onnx`` file with its initializers in an aligned external-data file: ONNX Runtime maps
them (only the pages a run touches are resident; prepacked MatMulNBits weights release their
originals), no Python copy stays alive. Needs the ``onnx`` extra.

Example:
    >>> fast = to_ort_nbits(qmodel, example)        # doctest: +SKIP
    >>> logits = fast(**example).logits             # a causal LM; [0] too  # doctest: +SKIP
    >>> fast.nbytes          # bytes of the ONNX file + its data   # doctest: +SKIP
"""

from __future__ import annotations

import copy
import os
import warnings
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compactnn._optional import require
from compactnn.core.modules import set_module
from compactnn.core.onnx_trace import export_dynamic
from compactnn.core.qlayers import QuantLinear
from compactnn.core.tokens import check_token_ids
from compactnn.errors import CompactnnError, counted, name_list, user_stacklevel
from compactnn.kernels.graph_edit import replace_nodes
from compactnn.kernels.nbits_check import PINNED, checked_level
from compactnn.kernels.nbits_files import ALIGN_FROM as ALIGN_FROM
from compactnn.kernels.nbits_files import DATA_ALIGN as DATA_ALIGN
from compactnn.kernels.nbits_files import SMALL_ALIGN as SMALL_ALIGN
from compactnn.kernels.nbits_files import (
    own_folder,
    release,
    reraise_disk_error,
    save_nbits,
    scratch_folder,
)
from compactnn.kernels.nbits_merge import fold_dynamic_biases, merge_siblings
from compactnn.kernels.nbits_split import split_byte_nodes, split_tied_gathers
from compactnn.kernels.nbits_tables import (
    CHANNEL_BLOCK,
    gather_tables,
    head_blocks,
    nbits_tensors,
    replace_gathers,
    share_head_codes,
    tables_to_bf16,
    tensor_key,
    weight_of,
)
from compactnn.kernels.ort_dynamic import (
    DYNAMIC,
    INTEGER_OPS,
    dynamic_format,
    dynamic_nodes,
    dynamic_tensors,
    session_integer_ops,
    share_dynamic_heads,
    stamp_integer_ops,
)
from compactnn.kernels.ort_inputs import (
    check_example_keys,
    check_graph_inputs,
    graph_feed,
    refuse_existing,
)
from compactnn.kernels.ort_output import output_form, wrap_output

NBITS = (4, 8)  # ONNX Runtime's MatMulNBits bit widths used here (codes below 4 bits fit 4)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


def _nbits_format(layer: QuantLinear) -> tuple[int, int] | None:
    """(bits, block size) of ``layer`` on MatMulNBits, or None when it does not fit: weight-only
    layers, and layers whose input grid is MatMulNBits' own at ``accuracy_level=4`` (8-bit
    per-group dynamic activations on the weights' blocks: their nodes are pinned at level 4,
    :data:`~compactnn.kernels.nbits_check.PINNED`)."""
    aq = layer.input_quantizer
    if aq is not None and not (aq.is_group and aq.spec.bits == 8):
        return None
    if getattr(layer, "weight_levels", None) is not None:
        return None
    spec = layer.weight_spec
    k = layer.in_features
    # MLAS blocks: powers of two from 16 (its fast kernels up to 256); a per-channel row
    # becomes blocks of the largest power of two dividing K, at most CHANNEL_BLOCK, each with
    # the row's scale and zero point (K = 384: 128; K = 1536: 128), or of the input's groups
    # (a8g's 8-bit per-channel LM head: level 4 quantizes the input on the weight's blocks)
    block = spec.group_size if spec.granularity == "group" else min(k & -k, CHANNEL_BLOCK)
    if aq is not None and spec.granularity == "channel":
        block = aq.spec.group_size
    bits = 4 if spec.bits <= 4 else 8 if spec.bits == 8 else None
    if bits is None or block < 16 or block & (block - 1) or k % block:
        return None
    if aq is not None and aq.spec.group_size != block:
        return None
    return bits, block


def integer_format(layer: QuantLinear) -> tuple[int, int] | None:
    """``(bits, block)`` of ``layer`` on MatMulNBits, ``(8, DYNAMIC)`` on
    DynamicQuantizeMatMul (:mod:`~compactnn.kernels.ort_dynamic`), or None: float MatMul."""
    return _nbits_format(layer) or dynamic_format(layer)


def misfit_layers(model: nn.Module) -> dict[str, str]:
    """``{weight^T key: name}`` of the quantized linear layers with no integer format here."""
    layers = model.named_modules()
    return {
        tensor_key(m.weight.detach().float().T): n
        for n, m in layers
        if isinstance(m, QuantLinear) and integer_format(m) is None
    }


def dequantized_model(model: nn.Module) -> tuple[nn.Module, dict[str, tuple]]:
    """A copy of ``model`` with MatMulNBits-compatible layers as plain float ``nn.Linear`` on
    their dequantized weights; returns it and ``{weight^T key: (name, layer, bits, block)}``."""
    out = copy.deepcopy(model)
    found = {}
    for name, m in list(out.named_modules()):
        if not isinstance(m, QuantLinear):
            continue
        if (fmt := integer_format(m)) is None:
            continue
        # built on the meta device: no random init drawn from the user's RNG, then overwritten
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        lin.weight = nn.Parameter(m.weight.detach().float().clone())
        if m.bias is not None:
            lin.bias = nn.Parameter(m.bias.detach().float().clone())
        set_module(out, name, lin)
        found[tensor_key(lin.weight.T)] = (name, m, *fmt)
    return out, found


def nbits_onnx(
    model: nn.Module,
    example: dict[str, torch.Tensor],
    accuracy_level: int = 4,
    bf16_tables: bool = True,
    quantized_tables: bool = True,
) -> tuple[bytes, list[str]]:
    """The serialized ONNX model with MatMulNBits nodes, and the layers left as float MatMul.

    Args:
        model: a compressed (simulated) model taking keyword tensors, e.g. a Hugging Face
            encoder from ``compactnn.compress`` or ``compactnn.load``.
        example: one batch of its keyword inputs (``input_ids``, ``attention_mask``).
        accuracy_level: MatMulNBits' ``accuracy_level`` (4: int8 activations on VNNI).
        bf16_tables: store large float lookup tables left in float (token embeddings of an
            unquantized table) in bfloat16, cast to float32 after the lookup: half their
            memory, values rounded to 8 significant bits (as ``to_kernels``' bfloat16 model).
        quantized_tables: quantized embedding tables as GatherBlockQuantized on their codes
            (exact in float32); False keeps them as float Gather tables.
    """
    proto, left = nbits_proto(model, example, accuracy_level, bf16_tables, quantized_tables)
    return proto.SerializeToString(), left


def nbits_proto(
    model: nn.Module,
    example: dict[str, torch.Tensor],
    accuracy_level: int = 4,
    bf16_tables: bool = True,
    quantized_tables: bool = True,
    merge: bool = True,
    scratch: str | os.PathLike | None = None,
) -> tuple[Any, list[str]]:
    """:func:`nbits_onnx` as an ``onnx.ModelProto`` (not serialized); ``merge``: sibling
    projections (query, key, value) as one MatMulNBits (:mod:`compactnn.kernels.nbits_merge`);
    ``scratch``: where the float export is written (a private folder in it; default: the
    temporary folder, ``TMPDIR``: :mod:`~compactnn.kernels.nbits_files`)."""
    onnx = require("onnx", "onnx")
    if accuracy_level not in ACCURACY_LEVELS:
        raise CompactnnError(f"accuracy_level={accuracy_level} must be one of {ACCURACY_LEVELS}")
    if not isinstance(example, dict):
        raise CompactnnError(
            f"to_ort_nbits / nbits_onnx: example is a {type(example).__name__}; they take a "
            "weight-only quantized transformer (e.g. compactnn.compress(model, "
            "'w4-g32-gptq', ...)) and one batch of its keyword inputs as a dict, e.g. "
            "{'input_ids': ids, 'attention_mask': mask}. A CNN or other model called with "
            "tensors runs on integer kernels with compactnn.deploy(qmodel, example=x)."
        )
    tables = gather_tables(model) if quantized_tables else {}
    plain, found = dequantized_model(model)
    head_blocks(tables, found)  # a tied table on its head's blocks, to share its codes
    with scratch_folder(scratch) as tmp:  # a full disk: one line naming it and the ways out
        export_dynamic(plain, example, tmp / "m.onnx")
        proto = onnx.load(str(tmp / "m.onnx"))
    del plain
    used, seen = _replace_matmuls(onnx, proto.graph, found, accuracy_level)
    split = accuracy_level != 4 and split_byte_nodes(onnx, proto.graph)  # no fp32 8-bit kernel
    if tables:
        replace_gathers(onnx, proto.graph, tables)
        share_dynamic_heads(onnx, proto.graph)  # a tied head on DynamicQuantizeMatMul
        if split and split_tied_gathers(onnx, proto.graph):  # the table of a split tied head
            share_head_codes(onnx, proto.graph)
    if merge:  # after the tables: a head whose codes a lookup reads stays one node
        merge_siblings(onnx, proto.graph)
    fold_dynamic_biases(onnx, proto.graph)  # the merged siblings carry theirs already
    if bf16_tables:
        tables_to_bf16(onnx, proto.graph)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    # fitting layers whose MatMul the graph holds but that did not become MatMulNBits (a
    # layer the traced output does not use, e.g. BERT's pooler, is not in the graph at all)
    left = {name for key, (name, *_) in found.items() if key in seen and key not in used}
    left |= {name for key, name in misfit_layers(model).items() if key in seen}  # no format
    stamp_integer_ops(proto)
    return proto, sorted(left)


def _replace_matmuls(
    onnx: Any, graph: Any, found: dict, accuracy_level: int
) -> tuple[set[str], set[str]]:
    """Swap each MatMul or linear Gemm (a 2-D input exports ``nn.Linear`` as
    ``Gemm(x, W, b, transB=1)``) on a known dequantized weight for MatMulNBits (and an ``Add``
    of the Gemm's bias); returns their keys and the keys of every weight the graph held."""
    to_array, from_array = onnx.numpy_helper.to_array, onnx.numpy_helper.from_array
    inits = {i.name: i for i in graph.initializer}
    # keys of W^T: a MatMul's (K, N) weight as stored, a transB Gemm's (N, K) transposed
    keys: dict[tuple[str, bool], str] = {}
    for node in graph.node:
        got = weight_of(onnx, node)
        if got is not None and got[0] in inits and len(inits[got[0]].dims) == 2 and got not in keys:
            t = torch.from_numpy(to_array(inits[got[0]]).copy())
            keys[got] = tensor_key(t.T if got[1] else t)
    used, dropped, nodes = set(), set(), []
    for node in graph.node:
        got = weight_of(onnx, node)
        key = keys.get(got) if got is not None else None
        if key not in found:
            nodes.append(node)
            continue
        w = got[0]
        _, layer, bits, block = found[key]
        dynamic = block == DYNAMIC
        tensors = dynamic_tensors(layer) if dynamic else nbits_tensors(layer, bits, block)
        names = [f"{w}_nbits_{s}" for s in tensors]
        graph.initializer.extend(
            from_array(t.numpy(), n) for n, t in zip(names, tensors.values(), strict=True)
        )
        used.add(key)
        dropped.add(w)
        if dynamic:  # one node, the Gemm's bias included
            nodes.extend(dynamic_nodes(onnx, node, layer, names, node.output[0]))
            continue
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 else ""
        out = f"{node.output[0]}_nobias" if bias else node.output[0]
        # an input grid here is level 4's own (_nbits_format): level 4 whatever was asked
        pin = layer.input_quantizer is not None
        nodes.append(
            onnx.helper.make_node(
                "MatMulNBits",
                [node.input[0], *names],
                [out],
                name=f"{node.name}_nbits{PINNED if pin else ''}",
                domain="com.microsoft",
                K=layer.in_features,
                N=layer.out_features,
                bits=bits,
                block_size=block,
                accuracy_level=4 if pin else accuracy_level,
            )
        )
        if bias:
            nodes.append(
                onnx.helper.make_node(
                    "Add", [out, bias], [node.output[0]], name=f"{node.name}_bias"
                )
            )
    replace_nodes(graph, nodes, dropped)
    return used, set(keys.values())


class OrtNBitsModel(nn.Module):
    """A model exported by :func:`nbits_onnx`, run by ONNX Runtime behind the model's keyword
    call; returns its float32 main output (a causal LM's logits, an encoder's last hidden
    state) as ``(tensor,)``, or in the class ``output_form`` names (:mod:`.ort_output`).

    Args:
        source: an ``.onnx`` path (its external data beside it, mapped: :func:`save_nbits`)
            or the serialized bytes (ONNX Runtime then copies every initializer).
        names: the input names (kept); a call feeds the graph's own inputs, refusing a
            missing or unknown one (:mod:`~compactnn.kernels.ort_inputs`).
        threads: intra-op threads (default: ``torch.get_num_threads()``).
        arena: ONNX Runtime's CPU memory arena (default off: on, it keeps every shape's peak).
    """

    def __init__(
        self,
        source: bytes | str | os.PathLike,
        names: list[str],
        threads: int | None = None,
        *,
        arena: bool = False,
    ) -> None:
        super().__init__()
        ort = require("onnxruntime", "onnx")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.enable_cpu_mem_arena = arena
        # spinning idle threads steal the CPU from the caller and other jobs
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = None if isinstance(source, bytes) else Path(source)  # the file it runs
        if isinstance(source, bytes):
            self.nbytes = len(source)
        else:
            source = str(source)
            if not Path(source).is_file():
                raise CompactnnError(f"OrtNBitsModel: {source} is not a file (an .onnx path)")
            data = Path(source + ".data")
            self.nbytes = Path(source).stat().st_size + (
                data.stat().st_size if data.exists() else 0
            )
        self.session = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        # the graph's own inputs decide what a call feeds (ort_inputs): ``names`` is informative
        self.inputs = {i.name: i.type for i in self.session.get_inputs()}
        self.names = names
        self.runtime = "onnxruntime " + " + ".join(session_integer_ops(self.session, source))
        # set by to_ort_nbits: the MatMulNBits accuracy_level that runs, and the check of
        # level 4 against the simulated model (drift's numbers, "drifted": why or None)
        self.accuracy_level: int | None = None
        self.accuracy_check: dict[str, Any] | None = None
        self.output_form: tuple[type, str] | None = None  # set by to_ort_nbits

    def remove_on_delete(self, folder: str | os.PathLike, lock: int | None = None) -> None:
        """Delete ``folder`` (the model's own temporary files) when this model is collected
        or at interpreter exit, whichever comes first; then close ``lock``, the descriptor
        holding the folder's lock (:func:`~compactnn.kernels.nbits_files.private_folder`)."""
        weakref.finalize(self, release, str(folder), lock)  # atexit=True: also at exit

    def generate(self, *args: Any, **kwargs: Any) -> None:
        """Refused with the way to generate (a Hugging Face decoder's ``generate`` needs it)."""
        raise CompactnnError(
            "OrtNBitsModel has no generate(): its graph runs whole sequences without a KV cache; "
            "generate on compactnn.to_kernels(qmodel) or compactnn.load(artifact, kernels=True)"
        )

    def forward(self, **kwargs: torch.Tensor) -> Any:
        feed = graph_feed(kwargs, self.inputs)
        return wrap_output(torch.from_numpy(self.session.run(None, feed)[0]), self.output_form)


def to_ort_nbits(
    model: nn.Module,
    example: dict[str, torch.Tensor],
    *,
    accuracy_level: int | None = None,
    bf16_tables: bool = True,
    quantized_tables: bool = True,
    threads: int | None = None,
    path: str | os.PathLike | None = None,
    force: bool = False,
) -> OrtNBitsModel:
    """``model`` on ONNX Runtime with its weight-only layers as MatMulNBits (see module doc).

    Args:
        model: a compressed model taking keyword tensors (Hugging Face encoders, decoders
            without KV cache).
        example: one batch of keyword inputs (shapes are dynamic in batch and sequence).
        accuracy_level: None (default): 4 (int8 activations, VNNI) when its output on
            ``example`` stays within :mod:`~compactnn.kernels.nbits_check`'s tolerance of the
            simulated model's, else 0 with a warning; 4 forces int8 activations, 0 float32
            compute. The level that runs is the returned model's ``accuracy_level``.
        bf16_tables: float token embeddings stored in bfloat16 (see :func:`nbits_onnx`).
        quantized_tables: quantized token embeddings as GatherBlockQuantized (default).
        threads: intra-op threads (default: ``torch.get_num_threads()``).
        path: write the model here (with its external data ``path.data``: keep them together)
            and run it from there (the float export is written beside it, in a folder removed
            after it); default: a private folder ``compactnn-nbits-*`` in the temporary folder
            (``TMPDIR``), removed with the model or at interpreter exit (``sys.exit`` too: a
            SIGTERM handler that exits, as the ``compactnn`` command's, removes it). A process
            killed outright (SIGKILL; SIGTERM with no handler) leaves it, until the next
            ``to_ort_nbits`` there removes it. With ``path=`` nothing goes to ``TMPDIR`` and
            only a kill during the export leaves a ``compactnn-nbits-*`` folder, beside it.
        force: replace an existing file at ``path`` (or its ``path.data``); refused otherwise.

    Returns:
        An :class:`OrtNBitsModel` (its session maps the file); a call returns the model's
        own output class: ``out.logits`` (causal LM) or ``out.last_hidden_state`` (encoder),
        ``out[0]`` either way; ``(tensor,)`` for other models. No ``generate()``.

    Raises:
        CompactnnError: no layer becomes MatMulNBits (a float or W8A8 model); a full,
            read-only or quota-bound disk where it writes (named, with the ways out).
    """
    level = 4 if accuracy_level is None else accuracy_level
    if path is not None:
        refuse_existing(path, force)
    scratch = None if path is None else Path(path).parent  # path=: TMPDIR is not written
    if isinstance(example, dict):  # float or out-of-vocabulary ids: refused before tracing
        check_token_ids(model, example, "to_ort_nbits: example", resave=False)
        check_example_keys(model, example)
    proto, left = nbits_proto(model, example, level, bf16_tables, quantized_tables, True, scratch)
    check_graph_inputs(proto.graph, example)
    if not any(n.op_type in INTEGER_OPS for n in proto.graph.node):
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
        misfit = [n for n, m in layers if integer_format(m) is None]
        why = (
            f"its {len(misfit)} quantized linear layers ({name_list(misfit, 3)}) quantize "
            "their activations on a calibrated or per-token grid, or have no integer weight "
            "grid (W8A8 models run on compactnn.to_kernels)"
            if misfit
            else "it has no quantized linear layer"
        )
        raise CompactnnError(
            f"to_ort_nbits: no layer of this model became MatMulNBits or DynamicQuantizeMatMul: "
            f"{why}; it takes a weight-only quantized model, e.g. compactnn.compress(model, "
            "'w4-g32-gptq', ...), or one with per-group or per-tensor dynamic activations "
            "('w4a8g-g32-gptq', 'w8a8d')"
        )
    if left:
        warnings.warn(
            f"to_ort_nbits: {counted(len(left), 'quantized layer')} left as float MatMul "
            f"(simulated) in the ONNX model: {name_list(left)}",
            stacklevel=user_stacklevel(),
        )
    own = path is None
    folder, lock = own_folder() if own else (Path(path).parent, None)
    target = folder / "model.onnx" if own else path
    try:
        save_nbits(proto, target)
        del proto
        out = OrtNBitsModel(target, list(example), threads)
        out.accuracy_level = level
        if accuracy_level is None:

            def exact() -> OrtNBitsModel:  # level 0 built again: its 8-bit layers split
                proto, _ = nbits_proto(
                    model, example, 0, bf16_tables, quantized_tables, True, scratch
                )
                save_nbits(proto, target)
                return OrtNBitsModel(target, list(example), threads)

            out = checked_level(model, example, out, target, exact)
    except OSError as exc:  # a full disk: one line naming the folder and the ways out
        if own:
            release(folder, lock)
        reraise_disk_error(exc, folder.parent if own else folder, own)
    except BaseException:
        if own:
            release(folder, lock)
        raise
    if own:
        out.remove_on_delete(folder, lock)
    out.output_form = output_form(model, example)
    return out
