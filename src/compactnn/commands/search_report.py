"""What ``compactnn search`` prints after a search: formats and the per-layer table, the
layers that stay float (and why), size, bits, the accuracy-aware trials and latency."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from torch import nn

from compactnn.commands._common import human_bytes
from compactnn.mixed_precision.formats import Format

# quantizable weight layers named in the "stay float" lines (the Hugging Face GPT-2
# Conv1D is matched by name: transformers is never imported here)
FLOAT_KINDS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
TABLE_ROWS = 24  # more layers than this: consecutive runs of one format are grouped


def layer_params(model: nn.Module, names: list[str]) -> dict[str, int]:
    """Weights of each searched layer of ``model`` (0 for a layer the search made itself,
    such as the ``q_proj`` split out of an ``nn.MultiheadAttention``)."""
    modules = dict(model.named_modules())
    weight = {n: getattr(modules.get(n), "weight", None) for n in names}
    return {n: int(w.numel()) if w is not None else 0 for n, w in weight.items()}


def runs(assignment: dict[str, str]) -> list[tuple[list[str], str]]:
    """Consecutive layers (in execution order) sharing one format.

    Example:
        >>> runs({"a": "w4a8", "b": "w4a8", "c": "w8a8"})
        [(['a', 'b'], 'w4a8'), (['c'], 'w8a8')]
    """
    out: list[tuple[list[str], str]] = []
    for name, fmt in assignment.items():
        if out and out[-1][1] == fmt:
            out[-1][0].append(name)
        else:
            out.append(([name], fmt))
    return out


def layer_table(assignment: dict[str, str], params: dict[str, int]) -> list[str]:
    """The per-layer table: one row per layer (layer, weights, format) for up to
    :data:`TABLE_ROWS` layers, else one row per run of consecutive layers with one format.

    Example:
        >>> for line in layer_table({"conv": "w8a8", "fc": "w2a8"}, {"conv": 36, "fc": 768}):
        ...     print(line)
          layer  weights  format
          conv        36  w8a8
          fc         768  w2a8
    """
    if len(assignment) <= TABLE_ROWS:
        rows = [(n, f"{params.get(n, 0):,}", f) for n, f in assignment.items()]
    else:
        rows = []
        for names, fmt in runs(assignment):
            label = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]} ({len(names)})"
            rows.append((label, f"{sum(params.get(n, 0) for n in names):,}", fmt))
    head = ("layer" if len(assignment) <= TABLE_ROWS else "layers (run)", "weights", "format")
    w0 = max(len(r[0]) for r in [head, *rows])
    w1 = max(len(r[1]) for r in [head, *rows])
    return [f"  {a:<{w0}}  {b:>{w1}}  {c}" for a, b, c in [head, *rows]]


def float_layers(
    model: nn.Module, assignment: dict[str, str], left_out: dict[str, str], embeddings: str | None
) -> dict[str, str]:
    """Weight layers of ``model`` the found recipe does not quantize: name -> why (an
    embedding table without ``--embeddings``, a head tied to one, an attention's
    ``out_proj`` read without being called, any other layer the search did not price)."""
    searched = set(assignment)
    parents = {n.rsplit(".", 1)[0] for n in searched if "." in n}  # a split attention's name
    out: dict[str, str] = {}
    for name, module in model.named_modules():
        if not name or name in searched:
            continue
        kind = type(module).__name__
        if not isinstance(module, FLOAT_KINDS) and kind != "Conv1D":
            continue
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        if parent in parents and name.endswith("out_proj"):
            continue  # a split nn.MultiheadAttention: its out_proj is searched by that name
        if name in left_out:
            out[name] = "tied to an embedding table" + (
                f": quantized with it by --embeddings {embeddings}, outside the budget"
                if embeddings
                else ": stays float with it (quantize both with --embeddings, e.g. w4-g32)"
            )
        elif isinstance(module, nn.Embedding):
            if embeddings:
                continue  # quantized by the --embeddings step (outside the budget)
            out[name] = (
                "embedding tables: the searched formats cover Linear/Conv layers; "
                "--embeddings FORMAT (e.g. w4-g32) quantizes them, outside the budget"
            )
        elif name.endswith("out_proj"):
            out[name] = "read by nn.MultiheadAttention without being called: compress keeps it"
        else:
            out[name] = "not searched (not run on the calibration batch, or not quantized)"
    return out


def float_lines(floats: dict[str, str]) -> list[str]:
    """``floats`` (name -> why) as lines, layers with the same reason on one line (at most 4
    names each)."""
    by_reason: dict[str, list[str]] = {}
    for name, why in floats.items():
        by_reason.setdefault(why, []).append(name)
    lines = []
    for why, names in by_reason.items():
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        lines.append(f"  stays float: {shown} ({why})")
    return lines


def mixed_activation_warning(assignment: dict[str, str]) -> str | None:
    """A warning when the found recipe mixes weight-only formats (``w4-g32``) with formats
    that quantize activations (``w8a8``): deploy runs only the latter on int8 kernels.

    Example:
        >>> mixed_activation_warning({"a": "w4a8", "b": "w8a8"}) is None
        True
        >>> mixed_activation_warning({"a": "w4-g32", "b": "w8a8"})[:48]
        'warning: the recipe mixes weight-only w4-g32 (a)'
    """
    acts = {f: Format.parse(f).act is not None for f in set(assignment.values())}
    if all(acts.values()) or not any(acts.values()):
        return None
    only = sorted(f for f, a in acts.items() if not a)
    names = [n for n, f in assignment.items() if not acts[f]]
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return (
        f"warning: the recipe mixes weight-only {', '.join(only)} ({shown}) with formats that "
        f"quantize activations ({', '.join(sorted(f for f, a in acts.items() if a))}): "
        "compactnn deploy runs only layers with quantized activations on int8 kernels, so the "
        "weight-only ones run in float there (compactnn eval measures it); for an all-integer "
        "deployment search over formats with activations only (e.g. w2a8,w4a8,w8a8)."
    )


def size_lines(
    payload: float,
    artifact: int | None,
    max_bytes: float | None,
    floor: float | None = None,
    tables: bool = True,
) -> list[str]:
    """The searched layers' payload (what ``--max-bytes`` bounds) and, when measured, the
    artifact's bytes on disk, with a note when the artifact exceeds ``--max-bytes``
    (``floor``: the smallest reachable payload, below which no ``--max-bytes`` is suggested;
    ``tables``: the model has embedding tables, which ``--embeddings`` can shrink).

    Example:
        >>> for line in size_lines(11_236, 21_464, 12_000): print(line[:58])
          searched layers: 11.0 KiB (11,236 B; what --max-bytes 12
          artifact on disk: 21.0 KiB (21,464 B, measured: the mode
          note: the artifact is 9,464 B over --max-bytes 12,000: t
    """
    bound = f"; what --max-bytes {max_bytes:,.0f} bounds" if max_bytes is not None else ""
    lines = [
        f"  searched layers: {human_bytes(payload)} ({payload:,.0f} B{bound}: the packed "
        "weight codes, scales and biases of the searched layers only)"
    ]
    if artifact is not None:
        lines.append(
            f"  artifact on disk: {human_bytes(artifact)} ({artifact:,} B, measured: the model "
            "compressed with recipe.yaml and saved; adds the layers kept in float, "
            "recipe.yaml and the header)"
        )
    if artifact is not None and max_bytes is not None and artifact > max_bytes:
        rest = artifact - payload  # float layers, recipe.yaml, header (and sparse savings)
        fix = (
            f"for an artifact of at most {max_bytes:,.0f} B, search with --max-bytes "
            f"{max_bytes - rest:,.0f} (the rest of the artifact, {rest:,.0f} B, staying the same)"
            if max_bytes > rest
            else f"the rest of the artifact alone takes {rest:,.0f} B"
        )
        if floor is not None and rest < max_bytes < rest + floor:
            shrink = (
                "a smaller --embeddings format or cheaper formats" if tables else "cheaper formats"
            )
            fix = (
                f"an artifact of at most {max_bytes:,.0f} B is out of reach with these formats: "
                f"the rest of the artifact takes {rest:,.0f} B and the searched layers at least "
                f"{floor:,.0f} B ({shrink} shrink it)"
            )
        lines.append(
            f"  note: the artifact is {artifact - max_bytes:,.0f} B over --max-bytes "
            f"{max_bytes:,.0f}: the budget bounds the searched layers, not the file; {fix}"
        )
    return lines


def pruning_lines(result) -> list[str]:
    """The channel pruning a result chose: each pruned residual group with its ratio."""
    return [
        f"  channel pruning: residual group {','.join(g['layers'])} at {g['chosen']} "
        f"({g['chosen'][2:]}% of its channels removed)"
        for g in result.groups
        if g["chosen"] != "keep"
    ]


def bits_line(result, avg_bits: float | None) -> str:
    """The average bits per weight: the kept weights' code bits over the searched layers'
    weight count before any pruning (the quantity ``--avg-bits`` bounds; a ``ch<P>+`` format
    is priced on its own kept rows, the next layer's removed inputs not counted)."""
    pruned = any(g["chosen"] != "keep" for g in result.groups) or any(
        f.startswith("ch") for f in result.assignment.values()
    )
    n = f"{int(result.cost['weights']):,}"
    over = f"code bits of the kept weights / the {n} weights before pruning" if pruned else ""
    over = over or f"over {n} weights"
    limit = f"; budget {avg_bits:g}" if avg_bits is not None else ""
    return f"  average bits per weight: {result.cost['avg_bits']:.3g} ({over}{limit})"


def quality_line(budget: dict[str, Any], metric: str) -> str | None:
    """``--max-drop``'s outcome: the float model's quality, the chosen recipe's, the drop.

    Example:
        >>> quality_line({"baseline": 93.75, "quality": 92.5, "drop": 1.25, "max_drop": 2}, "top-1")
        '  quality: float 93.75, chosen 92.5 (top-1; drop 1.25 <= --max-drop 2)'
    """
    if budget.get("quality") is None:
        return None
    return (
        f"  quality: float {budget['baseline']:.4g}, chosen {budget['quality']:.4g} ({metric}; "
        f"drop {budget['drop']:.3g} <= --max-drop {budget['max_drop']:g})"
    )


def print_summary(
    result, args: argparse.Namespace, model: nn.Module, metric: str = "top-1"
) -> None:
    """The search's result: formats, the per-layer table, the layers staying float, pruning,
    size, bits, trials, quality and latency."""
    counts: dict[str, int] = {}
    for fmt in result.assignment.values():
        counts[fmt] = counts.get(fmt, 0) + 1
    print(f"searched {len(result.layers)} layers in {result.seconds:.1f} s")
    print("  formats: " + ", ".join(f"{f} x{n}" for f, n in counts.items()))
    for line in layer_table(result.assignment, layer_params(model, result.layers)):
        print(line)
    floats = float_layers(model, result.assignment, result.left_out, args.embeddings)
    for line in float_lines(floats):
        print(line)
    if warning := mixed_activation_warning(result.assignment):
        print(warning, file=sys.stderr)
    for line in pruning_lines(result):
        print(line)
    tables = any(isinstance(m, nn.Embedding) for m in model.modules())
    floor = min((p["bytes"] for p in result.frontier), default=None)  # cheapest reachable
    for line in size_lines(
        result.cost["bytes"], result.budget.get("artifact_bytes"), args.max_bytes, floor, tables
    ):
        print(line)
    if "avg_bits" in result.cost:
        print(bits_line(result, args.avg_bits))
    for t in result.tried:
        mark = "ok " if t["passed"] else "no "
        print(f"  tried ({t['stage']}): {mark} drop {t['drop']:.3f}, {human_bytes(t['bytes'])}")
    if line := quality_line(result.budget, metric):
        print(line)
    check = result.latency.get("check")
    if check:
        print(
            f"  deployed latency: {check['measured_ms']:.2f} ms vs {check['reference']} "
            f"{check['reference_ms']:.2f} ms (ratio {check['measured_ratio']:.2f}, CPU-time "
            f"ratio {check['cpu_ratio']:.2f}); per-layer proxy {check['proxy_ms']:.2f} ms "
            f"(error {100 * check['proxy_error']:+.0f}%)"
        )
    if result.budget.get("met") is True:
        print(
            f"  latency budget met: {result.budget['measured_ratio']:.2f}x <= "
            f"--max-latency-ratio {args.max_latency_ratio:g}"
        )
    elif result.budget.get("met") is False:
        print(f"  budget NOT met: {result.budget['not_met']}")
