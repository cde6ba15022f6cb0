"""Building a compressed model from a validated artifact: the float skeleton reshaped by the
methods' artifact hooks, quantized layers installed from their packed codes, and the float
state loaded. :mod:`compactnn.export.artifact` reads and checks the files first.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compactnn import registry
from compactnn.core.modules import set_module
from compactnn.core.packing import unpack_codes
from compactnn.core.qlayers import QuantConv1d, QuantConv2d, QuantLinear
from compactnn.core.spec import QuantSpec
from compactnn.errors import ArtifactError
from compactnn.export import validate
from compactnn.export.sparse import densify

# the state-dict keys of a quantized layer that the packed codes stand for
QUANT_KEYS = ("weight", "weight_codes", "weight_scale", "weight_zero", "weight_levels")


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
    registry.run_artifact_hooks("resize", model, extra)  # e.g. channel-pruned shapes
    for bn in header["folded_bn"]:
        _submodule(model, bn, "folded batch norm")
        set_module(model, bn, nn.Identity())
    registry.run_artifact_hooks("before_layers", model, extra)  # e.g. binary blocks
    specs: dict[str, tuple[torch.dtype, tuple]] = {}
    for name, entry in layers.items():
        validate.check_fits_skeleton(name, entry, _submodule(model, name, "layer"))
        specs.update(validate.layer_tensor_specs(name, entry))
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
    _load_float_state(model, {k: v for k, v in tensors.items() if k not in specs}, header)
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


def _install_quant_layer(layer: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> None:
    spec = layer.weight_spec
    qt = spec.qtype
    codes = unpack_codes(tensors[f"{name}.weight.packed"], qt, tuple(layer.weight.shape))
    scale = tensors[f"{name}.weight.scale"].float()
    zero = tensors.get(f"{name}.weight.zero")
    zero = torch.zeros_like(scale) if zero is None else zero.float()
    levels = tensors.get(f"{name}.weight.levels")
    if levels is not None:
        layer.set_codebook(levels.float())
    layer.set_quantized_weight(codes, scale, zero)
    if layer.input_quantizer is not None:
        s, z = tensors[f"{name}.input.qparams"]
        layer.input_quantizer.set_qparams(s, z)


def _load_float_state(model: nn.Module, state: dict[str, torch.Tensor], header: dict) -> None:
    """Every stored float tensor must be a skeleton tensor of the same dtype and shape."""
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
    missing = [k for k in model.state_dict() if k not in state and not _is_quant_key(k, header)]
    if missing:
        raise ArtifactError(f"tensors missing from the artifact: {missing[:5]}; re-save it.")
    model.load_state_dict({**model.state_dict(), **state}, strict=True)


def _is_quant_key(key: str, header: dict) -> bool:
    mod, _, attr = key.rpartition(".")
    if mod in header["layers"] and attr in QUANT_KEYS:
        return True
    q_owner = mod.removesuffix(".input_quantizer")
    return q_owner != mod and q_owner in header["layers"]
