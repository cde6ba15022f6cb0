"""How ``compactnn eval`` prints its result: the table, the bits line and the timing
conditions (the numbers come from :func:`compactnn.commands.evaluate.evaluate`)."""

from __future__ import annotations

import argparse
import math
from typing import Any

from compactnn.commands._common import human_bytes
from compactnn.commands.compress_summary import human_count
from compactnn.commands.term_table import render, terminal_width
from compactnn.errors import counted
from compactnn.measure import fmt_quality
from compactnn.measure.environment import oversubscribed_note
from compactnn.measure.size import ratio_cell
from compactnn.measure.timing import SUSPECT_MARK, ms_text, suspect_mark, timing_suspect  # noqa: F401

# (header, alignment) per column of the printed table; "<" left, ">" right.
TABLE_COLUMNS = (
    ("", "<"),
    ("recipe", ">"),
    ("runs on", "<"),
    ("quality", ">"),
    ("size on disk", ">"),
    ("x smaller", ">"),
    ("latency", "<"),
    ("speedup", "<"),
)


def text_table(
    columns: tuple[tuple[str, str], ...], rows: list[list[str]], width: int | None = None
) -> list[str]:
    """Lines of a plain-text table: each column as wide as its widest cell (header
    included), columns two spaces apart, so a long cell never runs into its neighbour; when
    a line would pass ``width`` columns, one block of ``column: value`` lines per row
    instead (:func:`compactnn.commands.term_table.render`).

    Example:
        >>> text_table((("a", "<"), ("n", ">")), [["long cell", "1"]])
        ['a          n', 'long cell  1']
    """
    header = [name for name, _ in columns]
    return render(header, rows, width, align=[align for _, align in columns])


PERPLEXITY_COLUMN = ("perplexity", ">")  # after "quality", for a causal LM


def has_perplexity(result: dict[str, Any]) -> bool:
    """Whether ``result`` scored perplexity (a causal LM on unlabelled token ids)."""
    return any(row.get("perplexity") is not None for row in result["rows"])


def table_columns(result: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """:data:`TABLE_COLUMNS`, with :data:`PERPLEXITY_COLUMN` after "quality" when scored."""
    if not has_perplexity(result):
        return TABLE_COLUMNS
    at = [name for name, _ in TABLE_COLUMNS].index("quality") + 1
    return (*TABLE_COLUMNS[:at], PERPLEXITY_COLUMN, *TABLE_COLUMNS[at:])


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    """The cells of each row of ``result`` (float first), as :func:`table_columns` orders them."""
    base = result["rows"][0]
    ppl = has_perplexity(result)
    return [
        [
            row["model"],
            str(row["recipe"]),
            runs_on(row),
            fmt_quality(row["metric"], row["quality"]),
            *([perplexity_cell(row)] if ppl else []),
            human_bytes(row["size_bytes"]),
            ratio_cell(base["size_bytes"] / row["size_bytes"]),
            row["latency_text"] + suspect_mark(row.get("latency")),
            "" if row["model"] == "float" else _speedup_text(row, base),
        ]
        for row in result["rows"]
    ]


SUSPECT_FOOTNOTE = (
    "* this timing looked inflated (the reasons are in the warnings above): the machine was "
    "busy while it was measured, so the latency and the speedups computed from it may be the "
    "machine's, not the model's; rerun on a quieter machine before relying on them"
)


def suspect_footnote(result: dict[str, Any]) -> str | None:
    """:data:`SUSPECT_FOOTNOTE` when a row's timing looked inflated (its cells carry
    :data:`SUSPECT_MARK`), else None."""
    suspect = timing_suspect(*(row.get("latency") for row in result["rows"]))
    return SUSPECT_FOOTNOTE if suspect else None


def speed_note(base: dict[str, Any], latency: dict[str, Any]) -> str | None:
    """The note on a delivered row's latency (``Timing.to_dict()``) against the float row's
    (``base``): slower (:func:`compactnn.report.delivery.slower_note`), or faster while
    either timing looked inflated (:func:`faster_note`); None otherwise. Both notes say
    when the timings look inflated.

    Example:
        >>> calm, busy = {"median_s": 0.002, "suspect": []}, {"median_s": 0.02, "suspect": ["x"]}
        >>> speed_note(busy, calm)[:34], speed_note(calm, busy)[:34], speed_note(calm, calm)
        ('faster than the fastest float path', 'slower than the fastest float path', None)
    """
    from compactnn.report.delivery import slower_note

    suspect = timing_suspect(base, latency)
    times = base["median_s"], latency["median_s"]
    return slower_note(*times, suspect=suspect) or faster_note(*times, suspect=suspect)


def faster_note(float_s: float, row_s: float, *, suspect: bool) -> str | None:
    """The note of a delivered row faster than the fastest float path when either timing
    looked inflated (the "faster" claim may be the machine's, not the model's), else None;
    ``float_s`` and ``row_s`` are median latencies in seconds (the slower case:
    :func:`compactnn.report.delivery.slower_note`).

    Example:
        >>> faster_note(0.01999, 0.000133, suspect=True)[:58]
        'faster than the fastest float path (0.133 ms vs 19.99 ms):'
        >>> faster_note(0.01999, 0.000133, suspect=False) is None
        True
    """
    if not suspect or not row_s < float_s:
        return None
    return (
        f"faster than the fastest float path ({ms_text(row_s)} ms vs {ms_text(float_s)} ms): "
        "in this run, but these timings look inflated (see the warnings): time it again on a "
        "quieter machine before relying on the speedup"
    )


def perplexity_cell(row: dict[str, Any]) -> str:
    """``131.20`` for the float row, ``132.51 (1.010x)`` (times the float one) for the others.

    Example:
        >>> perplexity_cell({"perplexity": 132.514, "perplexity_ratio": 1.00998})
        '132.51 (1.010x)'
    """
    value, ratio = row.get("perplexity"), row.get("perplexity_ratio")
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.2f}" + (f" ({ratio:.3f}x)" if ratio is not None else "")


def quality_line(result: dict[str, Any]) -> str:
    """``quality: top1``; with perplexity, what it was scored on and which way is better."""
    text = f"quality: {result['rows'][0]['metric']}"
    if not has_perplexity(result):
        return text
    return (
        f"{text}; perplexity: next-token, over {result['perplexity_tokens']} predicted tokens "
        f"of {result['perplexity_data']} (padding excluded; lower is better, x the float one)"
    )


def runs_on(row: dict[str, Any]) -> str:
    """The "runs on" cell: the runtime, and the one that gave the quality when it differs
    (the float row: latency on its fastest path, quality in PyTorch fp32)."""
    quality_on = row.get("quality_runtime")
    if row.get("latency") and quality_on and quality_on != row["runtime"]:
        return f"{row['runtime']} for latency, {quality_on} for quality"
    return row["runtime"]


def bits_line(bits: dict[str, float], float_weights: dict[str, Any] | None = None) -> str:
    """``bits/weight stored: 2.06`` over the compressed layers, with the extremes as
    ``name: bits`` (a layer of an ``nn.Sequential`` is named by a number); for a model with
    none (``float_weights``, e.g. channel-pruned) its float width and how many parameters
    the compression removed.

    Example:
        >>> bits_line({"total": 4.23, "7": 4.06, "0": 9.78})
        'bits/weight stored: 4.23 over 2 compressed layers (7: 4.06 .. 0: 9.78; ...)'
        >>> bits_line({"total": 17.0, "c1": 17.0, "c2": 17.0})[:64]
        'bits/weight stored: 17.00 over 2 compressed layers (each 17.00; '
    """
    layers = {k: v for k, v in bits.items() if k != "total"}
    if not layers and float_weights:
        return _float_bits_line(float_weights)
    if not layers:
        return "bits/weight stored: - (no compressed layer)"
    lo, hi = min(layers, key=layers.get), max(layers, key=layers.get)
    spread = f"{lo}: {layers[lo]:.2f} .. {hi}: {layers[hi]:.2f}; "
    if f"{layers[lo]:.2f}" == f"{layers[hi]:.2f}":  # one layer, or all alike: no range
        spread = "" if len(layers) == 1 else f"each {layers[lo]:.2f}; "
    return (
        f"bits/weight stored: {bits['total']:.2f} over {counted(len(layers), 'compressed layer')} "
        f"({spread}every stored tensor of a weight over its weights, per layer in --json)"
    )


def _float_bits_line(w: dict[str, Any]) -> str:
    """``bits/weight stored: 32 (float; ch50 removed 73% of the parameters: 10.0k -> 2.7k)``."""
    width = w["bits"] if w["bits"] is not None else "mixed"
    before, after = w["params_float"], w["params"]
    if after >= before or not before:
        change = f"{human_count(after)} parameters, as many as the float model"
    else:
        change = (
            f"{w['recipe'] or 'the compression'} removed {100 * (1 - after / before):.0f}% of "
            f"the parameters: {human_count(before)} -> {human_count(after)}"
        )
    return f"bits/weight stored: {width} (float, no quantized layer; {change})"


def _speedup_text(row: dict[str, Any], base: dict[str, Any]) -> str:
    """``"3.20x"``, marked ``" *"`` when the row's or the float row's (``base``, whose
    latency every speedup is computed from) timing looked inflated."""
    from compactnn.report.delivery import SIMULATED

    if row["runtime"] == SIMULATED:
        return "simulated (no speedup claimed)"
    if row.get("no_speedup"):  # the float model's dense compute: any gap is noise
        return row["no_speedup"]
    if not row.get("speedup"):
        return "n/a"
    return f"{row['speedup']:.2f}x" + suspect_mark(row.get("latency"), base.get("latency"))


def conditions(args: argparse.Namespace, result: dict[str, Any]) -> str:
    """The latency line: runs, batch, threads, wait policy, and the float paths compared."""
    batch = f", batch {result['batch']}" if result["batch"] is not None else ""
    runs = 3 if args.quick else args.runs
    text = (
        f"(latency: median of at least {runs} runs after warm-up{batch}, {args.threads} threads, "
        f"OMP_WAIT_POLICY={result['omp_wait_policy']}, GOMP_SPINCOUNT={result['gomp_spincount']}"
    )
    paths = result["float_paths"]
    if paths:
        times = ", ".join(
            f"{k} {ms_text(v['median_s'])} ms"
            for k, v in paths["timings"].items()
            if k in paths["errors"]
        )
        text += f"; speedup over the fastest float path {paths['winner']} ({times})"
        skipped = "; ".join(f"{k}: {v}" for k, v in paths["skipped"].items())
        text += f"; skipped: {skipped}" if skipped else ""
    return text + ")"


def result_lines(
    args: argparse.Namespace, result: dict[str, Any], width: int | str | None = "terminal"
) -> list[str]:
    """What ``compactnn eval`` prints: the quality line, the table and its footnote, the
    stored bits, the timing's conditions (and a line when its threads oversubscribe the
    CPUs), then the notes under a heading (as ``compress`` prints its notes under its
    summary), so the table starts the output. The table fits ``width`` columns (by default
    the terminal's, :func:`compactnn.commands.term_table.terminal_width`; None: a pipe's
    aligned table whatever its width)."""
    width = terminal_width() if width == "terminal" else width
    table = text_table(table_columns(result), table_rows(result), width)
    lines = [quality_line(result), *table]
    if (footnote := suspect_footnote(result)) is not None:
        lines.append(footnote)
    lines += [bits_line(result["stored_bits"], result.get("float_weights"))]
    lines += [conditions(args, result)]
    if (over := oversubscribed_note(args.threads)) is not None:  # beside the thread count
        lines.append(over)
    notes = list(dict.fromkeys(result["notes"]))
    return lines + (["notes:", *(f"  {note}" for note in notes)] if notes else [])
