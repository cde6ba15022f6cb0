"""``pareto.png``: quality against size on disk (and optionally against latency), one
labelled point per recipe, one row of panels per model."""

from __future__ import annotations

import io
import math
from typing import Any

from compactnn._optional import require
from compactnn.report.labels import place
from compactnn.report.scoring import (
    front_mask,
    is_simulated,
    latency_suspect,
    panel_rows,
    row_higher_is_better,
)

require("matplotlib", "demo").use("Agg")  # files only; no display on servers or in CI
plt = require("matplotlib.pyplot", "demo")
_ticker = require("matplotlib.ticker", "demo")
Text = require("matplotlib.text", "demo").Text
FuncFormatter, LogLocator, NullFormatter = (
    _ticker.FuncFormatter,
    _ticker.LogLocator,
    _ticker.NullFormatter,
)

METRIC_LABELS = {
    "top1": "top-1 accuracy (%)",
    "cosine": "mean cosine vs float",
    "perplexity": "next-token perplexity (lower is better)",
}
# the quality axis stops at what the metric can reach (a flat top-1 of 98% drew 92..104%)
QUALITY_LIMITS = {"top1": (0.0, 100.0), "cosine": (-1.0, 1.0), "perplexity": (1.0, None)}
PANELS = ("size", "latency")
DPI = 110
LABEL_CHARS = 28  # a longer name is cut in the middle beside its point (tables keep it whole)
SIMULATED_TAG = " (simulated)"
SIMULATED_COLOR = "tab:gray"  # latency panel: simulated; hollow: timing looked inflated


def _x_values(rows: list[dict[str, Any]], panel: str) -> tuple[list[float], str]:
    """The x coordinates of ``rows`` on a ``panel`` and the axis label."""
    if panel == "latency":
        xs = [r["latency"]["median_s"] * 1e3 for r in rows]
        return xs, "latency (ms, median, log scale)"
    kib = max(r["size_bytes"] for r in rows) < 2**20  # small models read better in KiB
    xs = [r["size_bytes"] / (2**10 if kib else 2**20) for r in rows]
    return xs, f"artifact size on disk ({'KiB' if kib else 'MiB'}, log scale)"


def short_label(text: str, limit: int = LABEL_CHARS) -> str:
    """``text`` cut to ``limit`` characters by an ellipsis in the middle, so that both the
    start and the end (often what tells two recipes apart) stay readable.

    Example:
        >>> short_label("w4a8"), short_label("w4a8-all-layers-at-four-bits-2026-12-06", 20)
        ('w4a8', 'w4a8-all-l…026-12-06')
    """
    if len(text) <= limit:
        return text
    head = limit // 2
    tail = limit - 1 - head
    return text[:head] + "\u2026" + (text[-tail:] if tail else "")


def point_label(row: dict[str, Any], panel: str) -> str:
    """The text beside ``row``'s point on ``panel``: its label (else recipe), shortened
    (:func:`short_label`); on the latency panel ``" (simulated)"`` for a simulated row and
    ``" *"`` for a timing that looked inflated.

    Example:
        >>> row = {"recipe": "w8", "runs_as": "simulated", "latency": {"suspect": ["busy"]}}
        >>> point_label(row, "size"), point_label(row, "latency")
        ('w8', 'w8 (simulated) *')
    """
    label = row.get("label", row["recipe"])
    core = label.removesuffix(SIMULATED_TAG)
    text = short_label(core)
    if core != label or (panel == "latency" and is_simulated(row)):
        text += SIMULATED_TAG
    return text + (" *" if panel == "latency" and latency_suspect(row) else "")


def _style(row: dict[str, Any], panel: str) -> tuple[str, bool]:
    """A point's colour, and whether it is hollow: on the latency panel, grey for a
    simulated row, hollow grey for a timing that looked inflated."""
    if panel != "latency":
        return "tab:blue", False
    if latency_suspect(row):
        return SIMULATED_COLOR, True
    return (SIMULATED_COLOR if is_simulated(row) else "tab:blue"), False


def _clamp_quality(ax: Any, metric: str, quality: list[float]) -> None:
    """Stops the quality axis at the limit ``metric`` can reach (:data:`QUALITY_LIMITS`),
    never inside the data."""
    seen = [q for q in quality if isinstance(q, (int, float)) and math.isfinite(q)]
    floor, ceiling = QUALITY_LIMITS.get(metric, (None, None))
    if not seen:
        return
    low, high = ax.get_ylim()
    if floor is not None:
        low = max(low, min(floor, *seen))
    if ceiling is not None:
        high = min(high, max(ceiling, *seen))
    ax.set_ylim(low, high)


def _panel(ax: Any, rows: list[dict[str, Any]], panel: str, title: str) -> list[Any]:
    """One scatter of quality against ``panel`` ("size" or "latency"), its Pareto front
    (in the direction of the rows' metric) ringed and joined by a dashed line; on the size panel a
    row marked ``shares_size`` (the same artifact run another way) is not drawn twice; on the
    latency panel a simulated row is drawn grey and labelled ``(simulated)``, a row whose timing
    looked inflated is drawn hollow and labelled ``*``, and both are left off the front
    (:func:`compactnn.report.scoring.front_mask`). Returns the labels, placed later by
    :func:`_declutter`."""
    rows = panel_rows(rows, panel)
    xs, xlabel = _x_values(rows, panel)
    quality = [r["quality"] for r in rows]
    styles = [_style(r, panel) for r in rows]
    for style in dict.fromkeys(styles):  # one line per style: blue, grey, hollow grey
        pts = [(x, y) for x, y, st in zip(xs, quality, styles, strict=True) if st == style]
        color, face = style[0], "none" if style[1] else style[0]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle="none", marker="o",
                color=color, markerfacecolor=face, clip_on=False)  # fmt: skip
    on = front_mask(rows, panel, xs)
    front = sorted((x, y) for x, y, keep in zip(xs, quality, on, strict=True) if keep)
    if front:  # an empty unclipped line would still claim room at the figure's corner
        ax.plot([p[0] for p in front], [p[1] for p in front], linestyle="--",
                drawstyle="steps-post", color="tab:green", alpha=0.7, marker="o", markersize=12,
                markerfacecolor="none", clip_on=False)  # fmt: skip
    labels = []
    for r, x, y, (_color, hollow) in zip(rows, xs, quality, styles, strict=True):
        if r["recipe"] == "float":
            ax.plot([x], [y], marker="*", markersize=14, color="tab:orange", linestyle="none",
                    markerfacecolor="none" if hollow else "tab:orange", clip_on=False)  # fmt: skip
        at = {"textcoords": "offset points", "xytext": (5, 5), "ha": "left", "va": "bottom"}
        leader = {"arrowstyle": "-", "color": "0.55", "lw": 0.6, "shrinkA": 1, "shrinkB": 4}
        label = ax.annotate(
            point_label(r, panel), (x, y), fontsize=8, arrowprops=leader, parse_math=False, **at
        )  # a recipe name is text: '$x$' is not TeX, a bad '$\\foo{$' must not raise
        label.set_in_layout(False)  # kept inside the axes by _declutter; never shrinks them
        labels.append(label)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=_log_subs(xs)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.12, y=0.12)
    _clamp_quality(ax, rows[0]["metric"], quality)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(METRIC_LABELS.get(rows[0]["metric"], rows[0]["metric"]))
    ax.ticklabel_format(axis="y", useOffset=False)  # 79.99, not "+7.999e1" over 0.001 steps
    ax.set_title(title, parse_math=False)  # the model's name: text, not TeX
    ax.grid(True, which="both", alpha=0.3)
    return labels


def _log_subs(xs: list[float]) -> tuple[float, ...]:
    """Tick multiples for a log axis over ``xs``: 1-2-3-5-7 within a decade or so, fewer as
    the span (with the axis margins) widens, so tick labels do not run together.

    Example:
        >>> _log_subs([1.0, 4.0]), _log_subs([1.0, 30.0]), _log_subs([0.01, 100.0])
        ((1.0, 2.0, 3.0, 5.0, 7.0), (1.0, 2.0, 5.0), (1.0,))
        >>> _log_subs([5.0, 5.0])
        (1.0, 2.0, 5.0)
    """
    positive = [x for x in xs if x > 0]
    span = math.log10(max(positive) / min(positive)) if positive else 0.0
    if len(set(positive)) <= 1:
        span = 2.0  # one value: matplotlib widens the axis to about two decades around it
    if span <= 1.0:
        return (1.0, 2.0, 3.0, 5.0, 7.0)
    return (1.0, 2.0, 5.0) if span <= 2.5 else (1.0,)


def _declutter(fig: Any, panels: list[tuple[Any, list[Any]]]) -> None:
    """Moves each panel's labels off one another and off the points
    (:func:`compactnn.report.labels.place`), once the layout is final."""
    renderer = fig.canvas.get_renderer()
    to_points = 72.0 / fig.dpi
    for ax, labels in panels:
        if not labels:
            continue
        anchors = [tuple(ax.transData.transform(a.xy)) for a in labels]
        extents = [Text.get_window_extent(a, renderer) for a in labels]  # not the leader
        frame = ax.get_window_extent(renderer)
        boxes = place(
            anchors,
            [(e.width, e.height) for e in extents],
            bounds=(frame.x0, frame.y0, frame.x1, frame.y1),
        )
        for a, (x, y), box in zip(labels, anchors, boxes, strict=True):
            a.xyann = ((box[0] - x) * to_points, (box[1] - y) * to_points)
            a.update_positions(renderer)  # measured where it now stands (out of the layout)


def latency_legend(rows: list[dict[str, Any]]) -> str:
    """The caption's second line: what the latency panel draws apart and leaves off its
    front (``""`` when no row is simulated or timed inflated).

    Example:
        >>> latency_legend([{"runs_as": "simulated", "latency": {}}])
        '\\nlatency panel, off the front: grey, (simulated): ran simulated, no speedup claimed'
    """
    notes = []
    if any(latency_suspect(r) for r in rows):
        notes.append("hollow, *: timing looked inflated")
    if any(is_simulated(r) for r in rows):
        notes.append("grey, (simulated): ran simulated, no speedup claimed")
    return "\nlatency panel, off the front: " + "; ".join(notes) if notes else ""


def pareto_png(results: dict[str, Any], panels: tuple[str, ...] = ("size",)) -> bytes:
    """PNG bytes of the quality plot of ``results`` (a results dict with ``rows``).

    Args:
        results: ``{"rows": [...]}``; each row has ``model``, ``recipe``, ``metric``,
            ``quality``, ``size_bytes`` and (for the latency panel) ``latency.median_s``;
            an optional ``label`` replaces ``recipe`` beside the point, and ``shares_size``
            leaves a row off the size panel.
        panels: which x axes to draw per model: ``"size"`` and/or ``"latency"``.

    Example:
        >>> rows = [{"model": "m", "recipe": "float", "metric": "top1", "quality": 90.0,
        ...          "size_bytes": 4096, "latency": {"median_s": 0.001}}]
        >>> pareto_png({"rows": rows}, panels=("size", "latency"))[:4]
        b'\\x89PNG'
    """
    unknown = [p for p in panels if p not in PANELS]
    if unknown or not panels:
        raise ValueError(f"panels must be a non-empty subset of {PANELS}, got {panels!r}")
    models = list(dict.fromkeys(r["model"] for r in results["rows"])) or ["(none)"]
    ncols = len(panels) if len(models) == 1 else len(models)
    nrows = 1 if len(models) == 1 else len(panels)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(5.5 * ncols, 4.2 * nrows), squeeze=False, dpi=DPI
    )
    placed = []
    for m, model in enumerate(models):
        rows = [r for r in results["rows"] if r["model"] == model]
        for p, panel in enumerate(panels):
            ax = axes[0][p] if len(models) == 1 else axes[p][m]
            if rows:
                placed.append((ax, _panel(ax, rows, panel, model)))
    what = " and ".join(panels)
    ups = {row_higher_is_better(r) for r in results["rows"]}
    better = {frozenset({True}): "up and left", frozenset({False}): "down and left"}
    where = better.get(frozenset(ups or {True}), "left, and up or down as each axis says")
    fig.suptitle(
        f"quality vs {what} ({where} is better; ringed, dashed: Pareto front)"
        + latency_legend(results["rows"] if "latency" in panels else [])
    )
    fig.tight_layout()
    _declutter(fig, placed)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return buf.getvalue()
