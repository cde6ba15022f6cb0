"""Packed artifacts: ``save`` and ``load`` of compressed models.

An artifact is a directory:

* ``model.safetensors``: bit-packed weight codes (``<layer>.weight.packed``), their float16
  scales and integer zero points, activation scales, and every other tensor as stored.
* ``recipe.yaml``: the recipe that produced the model.
* ``compactnn.json``: format version, per-layer format and geometry, the SHA-256 of the
  tensor file. It is written last: a directory without it holds no (complete) artifact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from compactnn.core.modules import set_module
from compactnn.core.packing import pack_codes, unpack_codes
from compactnn.core.qlayers import (
    QuantConv1d,
    QuantConv2d,
    QuantLinear,
    conv_kwargs,
    is_quant_layer,
)
from compactnn.core.spec import QuantSpec
from compactnn.errors import ArtifactError, CompactnnError
from compactnn.export.fs import atomic_write, atomic_write_text, sha256_file
from compactnn.export.sparse import densify, sparsify
from compactnn.prune.geometry import rebuild_resized

FORMAT_VERSION = 1
HEADER = "compactnn.json"
TENSORS = "model.safetensors"
RECIPE = "recipe.yaml"
_QUANT_KEYS = ("weight", "weight_codes", "weight_scale", "weight_zero", "weight_levels")


def info_of(model: nn.Module) -> dict[str, Any]:
    """The compression metadata ``compress`` attaches to a model (empty for a float model)."""
    return getattr(model, "_compactnn", {}) or {}


def _layer_entry(layer: nn.Module) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "kind": type(layer).__name__.removeprefix("Quant"),
        "format": layer.format,
        "shape": list(layer.weight.shape),
        "weight_spec": layer.weight_spec.to_dict(),
        "act_spec": layer.input_quantizer.spec.to_dict() if layer.input_quantizer else None,
        "bias": layer.bias is not None,
    }
    if isinstance(layer, (QuantConv1d, QuantConv2d)):
        kw = conv_kwargs(layer)
        entry["conv"] = {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}
    return entry


def pack_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict]:
    """Tensors to write, per-layer header entries, and aliases of tied tensors."""
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    skip: set[str] = set()
    for name, m in model.named_modules():
        if not is_quant_layer(m):
            continue
        spec = m.weight_spec
        qt = spec.qtype
        layers[name] = _layer_entry(m)
        tensors[f"{name}.weight.packed"] = pack_codes(m.weight_codes, qt)
        tensors[f"{name}.weight.scale"] = m.weight_scale.to(torch.float16)
        if not spec.symmetric:
            tensors[f"{name}.weight.zero"] = m.weight_zero.to(qt.storage_dtype)
        if getattr(m, "weight_levels", None) is not None:  # non-uniform grid (codebook)
            tensors[f"{name}.weight.levels"] = m.weight_levels.to(torch.float16)
        if m.input_quantizer is not None:
            tensors[f"{name}.input.qparams"] = torch.stack(
                [m.input_quantizer.scale, m.input_quantizer.zero]
            ).float()
        skip.update(f"{name}.{k}" for k in _QUANT_KEYS)
        skip.update(f"{name}.input_quantizer.{k}" for k in ("scale", "zero"))
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, t in model.state_dict(keep_vars=False).items():
        if key in skip:
            continue
        ident = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
        if t.numel() and ident in seen:  # tied weights (e.g. lm_head = embeddings)
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.detach().contiguous().clone()
    return tensors, layers, aliases


def artifact_exists(path: str | os.PathLike) -> bool:
    return (Path(path) / HEADER).is_file()


def save(model: nn.Module, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write ``model`` as a packed artifact directory at ``path``.

    Refuses to replace an existing artifact unless ``force``. Every file is written to a
    temporary name and renamed; the header is renamed last, so an interrupted save leaves no
    artifact rather than a broken one.

    Example:
        >>> compactnn.save(qmodel, "out/")  # doctest: +SKIP
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CompactnnError(f"{str(out)!r} exists and is not a directory.")
    if artifact_exists(out):
        if not force:
            raise CompactnnError(
                f"{str(out)!r} already holds a compactnn artifact; pass force=True "
                "(--force on the command line) to replace it."
            )
        (out / HEADER).unlink()  # de-commit the old artifact before touching its files
    out.mkdir(parents=True, exist_ok=True)
    info = info_of(model)
    tensors, layers, aliases = pack_state(model)
    tensors, sparse_index = sparsify(tensors, layers, model)  # pruned zeros stored sparse
    atomic_write(out / TENSORS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    recipe = info.get("recipe")
    if recipe is not None:
        atomic_write_text(out / RECIPE, recipe.to_yaml())
    header = {
        "format": "compactnn",
        "format_version": FORMAT_VERSION,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "recipe": recipe.name if recipe is not None else None,
        "layers": layers,
        "aliases": aliases,
        "folded_bn": list(info.get("folded_bn", [])),
        "float_layers": dict(info.get("float_layers", {})),
        "extra": info.get("extra", {}),
        "sparse": sparse_index,
        "tensors_sha256": sha256_file(out / TENSORS),
        "tensors_bytes": (out / TENSORS).stat().st_size,
    }
    atomic_write_text(out / HEADER, json.dumps(header, indent=1, sort_keys=True))
    return out


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check an artifact's header and tensor file; raise ``ArtifactError`` if bad."""
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError(f"{str(root)!r} is not a directory holding a compactnn artifact.")
    hp = root / HEADER
    if not hp.is_file():
        raise ArtifactError(
            f"{str(root)!r} holds no compactnn artifact ({HEADER} is missing; an interrupted "
            "save leaves none)."
        )
    try:
        header = json.loads(hp.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{hp} is corrupt: {exc}") from exc
    if header.get("format") != "compactnn":
        raise ArtifactError(f"{hp} is not a compactnn header.")
    if header.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{hp} has format version {header.get('format_version')}; this compactnn reads "
            f"version {FORMAT_VERSION}."
        )
    tp = root / TENSORS
    if not tp.is_file():
        raise ArtifactError(f"{tp} is missing.")
    size = tp.stat().st_size
    if size != header.get("tensors_bytes"):
        raise ArtifactError(
            f"{tp} is truncated or replaced: {size} bytes, the header says "
            f"{header.get('tensors_bytes')}."
        )
    if sha256_file(tp) != header.get("tensors_sha256"):
        raise ArtifactError(f"{tp} was modified after saving: its SHA-256 does not match.")
    return header


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


def load(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a compressed model from an artifact; ``model`` is the float skeleton.

    The skeleton is copied, never changed. Outputs are bit-identical to the model that was
    saved.

    Example:
        >>> qmodel = compactnn.load("out/", model=MyNet())  # doctest: +SKIP
    """
    import copy

    from compactnn.recipe import Recipe

    header = read_header(path)
    root = Path(path)
    try:
        tensors = load_file(str(root / TENSORS))
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{root / TENSORS} cannot be read: {exc}") from exc
    tensors = densify(tensors, header.get("sparse", {}), header["layers"])  # sparse -> dense
    if model is None:
        from compactnn.export.hf import skeleton_from_header

        model = skeleton_from_header(root, header)
    else:
        model = copy.deepcopy(model)
    model.eval()
    rebuild_resized(model, header.get("extra", {}).get("resized", {}))  # channel-pruned shapes
    for bn in header["folded_bn"]:
        set_module(model, bn, nn.Identity())
    from compactnn.quant.binary import rebuild_blocks  # binary blocks wrap their layers

    rebuild_blocks(model, header.get("extra", {}))
    try:
        for name, entry in header["layers"].items():
            layer = _build_quant_layer(entry)
            _install_quant_layer(layer, name, tensors)
            set_module(model, name, layer)
        _load_float_state(model, tensors, header)
    except (KeyError, AttributeError, RuntimeError) as exc:
        raise ArtifactError(
            f"artifact {str(root)!r} does not fit the given model skeleton: {exc}"
        ) from exc
    from compactnn.quant.smoothquant import restore_dynamic_act  # per-token act grids

    restore_dynamic_act(model, header.get("extra", {}))
    recipe_path = root / RECIPE
    recipe = Recipe.from_yaml(recipe_path.read_text()) if recipe_path.is_file() else None
    model._compactnn = {
        "recipe": recipe,
        "folded_bn": header["folded_bn"],
        "float_layers": header["float_layers"],
        "extra": header.get("extra", {}),
    }
    return model


def _load_float_state(model: nn.Module, tensors: dict[str, torch.Tensor], header: dict) -> None:
    own = {
        k
        for k in tensors
        if k.rsplit(".", 2)[0] in header["layers"] and (".weight." in k or ".input." in k)
    }
    state = {k: v for k, v in tensors.items() if k not in own}
    for key, target in header.get("aliases", {}).items():
        state[key] = state[target]
    expected = model.state_dict()
    for key, value in state.items():
        if key not in expected:
            mod_name, _, attr = key.rpartition(".")
            mod = model.get_submodule(mod_name)
            if attr == "bias" and getattr(mod, "bias", "absent") is None:
                mod.bias = nn.Parameter(torch.zeros_like(value))  # bias gained by BN folding
            else:
                raise KeyError(f"unexpected tensor {key!r}")
    missing = [k for k in model.state_dict() if k not in state and not _is_quant_key(k, header)]
    if missing:
        raise KeyError(f"tensors missing from the artifact: {missing[:5]}")
    model.load_state_dict({**model.state_dict(), **state}, strict=True)


def _is_quant_key(key: str, header: dict) -> bool:
    mod, _, attr = key.rpartition(".")
    if mod in header["layers"] and attr in _QUANT_KEYS:
        return True
    q_owner = mod.removesuffix(".input_quantizer")
    return q_owner != mod and q_owner in header["layers"]
