"""Cost model: the exact bytes of each layer at each format, and its bit-operations.

Bytes follow the artifact's packing rules (:func:`compactnn.export.size.theoretical_size`):
packed codes ``ceil(numel * bits / 8)``, one float16 scale per group, one byte of zero point
per group of an asymmetric grid, 8 bytes of activation grid (none for ``a<A>g``: made at run
time), and the layer's bias in float32, the bias batch-norm folding gives a bias-free
``conv -> bn`` included (:func:`biased_layers`).
Bit-operations are ``MACs * weight_bits * act_bits`` (32 for float activations), HAWQ-V3's
BOPs, with the MACs counted on one calibration batch. A ``ch<P>+`` format prices the layer's
kept rows only (the inputs it removes from the next layer are not credited: a proxy).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from compactnn.core.fold import find_conv_bn_pairs
from compactnn.core.packing import packed_nbytes
from compactnn.mixed_precision.formats import Format
from compactnn.prune.stats import layer_macs


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
    """Bytes ``layer`` takes in an artifact at ``fmt`` (codes, scales, zeros, act grid, bias).

    ``bias``: whether the layer has a bias in the artifact (True for a conv whose batch norm
    ``fmt`` folds into it); None: whether it has one now.

    Example:
        >>> layer_bytes(nn.Linear(64, 8), Format.parse("w4-g32"))  # 256 + 32 + 16 + 32
        336
    """
    w = layer.weight
    rows, k = fmt.kept_rows(w.shape[0]), w[0].numel()  # a ch<P>+ format keeps fewer rows
    spec = fmt.weight
    groups = {"tensor": 1, "channel": rows}.get(spec.granularity)
    if groups is None:  # per group of group_size inputs
        groups = rows * (k // spec.group_size)
    total = packed_nbytes(rows * k, spec.bits) + 2 * groups
    if not spec.symmetric:
        total += groups
    if fmt.act is not None and fmt.act.granularity != "group":  # a8g: grids made at run time
        total += 8
    if bias is None:
        bias = isinstance(getattr(layer, "bias", None), torch.Tensor)
    if bias:
        total += rows * 4  # float32, kept rows only
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
