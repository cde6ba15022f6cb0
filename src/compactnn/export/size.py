"""Sizes: the bytes a recipe implies, and the bytes an artifact really takes on disk."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from compactnn.export.artifact import pack_state, parse_tensors, read_artifact


def theoretical_size(model: nn.Module) -> int:
    """Bytes implied by the recipe: what the artifact stores before any sparse encoding:
    packed codes (params x bits / 8), float16 scales (uniform grids), integer zero points
    (asymmetric grids), float16 codebooks (``2**bits`` levels, or ``bits`` binary-basis
    coefficients, per group), activation grids, and every tensor the recipe keeps in float
    at its own width. Excludes file-format headers."""
    tensors, _, _ = pack_state(model)
    return sum(t.numel() * t.element_size() for t in tensors.values())


# header ``extra`` keys of methods whose layers are stored outside ``layers`` (the method
# files own them; export/ reads only the names, never imports a method)
_FFN_KEY = "ffn_ranks"  # quant/ffn.py: layer -> rank; stored as quantized ``{layer}.0/.1``
_SUBBIT_KEY = "subbit_layers"  # quant/subbit.py: ``{layer}.patterns/.indices/.alpha``
_EMBEDDINGS_KEY = "quant_embeddings"  # export/rebuild.py: quantized embedding tables
_PRUNING_KEY = "pruning"  # prune/stats.py: method -> {layer: sparsity, ...} of pruned layers
_BAP_KEY = (
    "bap_layers"  # quant/bap.py: ``{layer}.binary`` + ``{layer}.sparse_values`` or ``.sparse``
)


def _nbytes(tensors: dict[str, torch.Tensor], keys: list[str]) -> int:
    return sum(tensors[k].numel() * tensors[k].element_size() for k in keys)


def _weight_keys(tensors: dict[str, torch.Tensor], name: str) -> list[str]:
    """Every stored tensor of a quantized weight: ``{name}.weight.*`` (codes or their sparse
    encoding, scales, zero points, levels, basis)."""
    return [k for k in tensors if k.startswith(f"{name}.weight.")]


def _pruned(extra: dict) -> set[str]:
    """Layers a pruning step zeroed: those with a sparsity in ``extra["pruning"]``."""
    records = extra.get(_PRUNING_KEY)
    stats = records.values() if isinstance(records, dict) else ()
    return {
        name
        for layers in stats
        if isinstance(layers, dict)
        for name, value in layers.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def stored_units(header: dict, tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """``{layer: (weights, stored bytes)}`` of every compressed weight of an artifact.

    A quantized layer or embedding table counts its ``weight.*`` tensors (codes or their
    sparse encoding, scales, zero points, codebook levels or basis); an FFN layer both its
    factors over the original layer's weights; a sub-bit layer its patterns, indices and
    alpha; a binary augmented pruning layer its binary branch plus its sparse branch (the
    float16 ``sparse_values`` or the int8 twin ``.sparse``, each stored sparse) over the
    layer's weights, counted once; a float weight that a pruning step of the recipe zeroed,
    stored sparse, its index and values. Every other float weight is left out, even one
    stored sparse (a token table whose only zeros are its padding row is still a float32
    table), and so are biases and activation grids, which are not weights.
    """
    extra, layers = header["extra"], header["layers"]
    units: dict[str, tuple[int, int]] = {}
    tables = extra.get(_EMBEDDINGS_KEY, {})
    for name, entry in {**layers, **tables}.items():
        units[name] = (math.prod(entry["shape"]), _nbytes(tensors, _weight_keys(tensors, name)))
    for name in extra.get(_FFN_KEY, {}):
        v, u = units.pop(f"{name}.0", None), units.pop(f"{name}.1", None)
        if v is None or u is None:
            continue
        shape_v, shape_u = layers[f"{name}.0"]["shape"], layers[f"{name}.1"]["shape"]
        units[name] = (shape_u[0] * math.prod(shape_v[1:]), v[1] + u[1])
    for name, entry in extra.get(_SUBBIT_KEY, {}).items():
        keys = [f"{name}.{k}" for k in ("patterns", "indices", "alpha")]
        if not all(k in tensors for k in keys) or not isinstance(entry.get("tau"), int):
            continue
        out = tensors[keys[2]].numel()
        kernels = tensors[keys[1]].numel() * 8 // entry["tau"]  # exact when out * tau >= 8
        units[name] = ((kernels - kernels % out) * 9, _nbytes(tensors, keys))
    for name in extra.get(_BAP_KEY, {}):
        binary = units.pop(f"{name}.binary", None)
        if binary is None:
            continue
        twin = units.pop(f"{name}.sparse", (0, 0))  # int8 values: same weights, not new ones
        branch = f"{name}.sparse_values"  # float16 values: dense, or sparse-encoded
        keys = [k for k in tensors if k == branch or k.startswith(f"{branch}.")]
        units[name] = (binary[0], binary[1] + twin[1] + _nbytes(tensors, keys))
    pruned = _pruned(extra)
    for key, entry in header["sparse"].items():
        name = key.removesuffix(".weight")
        float_weight = entry.get("kind") == "float" and key.endswith(".weight")
        if float_weight and name in pruned and name not in units:
            keys = [f"{key}.sparse_index", f"{key}.sparse_values"]
            units[name] = (int(entry["numel"]), _nbytes(tensors, keys))
    return units


def stored_bits(path: str | os.PathLike) -> dict[str, float]:
    """Bits per weight as stored in an artifact: per compressed layer, and ``"total"``.

    Reads the verified artifact (:func:`compactnn.export.artifact.read_artifact`) and divides
    the bits of every stored tensor of a compressed weight by its number of weights (see
    :func:`stored_units`); ``"total"`` is over all of them, the weights kept in float left
    out. Empty for a float artifact.

    Example:
        >>> stored_bits("out/cnn-w2-sketch")["total"]  # doctest: +SKIP
        2.31
    """
    header, blobs = read_artifact(path)
    tensors = parse_tensors(blobs["tensors"], Path(path))
    units = stored_units(header, tensors)
    out = {name: 8 * b / n for name, (n, b) in units.items() if n}
    weights = sum(n for n, _ in units.values())
    if weights:
        out["total"] = 8 * sum(b for _, b in units.values()) / weights
    return out


def float_size(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers at their stored width (tied counted once)."""
    seen = set()
    total = 0
    for t in list(model.state_dict().values()):
        if t.data_ptr() in seen and t.numel():
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def artifact_size(path: str | os.PathLike) -> int:
    """Bytes on disk of every file in an artifact directory (``os.stat``)."""
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())
