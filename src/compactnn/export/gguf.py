"""GGUF export of compressed Llama-family and Qwen2 decoders for llama.cpp, verified exactly.

Every quantized weight whose compactnn grid maps exactly onto a GGUF block type (see
:mod:`compactnn.export.gguf_blocks`) is written as that type, its codes and float16 scales
reused as they are: no requantization. Float tensors (norms, biases, unquantized layers) are
F32. Which architecture a model is written as is :mod:`compactnn.export.gguf_arch`'s table:
for llama.cpp's ``llama`` the q and k projections are permuted from Hugging Face's rotate-half
rotary layout to llama.cpp's interleaved one, rows only, so codes and scales move with their
rows; ``qwen2`` (NEOX rotary, rotate-half) takes them as they are. A weight
with no exact type is refused with the nearest exact recipe named, or, with
``requantize=True``, requantized by ``gguf``'s reference quantizer with the error reported.

After writing, :func:`verify` reads the file back with ``gguf.GGUFReader``, dequantizes each
tensor with ``gguf.quants.dequantize`` and compares it with compactnn's dequantized weight
(permuted alike): every tensor written exactly must be bit-identical.

Example:
    >>> report = write_gguf(qmodel, "tiny.gguf", tokenizer=tok)  # doctest: +SKIP
    >>> report.exact, report.types  # doctest: +SKIP
    (True, {'Q5_0': 21, 'Q8_0': 4, 'F32': 9})
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compactnn._optional import require
from compactnn.core.qlayers import has_integer_weight
from compactnn.errors import CompactnnError, user_stacklevel
from compactnn.export import gguf_arch as ga
from compactnn.export import gguf_blocks as gb
from compactnn.export.formats import check_replaceable
from compactnn.export.fs import atomic_write, check_file_path, names_folder, write_error
from compactnn.export.gguf_tokenizer import add_tokenizer

_EXTRA = "export"
_FILE_TYPE = {"F32": 0, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9}


def _gguf():
    return require("gguf", _EXTRA)


@dataclasses.dataclass(frozen=True)
class TensorPlan:
    """One GGUF tensor: its name, the module it comes from, its type and how it was made.

    ``how`` is ``"exact"`` (codes reused, or a float tensor as F32), ``"float"`` (with
    ``requantize``: a quantized weight whose rows split into no GGUF block, written as its
    dequantized values in F32: exact but not compressed), ``"requantized"`` or ``"refused"``
    (then ``note`` says why).
    """

    name: str
    source: str
    ggml_type: str
    shape: tuple[int, ...]
    how: str
    note: str = ""
    data: Any = dataclasses.field(default=None, repr=False, compare=False)
    expected: Any = dataclasses.field(default=None, repr=False, compare=False)


@dataclasses.dataclass(frozen=True)
class GGUFReport:
    """What :func:`write_gguf` wrote and what :func:`verify` found."""

    path: Path
    tensors: tuple[TensorPlan, ...]
    file_bytes: int
    tensor_bytes: int  # theoretical: elements x bits per weight of each type, no metadata
    max_diff: dict[str, float]  # per tensor: max |gguf dequantized - compactnn dequantized|

    @property
    def exact(self) -> bool:
        """True when every tensor read back bit-identical to compactnn's weights."""
        return all(v == 0.0 for v in self.max_diff.values())

    @property
    def types(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.ggml_type] = out.get(t.ggml_type, 0) + 1
        return out


def _act_quantized(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if getattr(m, "input_quantizer", None) is not None]


def _nearest(recipe: str, bits: int, reason: str) -> str:
    """A recipe with an exact GGUF type, close to ``recipe``."""
    if reason.split(": ")[-1].startswith("rows of"):
        return (
            "none for this layer (its width is not a multiple of 32): keep it in float (--ignore)"
        )
    if "group" in reason or "codebook" in reason:
        fixed = re.sub(r"-g\d+", "-g32", recipe) if re.search(r"-g\d+", recipe) else None
        return fixed or f"w{min(bits, 8)}-g32"
    if "int8" in reason:
        return "w8 (symmetric int8)"
    return "w8"


def _plan_weight(gguf_name, src, layer, heads, requantize) -> TensorPlan:
    spec = layer.weight_spec
    w = layer.weight.detach().float().reshape(layer.weight.shape[0], -1)  # (rows, K)
    shape = tuple(w.shape)
    if getattr(layer, "weight_levels", None) is not None:
        grid: Any = "non-uniform codebook levels have no GGUF block type"
    else:
        codes = layer.weight_codes.reshape(shape)
        grid = gb.block_grid(
            codes, layer.weight_scale, layer.weight_zero, spec.granularity, spec.group_size or 0
        )
    if heads:
        w = gb.rope_permute(w, heads)
    if not isinstance(grid, str):
        q, d, z = (gb.rope_permute(t, heads) if heads else t for t in grid)
        blocks = gb.exact_blocks(q, d, z)
        if not isinstance(blocks, str):
            return TensorPlan(gguf_name, src, blocks.ggml_type, shape, "exact", "", blocks.data, w)
        grid = blocks
    note = f"{src} ({spec.qtype.name}, {spec.granularity}{spec.group_size or ''}): {grid}"
    if not requantize:
        return TensorPlan(gguf_name, src, "", shape, "refused", note, None, w)
    if shape[1] % gb.BLOCK:  # no block type fits the row: the dequantized weight, exactly
        return TensorPlan(gguf_name, src, "F32", shape, "float", note, w.numpy(), w)
    target = {4: "Q4_0" if spec.symmetric else "Q4_1", 5: "Q5_0" if spec.symmetric else "Q5_1"}
    ggml_type = target.get(max(spec.bits, 4), "Q8_0")
    gguf = _gguf()
    data = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[ggml_type])
    return TensorPlan(gguf_name, src, ggml_type, shape, "requantized", note, data, w)


def plan(model: nn.Module, *, requantize: bool = False) -> tuple[TensorPlan, ...]:
    """The GGUF tensor of each weight of ``model`` (no file written).

    Raises:
        CompactnnError: for a model that is no decoder GGUF takes (see
            :mod:`compactnn.export.gguf_arch`) or quantizes activations.
    """
    reason = _structure_reason(model)
    if reason:
        raise CompactnnError(f"cannot export to GGUF: {reason}.")
    arch, _ = ga.arch_of(model)
    out = []
    for gguf_name, src, obj, heads in ga.sources(model, arch):
        if hasattr(obj, "weight_codes"):
            out.append(_plan_weight(gguf_name, src, obj, heads, requantize))
            continue
        t = obj if isinstance(obj, torch.Tensor) else obj.weight
        t = t.detach().float()
        t = gb.rope_permute(t, heads) if heads else t
        out.append(TensorPlan(gguf_name, src, "F32", tuple(t.shape), "exact", "", t.numpy(), t))
    return tuple(out)


def _structure_reason(model: nn.Module) -> str | None:
    _, reason = ga.arch_of(model)
    if reason:
        return reason
    acts = _act_quantized(model)
    if acts:
        return (
            f"{len(acts)} layers quantize their activations (e.g. {acts[0]}), which llama.cpp "
            "does not simulate; export a weight-only recipe such as w8 or w4-g32-gptq"
        )
    return None


def _float_reason(model: nn.Module) -> str | None:
    """Why a model with no quantized weight does not go to ``export`` (every weight would be
    F32: the file is not compressed), else None."""
    if any(has_integer_weight(m) for m in model.modules()):
        return None
    return (
        f"GGUF export needs a compressed model (compactnn.compress(hf_model, ...)); this "
        f"{type(model).__name__} has no quantized weight, so every weight would be F32 (the "
        "file is not compressed)"
    )


def can_export(model: nn.Module) -> str | None:
    """None when ``model`` goes to GGUF exactly, else the reason (with the nearest recipe).

    Example:
        >>> can_export(qmodel)  # doctest: +SKIP
    """
    reason = _structure_reason(model) or _float_reason(model)
    if reason:
        return reason
    refused = [t for t in plan(model) if t.how == "refused"]
    if not refused:
        return None
    spec = _spec_of(model, refused[0].source)
    recipe = getattr(getattr(model, "_compactnn", {}).get("recipe"), "name", "") or ""
    nearest = _nearest(recipe, spec.bits if spec else 8, refused[0].note)
    rows = sum(t.shape[1] % gb.BLOCK != 0 for t in refused)
    requantize = "or pass requantize=True / --requantize"
    if rows == len(refused):
        requantize = "requantize=True / --requantize writes them as F32, not compressed"
    elif rows:
        requantize += f", which writes the {rows} whose rows do not split as F32, not compressed"
    return (
        f"{len(refused)} weights have no exact GGUF type, e.g. {refused[0].note}; the nearest "
        f"exact recipe is {nearest} ({requantize})"
    )


def _spec_of(model: nn.Module, name: str):
    return getattr(model.get_submodule(name), "weight_spec", None)


def _file_type(tensors: tuple[TensorPlan, ...]) -> int:
    counts: dict[str, int] = {}
    for t in tensors:
        if t.ggml_type != "F32":
            counts[t.ggml_type] = counts.get(t.ggml_type, 0) + int(np.prod(t.shape))
    return _FILE_TYPE.get(max(counts, key=counts.get), 0) if counts else 0


def _file_write_error(exc: OSError, tmp: str, tensors: tuple[TensorPlan, ...]) -> OSError:
    """numpy's short write (no errno) counts the bytes of one tensor's write, not the file's
    ("4032 of 4096 bytes written" for a 2.8 MB file): the error with the file's counts."""
    named = write_error(exc, tmp)
    if exc.errno is not None or not isinstance(named, OSError) or named.errno is None:
        return exc
    try:
        written = f"{os.path.getsize(tmp):,} bytes written"
    except OSError:
        written = "written in part"
    why = f"{os.strerror(named.errno)} (the file stopped at {written}; its tensors alone take "
    return OSError(named.errno, f"{why}{tensor_bytes(tensors):,})", tmp)


def tensor_bytes(tensors: tuple[TensorPlan, ...]) -> int:
    """Theoretical payload: each tensor's elements at its type's bits per weight."""
    bpw = {**gb.BITS_PER_WEIGHT, "F32": 32.0, "F16": 16.0}
    return int(sum(np.prod(t.shape) * bpw[t.ggml_type] / 8 for t in tensors))


def write_gguf(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    tokenizer: Any = None,
    requantize: bool = False,
    name: str = "compactnn",
    force: bool = False,
) -> GGUFReport:
    """Write ``model`` as a GGUF file for llama.cpp and verify it; see the module docstring.

    Args:
        model: a compressed (or float) ``LlamaForCausalLM``, ``MistralForCausalLM`` or
            ``Qwen2ForCausalLM``; never modified.
        out: the ``.gguf`` file (written atomically), or a directory for ``model.gguf``.
        tokenizer: a byte-level BPE (a ``tokenizers.Tokenizer``, a fast ``transformers``
            tokenizer, or an object with ``.backend``); None writes ``no_vocab``.
        requantize: write weights with no exact GGUF type through ``gguf``'s quantizer
            (their error is in the report) instead of refusing.
        name: ``general.name``.
        force: replace an existing GGUF file (refused otherwise, before any work); a file
            that does not start with the GGUF magic is refused even with it.

    Raises:
        CompactnnError: the file exists and ``force`` is false or it is no GGUF file, not
            a decoder GGUF takes, activation quantization, a weight with no exact type (without
            ``requantize``), an unsupported tokenizer, or a failed read-back.
    """
    gguf = _gguf()
    path = Path(out)
    if path.is_dir() or names_folder(out):  # a folder ("out/" too): model.gguf in it
        path = path / "model.gguf"
    check_file_path(path, "out", force=force, suggest="model.gguf")
    check_replaceable("gguf", path)  # force replaces an earlier GGUF file, nothing else
    tensors = plan(model, requantize=requantize)
    arch, _ = ga.arch_of(model)
    refused = [t for t in tensors if t.how == "refused"]
    if refused:
        raise CompactnnError(f"cannot export to GGUF exactly: {can_export(model)}.")

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch.name)
        ga.add_hparams(writer, model.config, name)
        writer.add_file_type(_file_type(tensors))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(writer, tokenizer, model.config)
        for t in tensors:
            raw = None if t.ggml_type == "F32" else gguf.GGMLQuantizationType[t.ggml_type]
            data = np.ascontiguousarray(t.data)
            writer.add_tensor(t.name, data, raw_dtype=raw)
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
        except OSError as exc:
            raise _file_write_error(exc, tmp, tensors) from exc

    atomic_write(path, write)
    if (context := ga.context_length(model.config)) < model.config.max_position_embeddings:
        warnings.warn(
            f"GGUF {path.name}: context length {context}, the model's sliding window (of "
            f"{model.config.max_position_embeddings} positions): llama.cpp's {arch.name} "
            "architecture attends to every earlier position, the window's attention only within "
            "it; a longer n_ctx in llama.cpp computes another model than this one.",
            stacklevel=user_stacklevel(),
        )
    diffs = verify(path, tensors)
    bad = [n for n, t in zip(diffs, tensors, strict=True) if t.how != "requantized" and diffs[n]]
    if bad:
        raise CompactnnError(
            f"GGUF read-back of {path} differs from compactnn's weights in {bad[:3]}; "
            "this is a bug: please report it with the recipe."
        )
    size = path.stat().st_size
    if (line := float_warning(tensors, size, path.name)) is not None:
        warnings.warn(line, stacklevel=user_stacklevel())
    requantized = {t.name: diffs[t.name] for t in tensors if t.how == "requantized"}
    if requantized:
        worst = max(requantized, key=requantized.get)
        warnings.warn(
            f"GGUF {path.name}: requantized {len(requantized)} weights with no exact GGUF type "
            f"(max abs error vs compactnn's weights {requantized[worst]:.3g}, in {worst}); "
            "they no longer match the simulated model exactly: the read-back verifies them "
            "within that error, the other tensors bit-exactly.",
            stacklevel=user_stacklevel(),
        )
    return GGUFReport(path, tensors, size, tensor_bytes(tensors), diffs)


def float_warning(tensors: tuple[TensorPlan, ...], file_bytes: int, name: str) -> str | None:
    """The warning for quantized weights written as F32 (``how="float"``), else None.

    Example:
        >>> float_warning((), 0, "m.gguf") is None
        True
    """
    floats = [t for t in tensors if t.how == "float"]
    if not floats:
        return None
    quantized = [t for t in tensors if t.how != "exact" or t.ggml_type != "F32"]
    widths = sorted({t.shape[1] for t in floats})
    f32 = sum(int(np.prod(t.shape)) * 4 for t in floats)
    whole = (
        "every quantized weight is F32: the file is not compressed"
        if len(floats) == len(quantized)
        else f"{f32 / max(file_bytes, 1):.0%} of the file"
    )
    return (
        f"GGUF {name}: {len(floats)} of {len(quantized)} quantized weights are written as F32 "
        f"({f32:,} bytes; {whole}): their rows of {', '.join(map(str, widths))} weights do not "
        f"split into GGUF blocks of {gb.BLOCK}, e.g. {floats[0].source}. Their values are "
        "compactnn's dequantized weights, exactly (the same file as keeping them in float); "
        f"GGUF compresses only rows whose width is a multiple of {gb.BLOCK}."
    )


def verify(path: str | os.PathLike, tensors: tuple[TensorPlan, ...]) -> dict[str, float]:
    """Read ``path`` with ``gguf.GGUFReader``, dequantize every tensor with
    ``gguf.quants.dequantize`` and return its max abs difference to the expected weight."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(path))
    found = {t.name: t for t in reader.tensors}
    out = {}
    for t in tensors:
        if t.name not in found:
            raise CompactnnError(f"GGUF read-back of {path}: tensor {t.name} is missing.")
        r = found[t.name]
        got = torch.from_numpy(np.array(gguf.quants.dequantize(r.data, r.tensor_type)))
        want = t.expected.reshape(got.shape) if got.numel() == t.expected.numel() else None
        if want is None:
            raise CompactnnError(f"GGUF read-back of {path}: {t.name} has shape {got.shape}.")
        out[t.name] = float((got.float() - want).abs().max()) if got.numel() else 0.0
    return out


def export(model: nn.Module, out: str | os.PathLike, *, force: bool = False, **opts: Any) -> Path:
    """The ``compactnn export --format gguf`` entry: :func:`write_gguf`, returning the path;
    an existing GGUF file is replaced only with ``force``. A model with no quantized weight
    is refused (:func:`write_gguf` itself writes one, all F32, for tests and benches)."""
    if (reason := _structure_reason(model) or _float_reason(model)) is not None:
        raise CompactnnError(f"cannot export to GGUF: {reason}.")
    return write_gguf(model, out, force=force, **opts).path
