"""What ``compactnn compress`` prints about a compressed model: each layer once (quantized,
pruned, kept in float, with the reason), the pruning's parameter and MAC counts, what
Probe Pruning skips per batch, and the methods' notes."""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

import torch

from compactnn.core.calib import batch_size_of, call_model
from compactnn.float_layers import PROBE_PROJECTIONS, probe_pruned_layers
from compactnn.prune.probe import EXTRA_KEY as PROBE_KEY
from compactnn.prune.probe import ProbePruneConfig, probe_flops_fraction
from compactnn.prune.stats import count_params, layer_macs


def human_count(n: float) -> str:
    """``1234567`` -> ``"1.2M"``."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def pruning_lines(pruning: dict) -> list[str]:
    """One line per pruning step that recorded its counts (``prune/stats.py``).

    Example:
        >>> counts = {"before": 1_200_000, "after": 800_000}
        >>> stats = {"params": counts, "nonzero": counts, "macs": counts}
        >>> pruning_lines({"channel": stats})[0].endswith("800.0k (whole first calibration batch)")
        True
    """
    lines = []
    for method, stats in pruning.items():
        if not isinstance(stats, dict) or not isinstance(stats.get("params"), dict):
            continue  # no calibration batch: nothing counted
        p, nz, macs = stats["params"], stats["nonzero"], stats["macs"]
        line = f"  pruning ({method}): params {human_count(p['before'])} -> "
        line += human_count(p["after"])
        if nz["after"] != p["after"]:  # unstructured: same tensors, fewer non-zeros
            line += f" ({human_count(nz['after'])} non-zero)"
        line += f", MACs {human_count(macs['before'])} -> {human_count(macs['after'])}"
        line += " (whole first calibration batch)"  # prune.stats.model_counts: not per sample
        lines.append(line)
    return lines


def note_lines(notes: list[str], warned: Collection[str] = ()) -> list[str]:
    """The method's notes (``info_of(model)["notes"]``) under a heading, each once, less
    those already printed as warnings (``warned``: a warning is noted too).

    Example:
        >>> note_lines(["cle: equalized 1 layer pair(s)", "a warning"], {"a warning"})
        ['  notes:', '    cle: equalized 1 layer pair(s)']
    """
    fresh = [note for note in dict.fromkeys(notes) if note not in warned]
    return ["  notes:", *(f"    {note}" for note in fresh)] if fresh else []


def tile_share(stats: dict) -> str:
    """``"50% of its 1x8 PE tiles; "`` of a PE-wise step's record (its ``tiles`` entry,
    ``prune/pe_record.py``), else ``""``.

    Example:
        >>> tile_share({"tiles": {"group": [1, 8], "sparsity": 0.5}})
        '50% of its 1x8 PE tiles; '
    """
    tiles = stats.get("tiles")
    if not isinstance(tiles, dict) or len(tiles.get("group") or ()) != 2:
        return ""
    go, gi = tiles["group"]
    return f"{tiles.get('sparsity', 0.0):.0%} of its {go}x{gi} PE tiles; "


def pruned_layers(extra: dict, original=None) -> dict[str, str]:
    """What each pruning step did to each layer it pruned: its sparsity (unstructured, N:M;
    PE-wise: its share of tiles first) or its removed output channels (structured, read
    from the ``resized`` record).

    Example:
        >>> pruned_layers({"pruning": {"nm": {"fc": 0.5, "params": {}}}})
        {'fc': '50% of weights zero'}
    """
    out: dict[str, str] = {}
    for stats in extra.get("pruning", {}).values():
        if isinstance(stats, dict):
            tiles = tile_share(stats)
            for name, value in stats.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    out[name] = f"{tiles}{value:.0%} of weights zero"
    modules = dict(original.named_modules()) if original is not None else {}
    for name, shape in extra.get("resized", {}).items():
        field = {"Conv1d": "out_channels", "Conv2d": "out_channels", "Linear": "out_features"}
        key = field.get(shape.get("kind")) if isinstance(shape, dict) else None
        if key is None or name in out:
            continue
        before = getattr(modules.get(name), key, None)
        after = shape.get(key)
        if isinstance(before, int) and isinstance(after, int) and after < before:
            out[name] = f"{before - after} of {before} output channels removed"
        elif before is None:
            out[name] = f"{after} output channels kept"
    return out


def layer_summary(
    order: list[str],
    float_layers: dict[str, str],
    pruned: dict[str, str],
    probed: dict[str, str],
    quantized: set[str],
) -> list[str]:
    """The summary's counts line, then one line per layer, in ``order`` (the model's).

    Each weight layer counts once: quantized (``quantized``; those ``pruned`` or ``probed``
    first said so), pruned with its weights in float, or kept in float (``float_layers``:
    its reason; a channel-pruned one's reason says pruned). Quantized layers are listed
    only when the recipe also prunes (a pruning recipe's listing names every layer).

    Example:
        >>> for line in layer_summary(["a", "b"], {}, {"a": "50% zero"}, {}, {"a", "b"}):
        ...     print(line)
          quantized layers: 2 (1 of them pruned first); kept in float: 0
            a: pruned (50% zero), then quantized
            b: quantized, not pruned
    """
    shrunk = {n for n, r in float_layers.items() if r.startswith("pruned (")}
    cut = (set(pruned) | set(probed) | shrunk) - quantized  # pruned, weights in float
    kept = set(float_layers) - cut - quantized
    first = (set(pruned) | set(probed)) & quantized
    counts = f"  quantized layers: {len(quantized)}"
    counts += f" ({len(first)} of them pruned first); " if first else "; "
    counts += f"pruned layers: {len(cut)}; " if cut else ""
    lines = [counts + f"kept in float: {len(kept)}"]
    for name in order:
        if name in quantized and name in pruned:
            lines.append(f"    {name}: pruned ({pruned[name]}), then quantized")
        elif name in quantized and name in probed:
            lines.append(f"    {name}: {probed[name]}; its weights quantized")
        elif name in quantized and (pruned or probed):
            lines.append(f"    {name}: quantized, not pruned")
        elif name in float_layers:
            lines.append(f"    {name}: {float_layers[name]}")
        elif name in pruned:
            lines.append(f"    {name}: pruned ({pruned[name]})")
        elif name in probed:
            lines.append(f"    {name}: {probed[name]}")
    return lines


PROBE_CHOICE = {  # config.mode -> (kind, how each input's channels are chosen)
    "sample": ("dynamic", "chosen per sample by a probe"),
    "batch": ("dynamic", "chosen per batch by a probe"),
    "static": ("static", "the same for every batch, from the calibration statistics"),
}


def skipped_channels(width: int, ratio: float) -> int:
    """Hidden channels a probe-pruned MLP of ``width`` skips per input: ``floor(ratio *
    width)``, at most ``width - 1`` (``prune.probe.kept_channels``).

    Example:
        >>> skipped_channels(512, 0.3), skipped_channels(2, 0.9)
        (153, 1)
    """
    return min(math.floor(ratio * width), width - 1)


def _probe_record(extra: dict, original=None) -> tuple[dict, dict[str, int]] | None:
    """Probe pruning's config and each wrapped MLP's hidden width (None without it; a width
    of 0 when ``original`` does not say)."""
    record = extra.get(PROBE_KEY)
    if not isinstance(record, dict) or not record.get("mlps"):
        return None
    modules = dict(original.named_modules()) if original is not None else {}
    widths = {
        mlp: getattr(modules.get(f"{mlp}.down_proj"), "in_features", 0) for mlp in record["mlps"]
    }
    return record.get("config", {}), widths


def probe_layers(extra: dict, original=None) -> dict[str, str]:
    """What probe pruning does to each projection of the MLPs it wraps: how many of the
    MLP's hidden channels each input skips, chosen how; the weights stay whole (sliced at
    run time).

    Example:
        >>> cfg = {"ratio": 0.3, "mode": "sample"}
        >>> probe_layers({"probe_prune": {"config": cfg, "mlps": ["mlp"]}})["mlp.up_proj"][:40]
        'probe-pruned (dynamic: 30% of the MLP hi'
    """
    found = _probe_record(extra, original)
    if found is None:
        return {}
    config, widths = found
    ratio = config.get("ratio", 0.0)
    kind, how = PROBE_CHOICE.get(config.get("mode"), ("dynamic", "chosen by a probe"))
    out = {}
    for name in probe_pruned_layers(extra):
        width = widths.get(name.rpartition(".")[0], 0)
        share = f"{ratio:.0%} of the MLP hidden channels"
        if width:
            share = f"{skipped_channels(width, ratio)} of the MLP's {width} hidden channels"
        out[name] = f"probe-pruned ({kind}: {share} skipped, {how})"
    return out


def probe_macs(dense: int, mlps: list[tuple[int, float]], probe: float) -> int:
    """Multiply-accumulates of one call after probe pruning: the dense model's ``dense``,
    in which each probed MLP's ``(macs, kept)`` shrinks to its ``kept`` share of hidden
    channels and adds the probe's ``probe`` share of its dense MACs
    (``prune.probe.probe_flops_fraction``).

    Example:
        >>> probe_macs(1000, [(300, 0.7), (300, 0.7)], 0.1)
        880
    """
    return round(dense + sum(macs * (kept - 1.0 + probe) for macs, kept in mlps))


def probe_lines(extra: dict, original, batch: Any) -> list[str]:
    """Probe pruning's parameters and multiply-accumulates before and after on ``batch``
    (the first calibration batch; the float model runs on it once, its Linear / Conv MACs
    counted as ``prune.stats.count_macs`` does): the parameters stay (each input picks its
    channels, weights sliced at run time), the MLPs' products shrink, the probe adds its own.
    """
    found = _probe_record(extra, original)
    if found is None or batch is None:
        return []
    config = ProbePruneConfig.from_dict(found[0], "probe_prune.config")
    kinds = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)
    layers = {n: m for n, m in original.named_modules() if isinstance(m, kinds)}
    was = original.training
    original.eval()
    try:
        macs = layer_macs(original, layers, lambda m: call_model(m, batch), per_sample=False)
    finally:
        original.train(was)
    ids = batch.get("input_ids", next(iter(batch.values()))) if isinstance(batch, dict) else batch
    ids = ids[0] if isinstance(ids, (tuple, list)) else ids
    rows, length = batch_size_of(batch), int(ids.shape[1]) if ids.dim() > 1 else 1
    probe = probe_flops_fraction(config, rows, length)
    mlps = [
        (
            sum(macs.get(f"{mlp}.{p}", 0) for p in PROBE_PROJECTIONS),
            1.0 - (skipped_channels(width, config.ratio) / width if width else config.ratio),
        )
        for mlp, width in found[1].items()
    ]
    dense = sum(macs.values())
    params = human_count(count_params(original))
    cost = f"; the probe adds {probe:.1%} of their dense MACs" if probe else ""
    return [
        f"  pruning (probe): params {params} -> {params} (weights kept whole, sliced at run "
        f"time), MACs {human_count(dense)} -> {human_count(probe_macs(dense, mlps, probe))} "
        f"({len(mlps)} MLPs skip {config.ratio:.0%} of their hidden channels{cost}; first "
        f"calibration batch, {rows} x {length})"
    ]
