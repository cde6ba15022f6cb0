"""Cost model: the exact bytes of each layer at each format, and its bit-operations.

Bytes follow the artifact's packing rules (:func:`compactnn.export.size.theoretical_size`):
packed codes ``ceil(numel * bits / 8)``, one float16 scale per group, one byte of zero point
per group of an asymmetric grid, 8 bytes of activation grid (none for ``a<A>g``: made at run
time), and the layer's bias in float32, the bias batch-norm folding gives a bias-free
``conv -> bn`` included (:func:`biased_layers`). A training-aware format is priced from its
weight quantizer's export, as save stores it (:func:`export_bytes`: a codebook's float16
levels or binary basis in place of scales and zero points).
Bit-operations are ``MACs * weight_bits * act_bits`` (32 for float activations), HAWQ-V3's
BOPs, with the MACs counted on one calibration batch. A ``ch<P>+`` format prices the layer's
kept rows only (the inputs it removes from the next layer are not credited: a proxy).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from compactnn.core.fold import find_conv_bn_pairs
from compactnn.core.packing import packed_nbytes
from compactnn.mixed_precision.formats import Format
from compactnn.prune.stats import layer_macs
from compactnn.registry import method_for_config


def biased_layers(model: nn.Module, names: list[str]) -> set[str]:
    """Which of the layers ``names`` have a bias in an artifact: their own, or the one
    batch-norm folding creates (a ``conv -> bn`` pair gets ``out_channels`` bias floats even
    when the conv had none; :func:`compactnn.core.fold.find_conv_bn_pairs`, as compress folds).

    Example:
        >>> m = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Linear(2, 2))
        >>> sorted(biased_layers(m, ["0", "2"]))
        ['0', '2']
    """
    folded = {conv for conv, _ in find_conv_bn_pairs(model)}
    own = {
        n for n in names if isinstance(getattr(model.get_submodule(n), "bias", None), torch.Tensor)
    }
    return own | (folded & set(names))


def layer_bytes(layer: nn.Module, fmt: Format, bias: bool | None = None) -> int:
    """Bytes ``layer`` takes in an artifact at ``fmt`` (codes, scales, zeros, codebook, act
    grid, bias).

    A training-aware format (a weight quantizer with an ``export``: ``w2-sketch``,
    ``w1a8-subbit``, ``w2a8-ttq`` ...) is priced from that export, as the artifact stores it
    (:func:`export_bytes`: a codebook's float16 levels or basis instead of scales); every
    other format by its uniform grid (:func:`grid_bytes`).
    ``bias``: whether the layer has a bias in the artifact (True for a conv whose batch norm
    ``fmt`` folds into it); None: whether it has one now.

    Example:
        >>> layer_bytes(nn.Linear(64, 8), Format.parse("w4-g32"))  # 256 + 32 + 16 + 32
        336
        >>> layer_bytes(nn.Linear(64, 8), Format.parse("w2-sketch"))  # 128 + 8 * 2 * 2 + 32
        192
    """
    rows = fmt.kept_rows(layer.weight.shape[0])  # a ch<P>+ format keeps fewer rows
    total = export_bytes(layer, fmt)
    if total is None:
        total = grid_bytes(layer, fmt)
    if bias is None:
        bias = isinstance(getattr(layer, "bias", None), torch.Tensor)
    if bias:
        total += rows * 4  # float32, kept rows only
    return total


def grid_bytes(layer: nn.Module, fmt: Format) -> int:
    """Bytes of ``layer``'s weight on ``fmt``'s uniform grid, bias left out: packed codes,
    float16 scales, integer zero points (asymmetric) and the 8-byte input grid (none for
    ``a<A>g``: made at run time)."""
    w = layer.weight
    rows, k = fmt.kept_rows(w.shape[0]), w[0].numel()
    spec = fmt.weight
    groups = {"tensor": 1, "channel": rows}.get(spec.granularity)
    if groups is None:  # per group of group_size inputs
        groups = rows * (k // spec.group_size)
    total = packed_nbytes(rows * k, spec.bits) + 2 * groups
    if not spec.symmetric:
        total += groups
    if fmt.act is not None and fmt.act.granularity != "group":  # a8g: grids made at run time
        total += 8
    return total


_EXPORTED: dict[tuple, int | None] = {}  # (format, layer type, weight shape) -> bytes


def export_bytes(layer: nn.Module, fmt: Format) -> int | None:
    """Bytes of ``layer``'s weight and input grid as a training-aware method stores them,
    bias left out: its weight quantizer's ``export`` (the tensors
    :func:`compactnn.export.artifact.pack_state` writes: packed codes, then a codebook's
    float16 ``levels`` or ``basis``, else float16 scales, and zero points where stored) plus
    the input grid (8 bytes, and float16 levels for a non-uniform one). None for a method
    without such a quantizer (a uniform grid: :func:`grid_bytes`) or one that builds its own
    module. Cached per format and weight shape (the sizes do not depend on the values)."""
    handler = method_for_config(fmt.config).handler
    hook = getattr(handler, "weight_quantizer", None)
    if hook is None:
        return None
    rows = fmt.kept_rows(layer.weight.shape[0])
    key = (fmt.name, type(layer).__name__, rows, tuple(layer.weight.shape[1:]))
    if key not in _EXPORTED:
        _EXPORTED[key] = _export_bytes(layer, fmt, handler, rows)
    return _EXPORTED[key]


def _export_bytes(layer: nn.Module, fmt: Format, handler, rows: int) -> int | None:
    shared = {id(t): t for t in (*layer.parameters(), *layer.buffers())}  # not copied twice
    probe = copy.deepcopy(layer, shared)  # its own weight: the quantizer may keep a reference
    probe.weight = nn.Parameter(layer.weight.detach()[:rows].clone(), requires_grad=False)
    try:
        with torch.no_grad():
            wq = handler.weight_quantizer(probe, fmt.weight, fmt.config)
            if getattr(wq, "wrapper", None) is not None:  # its own frozen module (BAP)
                return None
            exp = wq.export(probe.weight)
            aq = None
            if fmt.act is not None:
                aq = handler.act_quantizer(probe, fmt.act, fmt.config)
    except Exception:  # a layer the method refuses: priced by its grid
        return None
    spec = exp.spec
    total = packed_nbytes(exp.codes.numel(), spec.bits)
    if exp.levels is None:
        total += 2 * exp.scale.numel()
    else:
        total += 2 * (exp.basis if exp.basis is not None else exp.levels).numel()
    if not spec.symmetric and (exp.levels is None or bool(exp.zero.any())):
        total += exp.zero.numel() * torch.empty((), dtype=spec.qtype.storage_dtype).element_size()
    if fmt.act is not None and fmt.act.granularity != "group":
        total += 8
        if hasattr(aq, "export_levels"):  # a non-uniform input grid (LQ-Nets)
            total += 2 * fmt.act.qtype.levels
    return total


def count_macs(model: nn.Module, layers: dict[str, nn.Module], run) -> dict[str, int]:
    """Multiply-accumulates per sample of each layer, counted on one forward pass ``run()``
    (:func:`compactnn.prune.stats.layer_macs`, the count the pruning report uses)."""
    return layer_macs(model, layers, run)


def cost_tables(
    layers: dict[str, nn.Module],
    formats: list[Format],
    macs: dict[str, int] | None = None,
    biased: set[str] | None = None,
) -> dict[str, np.ndarray]:
    """Cost arrays ``(L, F)``: ``bytes``, ``code_bits`` (numel * bits) and ``bops``.

    ``biased`` names the layers that have a bias in the artifact (:func:`biased_layers`:
    batch-norm folding adds one); None counts only the biases the layers have now.

    Example:
        >>> t = cost_tables({"fc": nn.Linear(64, 8)}, [Format.parse("w2a8"), Format.parse("w4a8")])
        >>> t["code_bits"].tolist()
        [[1024.0, 2048.0]]
    """
    names = list(layers)
    shape = (len(names), len(formats))
    tables = {k: np.zeros(shape) for k in ("bytes", "code_bits", "bops")}
    for i, n in enumerate(names):
        rows = layers[n].weight.shape[0]
        numel = layers[n].weight.numel()
        for j, f in enumerate(formats):
            kept = f.kept_rows(rows) / rows  # own rows only: the next layer's inputs not counted
            bias = None if biased is None else _has_bias(layers[n], n in biased, f)
            tables["bytes"][i, j] = layer_bytes(layers[n], f, bias)
            tables["code_bits"][i, j] = numel * kept * f.weight.bits
            abits = f.act.bits if f.act is not None else 32
            tables["bops"][i, j] = (macs or {}).get(n, 0) * kept * f.weight.bits * abits
    return tables


def _has_bias(layer: nn.Module, folds: bool, fmt: Format) -> bool:
    """A bias of its own, or one from folding when ``fmt``'s step folds batch norms."""
    own = isinstance(getattr(layer, "bias", None), torch.Tensor)
    return own or (folds and getattr(fmt.config, "fold_bn", True))
