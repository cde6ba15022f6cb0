"""The tables and text of a report for any model (:mod:`compactnn.report.any_model`): one row
per measured model, and how each column was measured."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from compactnn.measure.timing import ms_text
from compactnn.report.document import NOT_MEASURED, Block, Spoken
from compactnn.report.front_text import alt_text, front_blocks
from compactnn.report.plot import METRIC_LABELS
from compactnn.report.scoring import QUALITY_HEADERS, delta_cell, quality_cell
from compactnn.report.writer import (
    NO_SUCH_LAYER,
    PANELS,
    SUSPECT_FOOTNOTE,
    _mib,
    any_suspect,
    latency_cell,
    module_order,
    ratio_cell,
    resident_cell,
    suspect_mark,
)

SIMULATED = "simulated"
NOT_COMPRESSED = Spoken("-", "not compressed")  # the float row's formats
RESIDENT = "resident memory (delivered form, fresh process)"
# the resident column compares runtimes, not models, when rows run on different runtimes and
# their spread exceeds this many times the largest artifact (a float model's fp32 bytes: what
# even a simulated row holds dequantized), so the model cannot account for the difference
RUNTIME_DOMINATES = 10
# the first six keep their places: docs/own-model.md's table is read by position
HEADER = ["recipe", "runs as", "quality", "vs float", "size on disk", "x smaller",
          "theoretical size", "formats", "latency", "speedup vs fastest float",
          RESIDENT]  # fmt: skip


def folder_labels(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Each artifact's folder, with as many parent folders as tell it from the others.

    Example:
        >>> folder_labels(["api_art/w8a8", "api_net2/w8a8", "out/w4a8"])
        ['api_art/w8a8', 'api_net2/w8a8', 'w4a8']
    """
    parts = [Path(os.path.abspath(p)).parts for p in paths]
    labels = []
    for mine in parts:
        for k in range(1, len(mine) + 1):
            tail = mine[-k:]
            if sum(1 for other in parts if other[-k:] == tail) == 1 or k == len(mine):
                labels.append("/".join(tail))
                break
    return labels


def header(results: dict[str, Any]) -> list[str]:
    """``HEADER``, its quality column named after an unlabelled metric (perplexity: lower is
    better; output cosine)."""
    return [QUALITY_HEADERS.get(results.get("metric"), c) if c == "quality" else c for c in HEADER]


def table_rows(results: dict[str, Any]) -> list[list[str]]:
    """One row per measured model, in the order of ``HEADER`` (:func:`header`); a latency
    whose timing looked inflated, and a speedup computed from one (the row's or the float
    row's), ends in ``" *"`` (:data:`compactnn.report.writer.SUSPECT_FOOTNOTE`).

    Example:
        >>> table_rows(results)[0][:2]  # doctest: +SKIP
        ['float', 'fp32 eager']
    """
    out, base = [], results["rows"][0]["quality"] if results["rows"] else None
    float_latency = results["rows"][0]["latency"] if results["rows"] else None
    for r in results["rows"]:
        lat, own = r["latency"], artifact_row(results["rows"], r)
        theoretical = own.get("theoretical_bytes")
        speedup = (
            r.get("no_speedup") or SIMULATED  # the float model's dense compute, or simulated
            if r["speedup"] is None
            else f"{r['speedup']:.2f}x" + suspect_mark(lat, float_latency)
        )
        out.append([
            r["label"], r["runs_as"], quality_cell(r["metric"], r["quality"]),
            delta_cell(r["metric"], r["quality"], base), _mib(r["size_bytes"]),
            ratio_cell(r["size_ratio"]),
            NOT_MEASURED if theoretical is None else _mib(theoretical),
            formats_summary(own.get("layers") or {}),
            latency_cell(lat, None, suspect_mark(lat)),  # 3 significant digits below 1 ms
            speedup,
            resident_cell(r),
        ])  # fmt: skip
    return out


def artifact_row(rows: list[dict[str, Any]], row: dict[str, Any]) -> dict[str, Any]:
    """The row holding ``row``'s artifact record (its ``layers``, ``theoretical_bytes``):
    ``row`` itself, or for a delivered row (``shares_size``: the same artifact run another
    way) the first row of the same ``artifact`` that is not one."""
    if not row.get("shares_size"):
        return row
    same = (
        r for r in rows if r.get("artifact") == row.get("artifact") and not r.get("shares_size")
    )
    return next(same, row)


def format_kind(layer_format: str) -> str:
    """A layer's format without its activation, symmetry and granularity (the per-layer
    section has them): its number type, and a codebook or basis when it has one.

    Example:
        >>> format_kind("uint4-asym-group32 / act uint8"), format_kind("int2-sym-channel-codebook")
        ('uint4', 'int2-codebook')
        >>> format_kind("float32")
        'float32'
    """
    parts = layer_format.split(" / ")[0].split("-")
    return "-".join(parts[:1] + parts[3:])


def formats_summary(layers: dict[str, str]) -> str:
    """Each :func:`format_kind` of ``layers`` (layer -> format, in model order) with its
    number of layers, in order of first use; ``"-"`` when there are none (the float row;
    said "not compressed" in HTML).

    Example:
        >>> formats_summary({"0": "int8-sym-channel", "3": "uint4-asym-channel",
        ...                  "9": "int8-sym-channel"})
        'int8 (2 layers), uint4 (1 layer)'
    """
    counts: dict[str, int] = {}
    for layer_format in layers.values():
        kind = format_kind(layer_format)
        counts[kind] = counts.get(kind, 0) + 1
    said = ", ".join(f"{kind} ({n} layer{'s' if n != 1 else ''})" for kind, n in counts.items())
    return said or NOT_COMPRESSED


def layer_blocks(rows: list[dict[str, Any]]) -> list[Block]:
    """A table of every layer's format (layer x artifact, in model order; ``-`` where an
    artifact lacks the layer), as the demo report gives; nothing when no row has layers."""
    own = [r for r in rows if r.get("layers") and not r.get("shares_size")]
    if not own:
        return []
    names = list(dict.fromkeys(name for r in own for name in r["layers"]))
    table = [[name] + [r["layers"].get(name, NO_SUCH_LAYER) for r in own] for name in names]
    caption = "Layer formats: each layer's weight format per artifact"
    return [
        ("h2", "Layer formats"),
        ("table", (["layer"] + [r["label"] for r in own], table, caption)),
    ]


def memory_runtime(runs_as: str) -> str:
    """The runtime whose own memory a row's resident figure includes, from its ``runs_as``.

    Example:
        >>> memory_runtime("ONNX Runtime fp32"), memory_runtime("simulated")
        ('ONNX Runtime', 'PyTorch')
    """
    for prefix, runtime in (
        ("ONNX Runtime", "ONNX Runtime"),
        ("oneDNN", "PyTorch + oneDNN int8"),
        ("kernels", "PyTorch + compactnn kernels"),
        ("torch.compile", "PyTorch + torch.compile"),
    ):
        if runs_as.startswith(prefix):
            return runtime
    return "PyTorch"  # simulated, PyTorch fp32 / bf16 autocast, probe-pruned


def resident_note(rows: list[dict[str, Any]]) -> str | None:
    """A warning that the resident column compares runtimes, not models (None when it does
    not): the measured rows run on more than one runtime (:func:`memory_runtime`) and their
    resident figures spread more than ``RUNTIME_DOMINATES`` (10) times the largest artifact.

    Example:
        >>> rows = [{"label": "float", "runs_as": "ONNX Runtime fp32", "size_bytes": 26762,
        ...          "resident_bytes": 33316864},
        ...         {"label": "w8a8", "runs_as": "simulated", "size_bytes": 10767,
        ...          "resident_bytes": 16363520}]
        >>> resident_note(rows)[:60]
        'Resident memory compares runtimes, not models: its 16.17 MiB'
    """
    measured = [r for r in rows if r.get("resident_bytes") is not None]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in measured:
        groups.setdefault(memory_runtime(r["runs_as"]), []).append(r)
    if len(groups) < 2:
        return None
    held = [r["resident_bytes"] for r in measured]
    spread, largest = max(held) - min(held), max(r["size_bytes"] for r in measured)
    if spread <= RUNTIME_DOMINATES * largest:
        return None
    spans = []
    for runtime, group in groups.items():
        low, high = (f(r["resident_bytes"] for r in group) for f in (min, max))
        lo, hi = _mib(low), _mib(high)
        spans.append((runtime, lo.removesuffix(hi[-4:]) if lo != hi else None, hi, group))

    def said(sep: str) -> str:  # "15.60-16.03 MiB", said "15.60 to 16.03 MiB" in HTML
        parts = [
            f"{runtime} ({hi if lo is None else lo + sep + hi}): "
            + ", ".join(r["label"] for r in group)
            for runtime, lo, hi, group in spans
        ]
        return (
            f"Resident memory compares runtimes, not models: its {_mib(spread)} spread is over "
            f"{RUNTIME_DOMINATES}x the largest model ({_mib(largest)}), and each row's figure "
            f"includes its runtime's own memory: {'; '.join(parts)}."
        )

    return Spoken(said("-"), said(" to "))


def shared_sizes(rows: list[dict[str, Any]]) -> None:
    """Gives each delivered row (``shares_size``: the same artifact run another way) the
    ``theoretical_bytes`` of its artifact's row (:func:`artifact_row`), the number its table
    cell shows, so that ``results.json`` carries it too."""
    for row in rows:
        if row.get("shares_size") and row.get("theoretical_bytes") is None:
            theoretical = artifact_row(rows, row).get("theoretical_bytes")
            if theoretical is not None:
                row["theoretical_bytes"] = theoretical


def _blocks(results: dict[str, Any], png: bytes, title: str) -> list[Block]:
    env = results["environment"]
    # results.json's field too: _blocks runs before write_files dumps ``results``
    results.setdefault("resident_note", resident_note(results["rows"]))
    shared_sizes(results["rows"])
    notes = [f"{r['label']}: {note}" for r in results["rows"] for note in r["notes"]]
    kept = [
        f"{r['label']}: `{layer}` ({r['float_layers'][layer]})"
        for r in results["rows"]
        for layer in sorted(r.get("float_layers", {}), key=module_order)
    ]
    how = [
        _quality_text(results),
        "Size: bytes on disk of each artifact directory; the float row is the float model "
        "saved in the same format. Theoretical size: the size the recipe implies (its tensors "
        "as the artifact stores them, a pruned weight's zeros by their sparse index, without "
        "the files' headers). Formats: each weight format's number type and how many layers "
        "use it (every layer's full format under Layer formats); a delivered row runs its "
        "artifact's.",
        f"Latency: median of at least {env['runs']} runs after warm-up, "
        f"{env['threads']} torch threads, "
        f"OMP_WAIT_POLICY={env.get('omp_wait_policy', 'unset')}, one batch of "
        f"{results['latency_batch']} samples, every model in its own block of calls after a "
        "pause, three rounds in rotating order (min-max shown when runs spread more than 10%).",
        f"Runs as: the float row is the fastest float path of the same run "
        f"({_paths_text(results.get('float_paths'))}), and every speedup is over it; "
        f"`{SIMULATED}` is the compressed model as compactnn simulates it (float kernels on "
        "dequantized weights: smaller on disk, not faster, so no speedup is claimed); an "
        "int8 runtime name (`oneDNN int8`, `ONNX Runtime int8`) is the artifact lowered to "
        "integer kernels by compactnn.deploy and verified against the simulation; `kernels "
        "bfloat16` is a transformer on compactnn.to_kernels' low-bit kernels; a float "
        "runtime name on a compressed row is a pruned model with nothing simulated in it, "
        "run as itself on the fastest of its own float paths (its notes list them).",
        _memory_text(results),
    ]
    suspect = [
        f"{r['label']}: {why}" for r in results["rows"] for why in r["latency"].get("suspect", [])
    ]
    if env.get("oversubscribed"):
        how.append(env["oversubscribed"])
    if any_suspect(results["rows"]):
        how.append(SUSPECT_FOOTNOTE)
    blocks: list[Block] = [
        ("h1", title),
        ("p", f"compactnn {env['compactnn']}, torch {env['torch']}, Python {env['python']}, "
              f"{env['machine']}, {env['threads']} torch threads, {env['date']}."),
        ("h2", "Results"),
        ("table", (header(results), table_rows(results), "Results: one row per model measured")),
        *([("p", results["resident_note"])] if results["resident_note"] else []),
        *([("p", results["calibration_note"])] if results.get("calibration_note") else []),
        ("img", (alt_text(results["rows"], PANELS), png, "pareto.png")),
        *front_blocks(results["rows"], PANELS),
        ("h2", "How this was measured"),
        ("list", how),
    ]  # fmt: skip
    if suspect:
        blocks += [("h2", "Latencies that may be inflated (noisy machine)"), ("list", suspect)]
    blocks += layer_blocks(results["rows"])
    if kept:
        blocks += [("h2", "Layers with float weights (kept in float, or pruned only)")]
        blocks += [("list", kept)]
    if notes:
        blocks += [("h2", "Notes"), ("list", notes)]
    return blocks


def _quality_text(results: dict[str, Any]) -> str:
    """How quality was scored, and which way is better."""
    metric, n = results["metric"], results["samples"]
    if metric == "perplexity":
        return (
            f"Quality: next-token perplexity (exp of the mean cross-entropy of each next token; "
            f"lower is better) over the {results['scored_tokens']} predicted tokens of the {n} "
            "sequences given (padding, and tokens predicted from padding, left out); vs float: "
            "the difference from the float model's (positive is worse) and the ratio to it."
        )
    if metric == "cosine" and not results.get("labelled", True):
        return (
            f"Quality: mean cosine similarity of each sample's outputs (flattened) with the "
            f"float model's, on the {n} unlabelled samples given (1 is identical; higher is "
            "better)."
        )
    return f"Quality: {METRIC_LABELS.get(metric, metric)} on the {n} labelled samples given."


def _memory_text(results: dict[str, Any]) -> str:
    """What the resident memory column measured (or that it was not measured)."""
    seconds = results["environment"].get("memory_s")
    if seconds is None:
        return "Resident memory: not measured (`--no-memory`, or `memory=False` in Python)."
    return (
        "Resident memory: resident MiB of the delivered form, fresh process: what the row's "
        "model, in the form its latency was timed (the float row on the float path that won, "
        "an int8 row as `compactnn.deploy` on the row's backend, a transformer row as "
        "`compactnn.load(artifact, kernels=True)`, a pruned float row on its float path, a "
        "simulated row as the simulated model), adds to the RSS of a fresh Python process once "
        "built from the saved artifact and run on the latency batch (heap trimmed; "
        "`compactnn.measure.memory.resident_memory`), with its anonymous part (heap and "
        "tensors). The batch, the float skeleton and the libraries are loaded before the first "
        f"reading, for every row alike, so they do not count. {results['environment']['threads']}"
        f" threads; {seconds:.0f} s for all rows."
    )


def _paths_text(paths: dict[str, Any] | None) -> str:
    if not paths:
        return "fp32 eager"
    times = ", ".join(
        f"{k} {ms_text(v['median_s'])} ms"
        for k, v in paths["timings"].items()
        if k in paths["errors"]
    )
    skipped = "; ".join(f"{k} skipped: {v}" for k, v in paths["skipped"].items())
    return f"{paths['winner']} won: {times}" + (f"; {skipped}" if skipped else "")
