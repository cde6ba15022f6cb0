"""How :func:`compactnn.report.build_report` scores quality: top-1 (or the user's
``metric(outputs, labels)``) on labelled data; on inputs alone, next-token perplexity for a
Hugging Face causal language model (lower is better), else the mean cosine of each sample's
outputs with the float model's (higher is better).

Example:
    >>> inputs, labels = split_data({"input_ids": torch.zeros(2, 5, dtype=torch.long)})
    >>> labels is None, higher_is_better("perplexity"), higher_is_better("cosine")
    (True, False, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from compactnn.core.calib import (
    as_batches,
    batch_size_of,
    call_model,
    expected_inputs,
    input_spec,
)
from compactnn.core.tokens import check_token_ids
from compactnn.errors import CompactnnError, first_line
from compactnn.measure import evaluate, fmt_quality, output_fidelity
from compactnn.measure.perplexity import is_causal_lm, nll_totals
from compactnn.measure.timing import timing_suspect
from compactnn.training.data import as_eval_data, keyword_split, labelled_keys, split_note

Metric = str | Callable[[torch.Tensor, torch.Tensor], float]  # as compactnn.evaluate
LOWER_IS_BETTER = frozenset({"perplexity"})
UNLABELLED = ("perplexity", "cosine")
EVAL_BATCH = 256  # labelled samples per forward pass
TOKEN_BATCH = 32  # unlabelled samples (sequences) per forward pass
QUALITY_HEADERS = {"perplexity": "perplexity (lower is better)", "cosine": "output cosine"}
SIMULATED = "simulated"  # the runtime of a row no runtime delivered (no speedup claimed)


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` (a name) is the better model."""
    return metric not in LOWER_IS_BETTER


def split_data(data: Any) -> tuple[Any, torch.Tensor | None]:
    """``(inputs, labels)`` of labelled data (:func:`as_eval_data`'s forms), or
    ``(inputs, None)`` for inputs alone: a tensor, or a dict of keyword tensors (a
    tokenizer's ``input_ids``/``attention_mask``) without labels; a dict holding only
    ``x`` (or ``inputs``) gives that tensor.

    Example:
        >>> split_data(torch.zeros(3, 2))[1] is None
        True
        >>> ids, y = torch.ones(2, 4).long(), torch.tensor([0, 1])
        >>> inputs, y = split_data({"input_ids": ids, "y": y})
        >>> sorted(inputs), y.tolist()
        (['input_ids'], [0, 1])
    """
    if isinstance(data, torch.Tensor):
        return data, None
    if isinstance(data, dict) and (pair := keyword_split(data, "eval")) is not None:
        return pair  # labels beside keyword inputs (input_ids, attention_mask, y)
    if isinstance(data, dict) and labelled_keys(data, "eval") is None:
        if len(data) == 1 and isinstance(data.get("x", data.get("inputs")), torch.Tensor):
            return next(iter(data.values())), None
        if data and all(isinstance(v, torch.Tensor) for v in data.values()):
            return dict(data), None
    return as_eval_data(data, what="data")


def split_used(data: Any) -> str | None:
    """A note naming the split scored when labelled ``data`` holds two (a dict or a data
    set with ``x_train``/``y_train`` beside ``x_test``/``y_test``), else None.

    Example:
        >>> y = torch.tensor([0, 1])
        >>> split_used({"x_train": torch.zeros(2, 3), "y_train": y, "x_test": torch.ones(2, 3),
        ...             "y_test": y})
        'the data holds x_train/y_train and x_test/y_test: using x_test/y_test (the held-out ...)'
    """
    if isinstance(data, dict):
        names = [k for k, v in data.items() if isinstance(v, torch.Tensor)]
    else:
        names = [k for k in ("x_train", "y_train", "x_test", "y_test") if hasattr(data, k)]
    keys = labelled_keys(names, "eval")
    note = split_note(names, keys, "the data") if keys is not None else None
    return note and note.replace("split)", "split; x_train/y_train not used)")


def resolve_metric(metric: Metric | None, model: nn.Module, labelled: bool) -> Metric:
    """The metric to score with (None: ``"top1"`` on labelled data, else ``"perplexity"``
    for a causal LM and ``"cosine"`` for any other model); refuses, before any slow work, a
    metric the data or the model cannot give.

    Raises:
        CompactnnError: an unknown metric, a labelled metric on inputs alone (or the other
            way round), or perplexity of a model that is not a causal language model.
    """
    if metric is None:
        return "top1" if labelled else ("perplexity" if is_causal_lm(model) else "cosine")
    if not callable(metric) and metric not in ("top1", *UNLABELLED):
        raise CompactnnError(
            f"metric={metric!r} is unknown: use 'top1' or a function metric(outputs, labels) "
            "-> float (the batch mean, as compactnn.evaluate takes) with labelled data, or "
            "'perplexity' / 'cosine' with inputs alone."
        )
    if labelled and metric in UNLABELLED:
        raise CompactnnError(
            f"metric={metric!r} scores inputs alone, but the data has labels: pass the inputs "
            "without labels (y), or leave metric out for top-1."
        )
    if not labelled and metric not in UNLABELLED:
        raise CompactnnError(
            f"metric={metric!r} needs labels, and the data has none: pass (inputs, labels) "
            "or a dict with x/y, or leave metric out (perplexity or output cosine)."
        )
    if metric == "perplexity" and not is_causal_lm(model):
        raise CompactnnError(
            f"metric='perplexity' needs a Hugging Face causal language model, and "
            f"{type(model).__name__} is not one: use metric='cosine' (or leave it out)."
        )
    return metric


def metric_name(metric: Metric) -> str:
    """The metric's name in the report (a function's ``__name__``)."""
    return metric if isinstance(metric, str) else getattr(metric, "__name__", "metric")


def check_runs(model: nn.Module, inputs: Any, what: str = "data") -> list:
    """The batches of unlabelled ``inputs``, once the float ``model`` (in eval mode) ran on
    the first: token ids it cannot take (:func:`check_token_ids`), or inputs of the wrong
    shape or dtype, are refused in one line naming both."""
    check_token_ids(model, inputs, what, resave=False)
    batches = as_batches(inputs, TOKEN_BATCH)
    try:
        with torch.no_grad():
            call_model(model, batches[0])
    except (RuntimeError, TypeError, ValueError, IndexError, AssertionError) as exc:
        raise CompactnnError(
            f"{what} does not fit the model: it holds {input_spec(batches[0])} "
            f"({first_line(exc)}). Pass {expected_inputs(model, None, batches[0])}."
        ) from exc
    return batches


def samples(inputs: Any) -> int:
    """Number of samples (rows) of a tensor or keyword-tensor inputs."""
    return batch_size_of(inputs)


def perplexity(model: nn.Module, batches: list) -> tuple[float, int]:
    """Next-token perplexity of ``model`` over ``batches`` and the number of scored targets
    (padding and positions predicted from padding left out)."""
    total, count = nll_totals(model, batches)
    if not count:
        raise CompactnnError(
            "data has no next token to predict: perplexity needs sequences of at least 2 real "
            "tokens (attention_mask 1)."
        )
    return math.exp(total / count), int(count)


def scorer(
    metric: Metric, float_model: nn.Module, inputs: Any, labels: torch.Tensor | None, batches
) -> Callable[[nn.Module], float]:
    """``score(model) -> float``: ``metric`` of a model on the data (``batches``: the
    unlabelled inputs in batches, from :func:`check_runs`; cosine is against
    ``float_model``'s outputs)."""
    if labels is not None:
        return lambda m: evaluate(m, (inputs, labels), metric=metric, batch_size=EVAL_BATCH)
    if metric == "perplexity":
        return lambda m: perplexity(m, batches)[0]
    return lambda m: output_fidelity(float_model, m, batches)["cosine"]


def quality_cell(metric: str, value: float | None) -> str:
    """``"98.10%"`` (top-1), ``"0.9981"`` (cosine), ``"31.47"`` (perplexity)."""
    if metric == "perplexity" and value is not None and math.isfinite(value):
        return f"{value:.2f}"
    return fmt_quality(metric, value)


def delta_cell(metric: str, value: float, base: float) -> str:
    """The "vs float" cell: the difference from the float model's ``base`` (top-1 in
    points); for a lower-is-better metric, also the ratio and whether it is worse.

    Example:
        >>> delta_cell("perplexity", 33.0, 30.0), delta_cell("top1", 97.5, 98.0)
        ('+3.00 (1.100x, worse)', '-0.50 pt')
    """
    delta = value - base
    if metric not in LOWER_IS_BETTER:
        return fmt_quality(metric, delta, delta=True)
    if not (math.isfinite(delta) and base):
        return "n/a"
    ratio = f"{value / base:.3f}x"
    if ratio == "1.000x":  # no visible difference: no verdict
        return f"{delta:+.2f} ({ratio})"
    return f"{delta:+.2f} ({ratio}, {'worse' if delta > 0 else 'better'})"


def pareto_front(points: list[tuple[float, float]], higher: bool) -> list[bool]:
    """Which ``(cost, quality)`` points are on the Pareto front: no other point costs no
    more and is no worse, and strictly better in one (``higher``: larger quality is better).

    Example:
        >>> pareto_front([(1, 90), (2, 95), (3, 94)], higher=True)
        [True, True, False]
        >>> pareto_front([(1, 40), (2, 35), (3, 36)], higher=False)
        [True, True, False]
    """
    sign = 1 if higher else -1
    scored = [(c, sign * q) for c, q in points]
    return [
        not any(
            c2 <= c and q2 >= q and (c2 < c or q2 > q)
            for j, (c2, q2) in enumerate(scored)
            if j != i
        )
        for i, (c, q) in enumerate(scored)
    ]


def panel_rows(rows: list[dict[str, Any]], panel: str) -> list[dict[str, Any]]:
    """The rows drawn on a ``panel`` (``"size"`` or ``"latency"``): on the size panel, a row
    marked ``shares_size`` (the same artifact run another way) is not drawn twice."""
    return [r for r in rows if panel != "size" or not r.get("shares_size")]


def latency_suspect(row: dict[str, Any]) -> bool:
    """Whether ``row``'s latency looked inflated (its ``latency["suspect"]`` reasons): such a
    row is drawn on the latency panel but left out of its Pareto front.

    Example:
        >>> latency_suspect({"latency": {"suspect": ["busy"]}}), latency_suspect({"latency": {}})
        (True, False)
    """
    return timing_suspect(row.get("latency"))


def is_simulated(row: dict[str, Any]) -> bool:
    """Whether ``row`` ran as the simulated model (its ``runs_as``, or a demo row's
    ``runtime``, reads ``"simulated"``): it claims no speedup, so it is drawn on the latency
    panel but left off its Pareto front.

    Example:
        >>> is_simulated({"runs_as": "simulated"}), is_simulated({"runtime": "oneDNN int8"})
        (True, False)
    """
    return SIMULATED in (row.get("runs_as"), row.get("runtime"))


def off_latency_front(row: dict[str, Any]) -> bool:
    """Whether ``row`` is kept off the latency front: its timing looked inflated
    (:func:`latency_suspect`) or it ran simulated (:func:`is_simulated`)."""
    return latency_suspect(row) or is_simulated(row)


def front_mask(rows: list[dict[str, Any]], panel: str, costs: list[float]) -> list[bool]:
    """Which ``rows`` (drawn on ``panel`` at ``costs``) are on its Pareto front; on the
    latency panel a row whose timing looked inflated, or that ran simulated
    (:func:`off_latency_front`), is neither on the front nor allowed to push another row off it.

    Example:
        >>> rows = [{"metric": "top1", "quality": q, "latency": {"suspect": s}}
        ...         for q, s in ((90, []), (95, ["busy"]), (94, []))]
        >>> front_mask(rows, "latency", [1, 2, 3]), front_mask(rows, "size", [1, 2, 3])
        ([True, False, True], [True, True, False])
    """
    keep = [panel != "latency" or not off_latency_front(r) for r in rows]
    points = [(c, r["quality"]) for c, r, k in zip(costs, rows, keep, strict=True) if k]
    on = iter(pareto_front(points, row_higher_is_better(rows[0])) if rows else [])
    return [next(on) if k else False for k in keep]


def row_higher_is_better(row: dict[str, Any]) -> bool:
    """A row's direction: its ``higher_is_better`` field, else its metric's."""
    return bool(row.get("higher_is_better", higher_is_better(row["metric"])))


def front_labels(rows: list[dict[str, Any]], panel: str) -> list[str]:
    """Labels of the rows on the Pareto front of quality against size on disk
    (``panel="size"``) or median latency (``"latency"``, rows whose timing looked inflated
    and simulated rows left out: :func:`front_mask`), in the direction of the rows' metric
    (:func:`pareto_front`)."""
    rows = panel_rows(rows, panel)
    if not rows:
        return []
    cost = (lambda r: r["size_bytes"]) if panel == "size" else (lambda r: r["latency"]["median_s"])
    on = front_mask(rows, panel, [cost(r) for r in rows])
    return [r.get("label", r["recipe"]) for r, keep in zip(rows, on, strict=True) if keep]
