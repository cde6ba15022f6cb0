"""``pareto.png`` in words, for a reader who cannot see it: an alt text saying what the
picture shows, and under it one sentence per panel naming the rows on its Pareto front and why
each other point is off it. Both come from the rows and functions that draw the picture
(:func:`compactnn.report.scoring.front_mask`, as ``results.json``'s ``pareto_front``)."""

from __future__ import annotations

from typing import Any

from compactnn.report.document import Block
from compactnn.report.plot import METRIC_LABELS
from compactnn.report.scoring import (
    front_mask,
    is_simulated,
    latency_suspect,
    off_latency_front,
    panel_rows,
    row_higher_is_better,
)

AXES = {"size": "size on disk", "latency": "median latency"}
NO_MORE = {"size": "no larger", "latency": "no slower"}
# why a point is drawn apart on the latency panel and left off its front (as plot._style)
OFF_LATENCY = {
    (True, True): "drawn hollow, labelled (simulated) *: ran simulated, no speedup claimed, "
    "and timing looked inflated",
    (True, False): "drawn hollow, labelled *: timing looked inflated",
    (False, True): "drawn grey, labelled (simulated): ran simulated, no speedup claimed",
}


def _name(row: dict[str, Any]) -> str:
    return str(row.get("label") or row.get("recipe", "?"))


def _names(names: list[str]) -> str:
    """``"a"``, ``"a and b"``, ``"a, b and c"``.

    Example:
        >>> _names(["a"]), _names(["a", "b", "c"])
        ('a', 'a, b and c')
    """
    if len(names) < 2:
        return "".join(names)
    return ", ".join(names[:-1]) + " and " + names[-1]


def _cost(row: dict[str, Any], panel: str) -> float:
    return row["size_bytes"] if panel == "size" else row["latency"]["median_s"]


def _beats(a: tuple[float, float], b: tuple[float, float], sign: int) -> bool:
    """Whether point ``a`` (cost, quality) dominates ``b``: costs no more, is no worse, and is
    strictly better in one (``sign`` 1: higher quality is better, -1: lower)."""
    (ca, qa), (cb, qb) = a, b
    return ca <= cb and sign * qa >= sign * qb and (ca < cb or sign * qa > sign * qb)


def panel_sentence(rows: list[dict[str, Any]], panel: str) -> str:
    """One panel of one model in words: the rows on its Pareto front (cheapest first), the
    rows left off it grouped by why (a front row that beats them, or on the latency panel an
    inflated timing or a simulated run), and on the size panel the rows not drawn (the same
    artifact as another row, run another way).

    Example:
        >>> rows = [{"recipe": r, "metric": "top1", "quality": q, "size_bytes": b}
        ...         for r, q, b in (("float", 90, 400), ("w8", 90, 100), ("w4", 85, 50))]
        >>> panel_sentence(rows, "size")
        'quality vs size on disk: on the Pareto front, w4 and w8; left off it: float (w8 is no larger and no worse).'
    """  # noqa: E501
    drawn = panel_rows(rows, panel)
    text = f"quality vs {AXES[panel]}: "
    if not drawn:
        return text + "no point drawn."
    costs = [_cost(r, panel) for r in drawn]
    on = front_mask(drawn, panel, costs)
    sign = 1 if row_higher_is_better(drawn[0]) else -1
    front = sorted(
        (
            (c, r["quality"], i)
            for i, (r, c, k) in enumerate(zip(drawn, costs, on, strict=True))
            if k
        )
    )
    off: dict[str, list[str]] = {}
    for r, c, keep in zip(drawn, costs, on, strict=True):
        if keep:
            continue
        if panel == "latency" and off_latency_front(r):
            why = OFF_LATENCY[latency_suspect(r), is_simulated(r)]
        else:
            by = [
                _name(drawn[i]) for fc, fq, i in front if _beats((fc, fq), (c, r["quality"]), sign)
            ]
            who = by[0] if by else "another row"
            why = f"{who} is {NO_MORE[panel]} and no worse"
        off.setdefault(why, []).append(_name(r))
    names = _names([_name(drawn[i]) for *_, i in front])
    text += f"on the Pareto front, {names}" if names else "no point on the Pareto front"
    if off:
        text += "; left off it: " + "; ".join(f"{_names(n)} ({why})" for why, n in off.items())
    hidden = [_name(r) for r in rows if not any(r is d for d in drawn)]
    if hidden:
        text += (
            f"; not drawn: {_names(hidden)} (each the same artifact as a row above it, run "
            "another way: the same size)"
        )
    return text + "."


def front_blocks(rows: list[dict[str, Any]], panels: tuple[str, ...]) -> list[Block]:
    """The words under ``pareto.png``: what its front is, then one :func:`panel_sentence`
    per model and panel (prefixed by the model's name when there are several)."""
    models = list(dict.fromkeys(r.get("model") for r in rows))
    items = []
    for model in models:
        mine = [r for r in rows if r.get("model") == model]
        for panel in panels:
            sentence = panel_sentence(mine, panel)
            items.append(f"{model}, {sentence}" if len(models) > 1 else sentence)
    lead = (
        "pareto.png in words: on each panel the Pareto front is the points that no other point "
        "beats (no costlier and no worse, better in one); the other points, and why they are "
        "off it:"
    )
    return [("p", lead), ("list", items)]


def alt_text(rows: list[dict[str, Any]], panels: tuple[str, ...]) -> str:
    """What ``pareto.png`` shows, for its ``<img>``'s alt: the quality metric against each
    panel's axis, one point per row (a pair of panels per model when there are several), the
    front's marking, and that the text below the picture names the points.

    Example:
        >>> alt_text([{"model": "m", "metric": "top1"}], ("size",))[:60]
        'Scatter plot of top-1 accuracy (%) against size on disk, one'
    """
    metrics = dict.fromkeys(METRIC_LABELS.get(r["metric"], r["metric"]) for r in rows)
    models = list(dict.fromkeys(r.get("model") for r in rows))
    plural = "s" if len(panels) > 1 or len(models) > 1 else ""
    per_model = f" (one set of panels per model: {_names(models)})" if len(models) > 1 else ""
    apart = [
        said
        for said, drawn in (
            ("grey points ran simulated", any(is_simulated(r) for r in rows)),
            ("hollow ones (*) had inflated timings", any(latency_suspect(r) for r in rows)),
        )
        if drawn and "latency" in panels
    ]
    latency = f"; on the latency panel {' and '.join(apart)}, off its front" if apart else ""
    return (
        f"Scatter plot{plural} of {' or '.join(metrics) or 'quality'} against "
        f"{' and against '.join(AXES[p] for p in panels)}, one point per row{per_model}; the "
        f"Pareto front is ringed and joined by a dashed line{latency}. The list below the "
        "picture names the points on each front."
    )
