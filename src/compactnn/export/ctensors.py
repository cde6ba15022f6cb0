"""compressed-tensors export: a Hugging Face folder that plain ``transformers`` loads.

A compressed Hugging Face model becomes ``config.json`` (with a ``quantization_config``),
``model.safetensors`` and, when given, the tokenizer files. Each quantized layer maps onto a
compressed-tensors scheme without requantizing:

* weights: ``bits`` b, groups of ``G`` / per channel / per tensor. compactnn's signed codes
  ``q`` in ``[-2^(b-1), 2^(b-1) - 1]`` are the format's codes; unsigned codes (asymmetric
  grids) are shifted by ``2^(b-1)``, and so is their zero point, which leaves
  ``w = (q - z) * s`` unchanged. A zero point of 0 everywhere is the symmetric scheme.
* activations: a calibrated static quantizer is ``strategy="tensor"`` with the saved
  ``input_scale`` / ``input_zero_point``; compactnn's per-token dynamic quantizer
  (``w8a8-smoothquant``) is ``strategy="token", dynamic=True``, asymmetric. SmoothQuant's
  smoothing is already folded into the weights and norms, so nothing else moves.
* storage: sub-8-bit weights in ``pack-quantized`` (int32 words), 8-bit weights in
  ``int-quantized`` (int8); packing is compressed-tensors' own compressor, and every layer's
  decompression is checked bit-exactly against compactnn's dequantized weight before
  anything is written; :func:`export` then loads the folder with plain transformers and
  compares its outputs with the simulation (:func:`verify_folder`) before it replaces ``out``.

Needs ``transformers`` and ``compressed-tensors`` (the ``export`` extra).

Example:
    >>> export(qmodel, "out/minilm-w4", tokenizer=tok)        # doctest: +SKIP
    >>> AutoModel.from_pretrained("out/minilm-w4")             # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compactnn._optional import require
from compactnn.core.dynact import DynamicActQuantizer
from compactnn.core.qembedding import QuantEmbedding
from compactnn.core.qlayers import ActQuantizer, QuantLinear, has_integer_weight
from compactnn.errors import CompactnnError, name_list, user_stacklevel
from compactnn.export.ct_folder import NO_TOKENIZER, _check_other_model, _write_folder, check_out
from compactnn.export.fs import replace_folder
from compactnn.export.hf_check import (  # noqa: F401
    MIN_COSINE,
    ignore_fix,
    other_layers,
    probe_ids,
    probe_inputs,
    verify_folder,
)

EXTRA = "export"
_STRATEGY = {"group": "group", "channel": "channel", "tensor": "tensor"}
CONV1D_KEY = "conv1d_as_linear"  # compactnn.api's record of GPT-2 Conv1D layers made Linear


def _shift(signed: bool, bits: int) -> int:
    """What moves compactnn's codes onto the format's signed range (0 for signed grids)."""
    return 0 if signed else 1 << (bits - 1)


def _is_hf(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return hasattr(config, "to_dict") and "transformers" in str(type(model).__mro__)


def _weight_reason(name: str, m: nn.Module) -> str | None:
    """Why ``m``'s integer weight has no compressed-tensors scheme, else None."""
    if getattr(m, "weight_levels", None) is not None:
        return f"{name}: a codebook grid (ternary/powers of two) is not an affine int grid"
    if not isinstance(m, (QuantLinear, QuantEmbedding)):
        return f"{name}: {type(m).__name__} layers have no compressed-tensors scheme"
    zero = m.weight_zero
    if not torch.equal(zero, zero.round()):
        return f"{name}: non-integer zero points"
    return None


def _act_reason(name: str, aq: ActQuantizer | None) -> str | None:
    if aq is None or not aq.enabled:
        return None
    if isinstance(aq, DynamicActQuantizer):
        if aq.spec.symmetric or aq.qtype.bits != 8:
            return f"{name}: only 8-bit asymmetric per-token dynamic activations map"
        return None
    if getattr(aq, "runtime_range", False):
        kind = "per-group" if aq.is_group else "per-tensor"
        return (
            f"{name}: {kind} dynamic activations have no compressed-tensors form "
            "(export it with --format onnx, or compactnn.to_ort_nbits)"
        )
    if not aq.calibrated:
        return f"{name}: an uncalibrated activation quantizer"
    return None


def _conv1d_layers(qmodel: nn.Module) -> list[str]:
    """The GPT-2 ``Conv1D`` layers that ``compress`` turned into ``nn.Linear`` (its record)."""
    extra = getattr(qmodel, "_compactnn", {}).get("extra", {})
    return list(extra.get(CONV1D_KEY, []))


def can_export(qmodel: nn.Module) -> str | None:
    """None when :func:`export` can write ``qmodel`` exactly, else the reason with the fix.

    Example:
        >>> can_export(torch.nn.Linear(2, 2))
        'compressed-tensors export needs a compressed Hugging Face model (compactnn.compress(hf_model, ...)); got Linear.'
    """  # noqa: E501
    if not _is_hf(qmodel) or not hasattr(qmodel, "_compactnn"):
        return (
            "compressed-tensors export needs a compressed Hugging Face model "
            f"(compactnn.compress(hf_model, ...)); got {type(qmodel).__name__}."
        )
    if convs := _conv1d_layers(qmodel):
        return (
            f"{len(convs)} layers ({name_list(convs, 2)}) are GPT-2 Conv1D layers, held as "
            f"nn.Linear here: {type(qmodel).__name__} builds them as Conv1D (weight stored "
            "transposed), to which compressed-tensors attaches no quantization, so transformers "
            "could not load the folder; export with --format onnx (onnx_hf.export) or save "
            "with compactnn.save."
        )
    if others := other_layers(qmodel):
        return ignore_fix(others, "compressed-tensors")
    owned: set[int] = set()
    found = False
    for name, m in qmodel.named_modules():
        if has_integer_weight(m):
            found = True
            reason = _weight_reason(name, m) or _act_reason(
                name, getattr(m, "input_quantizer", None)
            )
            if reason:
                return f"{reason}; compactnn.save keeps this model, or use w4-g128-gptq / w8a8."
            if getattr(m, "input_quantizer", None) is not None:
                owned.add(id(m.input_quantizer))
    if not found:
        return "the model has no quantized layer: save the float model with save_pretrained."
    for name, m in qmodel.named_modules():
        if isinstance(m, ActQuantizer) and id(m) not in owned and m.enabled:
            return (
                f"{name}: a standalone activation quantizer has no compressed-tensors scheme; "
                "export the compressed model before quantize_residuals (compactnn.save keeps that "
                "model; call quantize_residuals again after loading it)."
            )
        if type(m).__module__.startswith("compactnn") and not isinstance(
            m, (ActQuantizer, QuantLinear, QuantEmbedding)
        ):
            return (
                f"{name}: the compactnn module {type(m).__name__} has no compressed-tensors "
                "form; save with compactnn.save."
            )
    try:  # the input verify_folder checks the written folder on
        probe_inputs(qmodel)
    except CompactnnError as exc:
        return str(exc)
    if getattr(qmodel.config, "tie_word_embeddings", False):
        emb, head = qmodel.get_input_embeddings(), qmodel.get_output_embeddings()
        if head is not None and (has_integer_weight(emb) or has_integer_weight(head)):
            if head.weight is not emb.weight or has_integer_weight(head):
                return (
                    "tied input/output embeddings are quantized: compressed-tensors stores one "
                    "table; compress with --ignore lm_head / ignore=['lm_head'], or save with "
                    "compactnn.save."
                )
    return None


def weight_args(m: nn.Module) -> dict[str, Any]:
    """The compressed-tensors ``QuantizationArgs`` fields of ``m``'s weight grid."""
    spec = m.weight_spec
    shift = _shift(spec.qtype.signed, spec.bits)
    symmetric = bool((m.weight_zero == shift).all())
    args = {
        "num_bits": spec.bits,
        "type": "int",
        "symmetric": symmetric,
        "strategy": _STRATEGY[spec.granularity],
        "dynamic": False,
    }
    if spec.granularity == "group":
        args["group_size"] = spec.group_size
    return args


def act_args(aq: ActQuantizer | None) -> dict[str, Any] | None:
    """The ``QuantizationArgs`` fields of a layer's input quantizer (None: weight-only)."""
    if aq is None or not aq.enabled:
        return None
    if isinstance(aq, DynamicActQuantizer):
        return {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "token",
                "dynamic": True}  # fmt: skip
    shift = _shift(aq.qtype.signed, aq.qtype.bits)
    return {
        "num_bits": aq.qtype.bits,
        "type": "int",
        "symmetric": int(aq.zero) == shift,
        "strategy": "tensor",
        "dynamic": False,
    }


def _local_state(m: nn.Module, wargs: dict, aargs: dict | None) -> dict[str, torch.Tensor]:
    """The module's uncompressed compressed-tensors state: float weight, scale, zero point."""
    spec = m.weight_spec
    shift = _shift(spec.qtype.signed, spec.bits)
    scale = m.weight_scale.float().clone()  # (rows, ngroups); fp32 keeps (q - z) * s exact
    zero = (m.weight_zero - shift).to(torch.int8)
    if spec.granularity == "tensor":
        scale, zero = scale.reshape(1), zero.reshape(1)
    state = {"weight": m.weight.detach().float().clone(), "weight_scale": scale}
    if not wargs["symmetric"]:
        state["weight_zero_point"] = zero
    if aargs is not None and not aargs["dynamic"]:
        aq = m.input_quantizer
        state["input_scale"] = aq.scale.float().reshape(1).clone()
        if not aargs["symmetric"]:
            ashift = _shift(aq.qtype.signed, aq.qtype.bits)
            state["input_zero_point"] = (aq.zero - ashift).to(torch.int8).reshape(1)
    return state


def _target(name: str) -> str:
    return f"re:^{name.replace('.', '[.]')}$"


def _schemes(qmodel: nn.Module) -> tuple[dict[str, dict], dict[str, tuple], dict[str, str]]:
    """Config groups (one per distinct scheme, targets by exact name), per-layer data, and
    the layers held under a second name (T5's ``encoder.embed_tokens`` is ``shared``): alias
    -> the first name. An alias is a target of its layer's scheme too, so that the module
    transformers builds under that name is quantized and decompressed as the first."""
    groups: dict[str, dict] = {}
    layers: dict[str, tuple] = {}
    first: dict[int, tuple[str, str]] = {}  # id(module) -> (name, its group key)
    aliases: dict[str, str] = {}
    for name, m in qmodel.named_modules(remove_duplicate=False):
        if not has_integer_weight(m):
            continue
        if id(m) in first:
            seen, key = first[id(m)]
            groups[key]["targets"].append(_target(name))
            aliases[name] = seen
            continue
        wargs, aargs = weight_args(m), act_args(getattr(m, "input_quantizer", None))
        # packed tables leave an Embedding without ``weight``, which transformers' loader
        # initialises; and compressed-tensors 0.20 lays out a packed *zero point* unpacked
        # when transformers builds the empty model, so asymmetric packed weights do not load:
        # both stay ``int-quantized`` (one int8 byte per code, still exact)
        packed = wargs["num_bits"] < 8 and wargs["symmetric"] and not isinstance(m, QuantEmbedding)
        fmt = "pack-quantized" if packed else "int-quantized"
        key = json.dumps([wargs, aargs, fmt], sort_keys=True)
        group = groups.setdefault(
            key,
            {"targets": [], "weights": wargs, "input_activations": aargs, "format": fmt},
        )
        group["targets"].append(_target(name))
        layers[name] = (m, wargs, aargs, fmt)
        first[id(m)] = (name, key)
    named = {f"group_{i}": g for i, g in enumerate(groups.values())}
    return named, layers, aliases


def compressed_state(qmodel: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The folder's tensors and its ``quantization_config``; checks every decompression.

    Raises:
        CompactnnError: :func:`can_export` refuses the model, or compressed-tensors'
            decompressor does not give back compactnn's dequantized weight bit-exactly.
    """
    if (reason := can_export(qmodel)) is not None:
        raise CompactnnError(reason)
    ct = require("compressed_tensors", EXTRA)
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    groups, layers, aliases = _schemes(qmodel)
    schemes = {k: QuantizationScheme(**g) for k, g in groups.items()}
    by_layer = {}
    for key, scheme in schemes.items():
        for t in scheme.targets:
            by_layer[t] = (key, scheme)
    state: dict[str, torch.Tensor] = {}
    quant_prefixes = []
    for name, (m, wargs, aargs, fmt) in layers.items():
        _, scheme = by_layer[_target(name)]
        compressor = BaseCompressor.get_value_from_registry(fmt)
        local = _local_state(m, wargs, aargs)
        packed = compressor.compress(local, scheme)
        back = compressor.decompress(packed, scheme)["weight"]
        if back.dtype != torch.float32 or not torch.equal(back, local["weight"]):
            raise CompactnnError(
                f"{name}: compressed-tensors {ct.__version__} does not decompress to "
                "compactnn's weight bit-exactly; save with compactnn.save."
            )
        state.update({f"{name}.{k}": v.contiguous() for k, v in packed.items()})
        if isinstance(m, QuantLinear) and m.bias is not None:
            state[f"{name}.bias"] = m.bias.detach().float().clone()
        if isinstance(m, QuantEmbedding) and m.embed_scale is not None:
            # Gemma's lookup factor: a non-persistent buffer of the float model, which
            # compressed-tensors turns into a parameter of the quantized table it loads
            state[f"{name}.embed_scale"] = m.embed_scale.detach().float().clone()
        quant_prefixes.append(name + ".")
    tied = _tied_targets(qmodel)
    for alias, name in aliases.items():  # each name is a module on load: its scale, zero
        for key in [k for k in state if k.startswith(name + ".")]:  # point (and codes unless
            new = alias + key[len(name) :]  # from_pretrained ties them to the first's)
            if not (key == name + ".weight" and any(re.search(p, new) for p in tied)):
                state[new] = state[key].clone()
        quant_prefixes.append(alias + ".")
    plain = {
        k: v for k, v in qmodel.state_dict(keep_vars=False).items()
        if not any(k.startswith(p) for p in quant_prefixes)
    }  # fmt: skip
    for key in tied_copies(qmodel, plain):
        del plain[key]
    for key, value in plain.items():
        state[key] = value.detach().clone().contiguous()
    config = QuantizationConfig(
        config_groups=schemes,
        format="mixed-precision"
        if len({g["format"] for g in groups.values()}) > 1
        else next(iter(groups.values()))["format"],
        quantization_status="compressed",
        ignore=[],
    )
    qconfig = config.model_dump(exclude=["quant_method"])
    qconfig = {
        "version": ct.__version__,
        "quant_method": "compressed-tensors",
        "sparsity_config": {},
        "transform_config": {},
        **qconfig,
    }
    return state, json.loads(json.dumps(qconfig, default=str))


def _tied_targets(model: nn.Module) -> set[str]:
    """The patterns of the weights ``from_pretrained`` ties to another (``_tied_weights_keys``)."""
    targets = set()
    for name, sub in model.named_modules():
        tied = getattr(sub, "_tied_weights_keys", None) or ()  # dict (v5) or list (v4)
        targets.update(f"{name}.{k}" if name else k for k in tied)
    return targets


def tied_copies(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """The keys of ``state`` that ``save_pretrained`` leaves out: a tensor held under several
    names (an LM head tied to the token table) is stored once, under the name that
    ``from_pretrained`` ties the others to (not one of the model's ``_tied_weights_keys``).

    Example:
        >>> m = nn.ModuleDict({"emb": nn.Embedding(4, 2), "head": nn.Linear(2, 4, bias=False)})
        >>> m.head.weight = m.emb.weight
        >>> tied_copies(m, m.state_dict())
        ['head.weight']
    """
    targets = _tied_targets(model)
    groups: dict[tuple, list[str]] = {}
    for key, t in state.items():
        if t.device.type != "meta" and t.numel():
            where = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype)
            groups.setdefault((*where, tuple(t.shape), t.stride()), []).append(key)
    out = []
    for names in (g for g in groups.values() if len(g) > 1):
        kept = next((n for n in names if not any(re.search(p, n) for p in targets)), names[0])
        out.extend(n for n in names if n != kept)
    return out


def export(qmodel: nn.Module, out: str | os.PathLike, *, force: bool = False, **opts: Any) -> Path:
    """Write ``qmodel`` as a compressed-tensors Hugging Face folder at ``out``.

    Args:
        qmodel: a compressed Hugging Face model (``compactnn.compress`` or ``compactnn.load``);
            not modified.
        out: the folder: new, empty, or (with ``force``) an earlier compressed-tensors
            export. The export is written into a temporary sibling folder and swapped in
            whole, so a reader never sees a half folder and nothing of the old one is kept.
        force: replace an earlier compressed-tensors export at ``out``. A folder holding
            anything else (a float checkpoint, other files) is refused even with ``force``.
        **opts: ``tokenizer=`` a tokenizer whose ``save_pretrained`` writes its files too.

    Returns:
        The folder. ``AutoModel*.from_pretrained(out)`` loads it with plain ``transformers``
        (compressed-tensors decompresses the weights on the first forward pass).

    Raises:
        CompactnnError: ``out`` may not be written (:func:`check_out`), the model has a layer
            without an exact compressed-tensors form (the message names it and how to save
            instead), the written folder does not load or run as the simulation in plain
            transformers (:func:`verify_folder`; ``out`` is left as it was), or an unknown
            option.
    """
    unknown = set(opts) - {"tokenizer"}
    if unknown:
        raise CompactnnError(
            f"compressed-tensors export: unknown option(s) {sorted(unknown)}; it takes tokenizer=."
        )
    folder = check_out(out, force=force)
    state, qconfig = compressed_state(qmodel)
    tokenizer = opts.get("tokenizer")

    def write(tmp: Path) -> None:
        _write_folder(qmodel, state, qconfig, tmp, tokenizer)
        verify_folder(qmodel, tmp)  # raising here leaves ``out`` as it was

    done = replace_folder(folder, write)
    if tokenizer is None:  # pipeline() and AutoTokenizer need one: say so, not silently
        warnings.warn(
            f"{NO_TOKENIZER} to {done}: pass tokenizer=AutoTokenizer.from_pretrained(FLOAT_DIR) "
            "so that pipeline() and AutoTokenizer find one there.",
            stacklevel=user_stacklevel(),
        )
    return done


_HF_SAVE_OPTIONS = {"safe_serialization", "max_shard_size", "is_main_process", "tokenizer"}


def _save_pretrained(self: nn.Module, save_directory: str | os.PathLike, **kwargs: Any) -> Path:
    """``save_pretrained`` of a compressed model: the compressed-tensors folder, or refusal.

    As in transformers, the files are written into the folder (a tokenizer saved there first
    stays); a folder holding another model's config or weights is refused.
    """
    if kwargs.get("push_to_hub"):
        raise CompactnnError(
            "save_pretrained(push_to_hub=True) is not supported for compactnn models: save the "
            "folder, then upload it with huggingface_hub."
        )
    unknown = set(kwargs) - _HF_SAVE_OPTIONS - {"push_to_hub"}
    if unknown:
        raise CompactnnError(
            f"save_pretrained: option(s) {sorted(unknown)} do not apply to a compressed model; "
            "it takes the folder and tokenizer=."
        )
    reason = can_export(self)
    if reason is not None:
        raise CompactnnError(
            "save_pretrained would write a different, larger model (dequantized weights, no "
            f"activation quantizers), so it refuses: {reason} Save with "
            f"compactnn.save(model, {str(save_directory)!r}) (reloads with compactnn.load)"
            + (
                ""  # GPT-2's Conv1D layers, a ViT's Conv2d: no recipe helps
                if _conv1d_layers(self) or other_layers(self)
                else ", or compress with a recipe compressed-tensors holds exactly "
                "(w4-g128-gptq, w8, w8a8, w8a8-smoothquant)"
            )
            + "."
        )
    folder = Path(save_directory)
    _check_other_model(folder)
    state, qconfig = compressed_state(self)
    _write_folder(self, state, qconfig, folder, kwargs.get("tokenizer"))
    return folder


def install_save_pretrained(qmodel: nn.Module) -> nn.Module:
    """Bind :func:`export` as ``qmodel.save_pretrained`` (Hugging Face models only).

    The bound method writes the compressed-tensors folder when :func:`can_export` allows it
    and otherwise raises ``CompactnnError`` saying how to save; it never writes the
    dequantized float weights. Other models are returned untouched.

    Example:
        >>> qmodel = install_save_pretrained(compactnn.compress(bert, "w8a8", calib))  # doctest: +SKIP
        >>> qmodel.save_pretrained("minilm-w8a8")  # AutoModel.from_pretrained loads it  # doctest: +SKIP
    """  # noqa: E501
    if _is_hf(qmodel) and hasattr(qmodel, "save_pretrained"):
        # an instance attribute: deepcopy rebinds it to the copy, the class is untouched
        qmodel.__dict__["save_pretrained"] = _save_pretrained.__get__(qmodel)
    return qmodel
