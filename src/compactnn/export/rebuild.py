"""Building a compressed model from a validated artifact: the float skeleton reshaped by the
methods' artifact hooks, quantized layers installed from their packed codes, and the float
state loaded. :mod:`compactnn.export.artifact` reads and checks the files first.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compactnn import registry
from compactnn.core.attention import split_attention, unsupported_reason
from compactnn.core.modules import (
    conv1d_to_linear,
    is_hf_conv1d,
    set_module,
    state_with_metadata,
)
from compactnn.core.packing import unpack_codes
from compactnn.core.qembedding import QuantEmbedding, tie_to_table
from compactnn.core.qlayers import QuantConv1d, QuantConv2d, QuantLinear, format_name
from compactnn.core.spec import QuantSpec
from compactnn.errors import ArtifactError
from compactnn.export import validate
from compactnn.export.sparse import densify

# the state-dict keys of a quantized layer that the packed codes stand for
QUANT_KEYS = (
    "weight",
    "weight_codes",
    "weight_scale",
    "weight_zero",
    "weight_levels",
    "weight_basis",
)
# header ``extra`` keys (checked here, as every byte of the header is untrusted)
CONV1D_KEY = "conv1d_as_linear"  # GPT-2 Conv1D modules the compressed model holds as Linear
SPLIT_KEY = "split_attention"  # nn.MultiheadAttention held as SplitMultiheadAttention
EMBEDDINGS_KEY = "quant_embeddings"  # table name -> {format, shape, weight_spec}
TIED_KEY = "tied_heads"  # head name -> {table, act_spec, bias}: reads the table's codes
# other name -> name of a quantized table or layer the model holds under several names (T5's
# ``encoder.embed_tokens`` and ``decoder.embed_tokens`` are ``shared``): stored once
SHARED_KEY = "shared_modules"
NOTES_KEY = "notes"  # the compress run's notes (info_of(q)["notes"]): a list of strings


def header_notes(extra: dict) -> list[str]:
    """The notes a header's ``extra`` holds (``[]`` in artifacts saved without them)."""
    notes = extra.get(NOTES_KEY, [])
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise validate.bad(f"extra[{NOTES_KEY!r}]", "must list strings")
    return list(notes)


def _submodule(model: nn.Module, name: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise ArtifactError(
            f"the artifact's {what} {name!r} is not a module of the skeleton: pass the float "
            "model the artifact was made from."
        ) from exc


def build_model(model: nn.Module, header: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Validate against the skeleton, then install the quantized layers and float state."""
    extra, layers = header["extra"], header["layers"]
    _linearize_conv1d(model, extra.get(CONV1D_KEY, []))
    _split_attention(model, extra.get(SPLIT_KEY, []))
    registry.run_artifact_hooks("resize", model, extra)  # e.g. channel-pruned shapes
    for bn in header["folded_bn"]:
        _submodule(model, bn, "folded batch norm")
        set_module(model, bn, nn.Identity())
    registry.run_artifact_hooks("before_layers", model, extra)  # e.g. binary blocks
    specs: dict[str, tuple[torch.dtype, tuple]] = {}
    tensors = dict(tensors)
    for name, entry in layers.items():
        validate.check_fits_skeleton(name, entry, _submodule(model, name, "layer"))
        specs.update(validate.layer_tensor_specs(name, entry))
        specs.update(validate.optional_tensor_specs(name, entry, tensors))
        validate.fill_codebook_defaults(name, entry, tensors)  # scale/zero a codebook omits
    tables = _check_tables(model, extra.get(EMBEDDINGS_KEY, {}))
    heads = _check_heads(model, extra.get(TIED_KEY, {}), tables)
    shared = _check_shared(model, extra.get(SHARED_KEY, {}), {**layers, **tables}, heads)
    for name, entry in tables.items():
        specs.update(validate.layer_tensor_specs(name, entry))
    for name, entry in heads.items():  # a tied head stores only its input grid
        if entry["act_spec"] is not None:
            specs[f"{name}.input.qparams"] = (torch.float32, (2,))
    for key, (dtype, shape) in specs.items():
        if key not in header["sparse"]:
            validate.check_tensor_meta(key, _need(tensors, key), dtype, shape)
    reference = {k: torch.empty(s, dtype=d, device="meta") for k, (d, s) in specs.items()}
    reference = {**model.state_dict(), **reference}  # what each sparse tensor must become
    tensors = densify(tensors, header["sparse"], layers, reference)  # sparse -> dense
    for name, entry in layers.items():
        key = f"{name}.weight.packed"
        validate.check_tensor_meta(key, _need(tensors, key), *specs[key])
        validate.check_layer_values(name, entry, tensors)
        layer = _build_quant_layer(entry)
        _install_quant_layer(layer, name, tensors)
        set_module(model, name, layer)
    for name, entry in tables.items():
        validate.check_layer_values(name, entry, tensors)
        spec = QuantSpec.from_dict(entry["weight_spec"])
        table = QuantEmbedding.like(model.get_submodule(name), spec)
        _install_quant_layer(table, name, tensors)
        set_module(model, name, table)
    for name, entry in heads.items():
        table_keys = {f"{name}.weight.{k}": f"{entry['table']}.weight.{k}" for k in ("scale",)}
        view = {k: tensors[v] for k, v in table_keys.items()}
        view.update({k: v for k, v in tensors.items() if k == f"{name}.input.qparams"})
        validate.check_layer_values(name, entry, view)
        aspec = QuantSpec.from_dict(entry["act_spec"]) if entry["act_spec"] else None
        head = tie_to_table(model.get_submodule(name), model.get_submodule(entry["table"]), aspec)
        if head.input_quantizer is not None:
            s, z = tensors[f"{name}.input.qparams"]
            head.input_quantizer.set_qparams(s, z)
        set_module(model, name, head)
    for name, owner in shared.items():  # one module under both names, as when saved
        set_module(model, name, model.get_submodule(owner))
    quant_names = {*layers, *tables, *heads, *shared}
    state = {k: v for k, v in tensors.items() if k not in specs}
    _load_float_state(model, state, header, quant_names)
    registry.run_artifact_hooks("after_layers", model, extra)  # e.g. per-token act grids


def _need(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in tensors:
        raise ArtifactError(f"tensor {key!r} is missing from the artifact; re-save it.")
    return tensors[key]


def _build_quant_layer(entry: dict[str, Any]) -> nn.Module:
    wspec = QuantSpec.from_dict(entry["weight_spec"])
    aspec = QuantSpec.from_dict(entry["act_spec"]) if entry["act_spec"] else None
    kind = entry["kind"]
    if kind == "Linear":
        out_f, in_f = entry["shape"]
        return QuantLinear(in_f, out_f, entry["bias"], wspec, aspec)
    conv = dict(entry["conv"])
    for k in ("kernel_size", "stride", "dilation"):
        conv[k] = tuple(conv[k])
    if not isinstance(conv["padding"], str):
        conv["padding"] = tuple(conv["padding"])
    cls = QuantConv2d if kind == "Conv2d" else QuantConv1d
    return cls(conv, wspec, aspec)


def _linearize_conv1d(model: nn.Module, names: Any) -> None:
    """Turn the skeleton's GPT-2 ``Conv1D`` modules that were saved as Linear into Linear."""
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise validate.bad(f"extra[{CONV1D_KEY!r}]", "must list module names")
    for name in names:
        if not is_hf_conv1d(_submodule(model, name, "Conv1D module")):
            raise ArtifactError(
                f"the artifact's Conv1D module {name!r} is not a GPT-2 Conv1D in the skeleton: "
                "pass the float model the artifact was made from."
            )
    conv1d_to_linear(model, names)


def _split_attention(model: nn.Module, names: Any) -> None:
    """Split the skeleton's ``nn.MultiheadAttention`` modules that were saved split."""
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise validate.bad(f"extra[{SPLIT_KEY!r}]", "must list module names")
    if len(set(names)) != len(names):
        raise validate.bad(f"extra[{SPLIT_KEY!r}]", "names a module twice")
    for name in names:
        m = _submodule(model, name, "split attention")
        if not isinstance(m, nn.MultiheadAttention) or unsupported_reason(m) is not None:
            raise ArtifactError(
                f"the artifact's split attention {name!r} is not a plain nn.MultiheadAttention "
                "in the skeleton: pass the float model the artifact was made from."
            )
    split_attention(model, names)


def _check_tables(model: nn.Module, tables: Any) -> dict[str, dict[str, Any]]:
    """Quantized embedding entries: exact keys, a valid spec and format, the skeleton's
    ``nn.Embedding`` shape. Returned as layer-like entries (no input grid, no bias)."""
    if not isinstance(tables, dict):
        raise validate.bad(f"extra[{EMBEDDINGS_KEY!r}]", "must be an object")
    out = {}
    for name, entry in tables.items():
        where = f"extra[{EMBEDDINGS_KEY!r}][{name!r}]"
        if not isinstance(entry, dict) or set(entry) != {"format", "shape", "weight_spec"}:
            raise validate.bad(where, "must hold exactly ['format', 'shape', 'weight_spec']")
        spec = validate.check_spec(entry["weight_spec"], f"{where}.weight_spec", weight=True)
        if entry["format"] != format_name(spec):
            raise validate.bad(f"{where}.format", f"is {entry['format']!r:.40}, not the spec's")
        module = _submodule(model, name, "embedding")
        if not isinstance(module, nn.Embedding) or list(module.weight.shape) != entry["shape"]:
            raise ArtifactError(
                f"{where} is a {entry['shape']!r:.40} embedding table but the skeleton's "
                f"{name!r} is a {type(module).__name__}: pass the float model it was made from."
            )
        g = spec.group_size or 1
        if spec.granularity == "group" and entry["shape"][1] % g:
            raise validate.bad(f"{where}.weight_spec.group_size", "does not divide the dim")
        out[name] = {**entry, "act_spec": None, "bias": False}
    return out


def _check_heads(model: nn.Module, heads: Any, tables: dict) -> dict[str, dict[str, Any]]:
    """Tied-head entries: a skeleton Linear of its table's shape, reading the table's codes."""
    if not isinstance(heads, dict):
        raise validate.bad(f"extra[{TIED_KEY!r}]", "must be an object")
    out = {}
    for name, entry in heads.items():
        where = f"extra[{TIED_KEY!r}][{name!r}]"
        if not isinstance(entry, dict) or set(entry) != {"table", "act_spec", "bias"}:
            raise validate.bad(where, "must hold exactly ['act_spec', 'bias', 'table']")
        table = tables.get(entry["table"]) if isinstance(entry["table"], str) else None
        if table is None or name in tables:
            raise validate.bad(f"{where}.table", "names no quantized embedding table")
        if entry["act_spec"] is not None:
            validate.check_spec(entry["act_spec"], f"{where}.act_spec", weight=False)
        module = _submodule(model, name, "tied head")
        if (
            not isinstance(module, nn.Linear)
            or list(module.weight.shape) != table["shape"]
            or entry["bias"] is not (module.bias is not None)
        ):
            raise ArtifactError(
                f"{where} reads a {table['shape']} table but the skeleton's {name!r} is not a "
                "Linear of that shape: pass the float model the artifact was made from."
            )
        # its tensors: only the input grid (codes, scale and zero are the table's)
        out[name] = {**table, "act_spec": entry["act_spec"], "table": entry["table"]}
    return out


def _check_shared(model: nn.Module, shared: Any, owners: dict, heads: dict) -> dict[str, str]:
    """Other names of stored tables and layers: each a skeleton module of its owner's kind
    and shape, and no stored module itself."""
    if not isinstance(shared, dict):
        raise validate.bad(f"extra[{SHARED_KEY!r}]", "must be an object")
    for name, owner in shared.items():
        where = f"extra[{SHARED_KEY!r}][{name!r}]"
        if not isinstance(owner, str) or owner not in owners or name in owners or name in heads:
            raise validate.bad(where, "must name a stored quantized table or layer")
        entry, module = owners[owner], _submodule(model, name, "shared module")
        kind = validate.KINDS.get(entry.get("kind"), nn.Embedding)
        if not isinstance(module, kind) or list(module.weight.shape) != entry["shape"]:
            raise ArtifactError(
                f"{where}: the skeleton's {name!r} is not a {kind.__name__} of shape "
                f"{entry['shape']}: pass the float model the artifact was made from."
            )
    return dict(shared)


def _install_quant_layer(layer: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
    spec = layer.weight_spec
    qt = spec.qtype
    codes = unpack_codes(tensors[f"{name}.weight.packed"], qt, tuple(layer.weight.shape))
    scale = tensors[f"{name}.weight.scale"].float()
    zero = tensors.get(f"{name}.weight.zero")
    zero = torch.zeros_like(scale) if zero is None else zero.float()
    levels = tensors.get(f"{name}.weight.levels")
    basis = tensors.get(f"{name}.weight.basis")
    if basis is not None:  # levels recomputed from the coefficients, as when saved
        layer.set_codebook(None, basis=basis.float())
    elif levels is not None:
        layer.set_codebook(levels.float())
    layer.set_quantized_weight(codes, scale, zero)
    if getattr(layer, "input_quantizer", None) is not None:  # an embedding has no input
        s, z = tensors[f"{name}.input.qparams"]
        layer.input_quantizer.set_qparams(s, z)
        act_levels = tensors.get(f"{name}.input.levels")
        if act_levels is not None:
            layer.input_quantizer.set_levels(act_levels.float())


def _load_float_state(
    model: nn.Module, state: dict[str, torch.Tensor], header: dict, quant_names: set[str]
) -> None:
    """Every stored float tensor must be a skeleton tensor of the same dtype and shape; they
    are loaded with the skeleton's ``_metadata`` (module versions; an artifact stores none)."""
    expected = model.state_dict()
    for key, target in header["aliases"].items():
        if target not in state or key not in expected:
            raise ArtifactError(f"alias {key!r} -> {target!r} names no stored tensor.")
        state[key] = state[target]
    for key, value in state.items():
        ref = expected.get(key)
        if ref is None:
            mod_name, _, attr = key.rpartition(".")
            try:
                mod = model.get_submodule(mod_name)
            except AttributeError:
                mod = None
            weight = getattr(mod, "weight", None)
            if attr != "bias" or getattr(mod, "bias", "absent") is not None or weight is None:
                raise ArtifactError(f"tensor {key!r} of the artifact is not in the skeleton.")
            ref = torch.empty(weight.shape[:1], dtype=weight.dtype)
            mod.bias = nn.Parameter(torch.zeros_like(value))  # bias gained by BN folding
        validate.check_tensor_meta(key, value, ref.dtype, tuple(ref.shape))
    missing = [
        k for k in model.state_dict() if k not in state and not _is_quant_key(k, quant_names)
    ]
    if missing:
        raise ArtifactError(f"tensors missing from the artifact: {missing[:5]}; re-save it.")
    # the skeleton's module versions: some modules' loading reads them (MNASNet)
    model.load_state_dict(state_with_metadata(model, {**model.state_dict(), **state}), strict=True)


def _is_quant_key(key: str, quant_names: set[str]) -> bool:
    mod, _, attr = key.rpartition(".")
    if mod in quant_names and attr in QUANT_KEYS:
        return True
    q_owner = mod.removesuffix(".input_quantizer")
    return q_owner != mod and q_owner in quant_names
