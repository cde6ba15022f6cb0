"""``compactnn.search``: a per-layer mixed-precision recipe under a size, BOPs or quality budget.

The flow: list the model's quantizable layers, score every (layer, format) on calibration
data (:mod:`~compactnn.mixed_precision.sensitivity`), price it exactly
(:mod:`~compactnn.mixed_precision.cost`), allocate with an integer program
(:mod:`~compactnn.mixed_precision.allocate`), optionally shrink the budget until a user
evaluation function says the quality drop is within ``max_drop``
(:mod:`~compactnn.mixed_precision.accuracy`), and write the result as an ordinary recipe: one
step per format used, each naming its layers.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from compactnn.api import compress
from compactnn.core.calib import call_model, detect_call_mode
from compactnn.core.modules import eval_mode
from compactnn.errors import CompactnnError, name_list, user_stacklevel
from compactnn.mixed_precision.accuracy import (
    accuracy_search,
    check_drop_vs_baseline,
    check_max_drop,
    check_max_evals,
    quality_of,
    trial_dict,
)
from compactnn.mixed_precision.allocate import (
    allocate,
    allocate_with_groups,
    assignment_total,
    frontier,
)
from compactnn.mixed_precision.budget import (
    budget_given,
    check_reachable,
    checked_request,
    group_floor,
    latency_verdict,
    tighter_failure,
    warn_unbound,
    worst_ratio,
)
from compactnn.mixed_precision.cost import biased_layers, cost_tables, count_macs
from compactnn.mixed_precision.formats import (
    Format,
    check_allowed,
    fallback_format,
    parse_formats,
    warn_untrained,
)
from compactnn.mixed_precision.groups import (
    Group,
    check_group_request,
    group_step,
    measure_groups,
    prunable,
)
from compactnn.mixed_precision.latency import (
    check_deployable,
    measure_table,
    whole_model_check,
)
from compactnn.mixed_precision.layers import (
    calib_batches,
    end_layers,
    searched_layers,
    searched_model,
    tied_heads_left_out,
)
from compactnn.mixed_precision.result import Budget, SearchResult
from compactnn.mixed_precision.sensitivity import SensitivityCache, sensitivity
from compactnn.recipe import Recipe, Step, parse_short_name


def build_recipe(
    name: str,
    layers: list[str],
    formats: list[Format],
    choice,
    embeddings: str | None = None,
    groups: list[tuple[tuple[str, ...], float]] | None = None,
    tables: Sequence[str] = (),
) -> Recipe:
    """One step per format used (largest share first), each naming exactly its layers;
    ``ch<P>+`` formats add one channel-pruning step per ratio before them.

    ``embeddings`` (a short name) adds a final step for the embedding tables only, or, when
    ``tables`` is given (the tables' and their tied heads' names), for exactly those modules:
    compress quantizes a tied head only in the step that quantizes its table.
    ``groups`` (layers, ratio) are pruned residual groups: their layers join the
    channel-pruning step of that ratio (the dependency graph prunes the whole stream).
    """
    by_format: dict[int, list[str]] = {}
    for layer, j in zip(layers, choice, strict=True):
        by_format.setdefault(int(j), []).append(layer)
    ordered = sorted(by_format.items(), key=lambda g: -len(g[1]))
    by_ratio: dict[float, list[str]] = {}  # ch<P>+ formats: pruning first, one step per ratio
    for j, names in ordered:
        if formats[j].prune:
            by_ratio.setdefault(formats[j].prune, []).extend(names)
    for members, r in groups or []:
        if r:
            by_ratio.setdefault(r, []).extend(members)
    steps = [group_step(n, r) for r, n in sorted(by_ratio.items())]
    steps += [formats[j].step(names) for j, names in ordered]
    if embeddings is not None:
        step = parse_short_name(embeddings).steps[0]
        targets = dataclasses.replace(step.targets, classes=("Embedding",))
        if tables:
            targets = dataclasses.replace(
                step.targets, classes=("Embedding", "Linear"), names=tuple(tables)
            )
        config = step.config  # the asked format for every table and tied head: the
        if hasattr(config, "first_last_bits"):  # head is no "last layer" kept at 8 bits
            config = dataclasses.replace(config, first_last_bits=None)
        steps.append(Step(step.method, config, targets))
    return Recipe(name, tuple(steps))


def _allowed(
    layers: dict[str, nn.Module],
    formats: list[Format],
    first_last_min_bits,
    shrinks: dict[float, list[bool]] | None = None,
    ends: set[str] | None = None,
) -> np.ndarray:
    allowed = np.array([[f.fits(m) for f in formats] for m in layers.values()])
    for j, f in enumerate(formats):
        if f.prune:
            allowed[:, j] &= np.array((shrinks or {})[f.prune], bool)
    if first_last_min_bits is not None:
        names = list(layers)
        ends = ends if ends is not None else {names[0], names[-1]}
        for i in sorted(names.index(n) for n in ends):
            allowed[i] &= np.array([f.weight.bits >= first_last_min_bits for f in formats])
    return allowed


def search(
    model: nn.Module,
    *,
    formats: Sequence[str] | str,
    budget: Budget | None = None,
    calib_data: Any = None,
    eval_fn: Callable[[nn.Module], float] | None = None,
    max_drop: float | None = None,
    measure: str = "measured",
    first_last_min_bits: int | None = None,
    embeddings: str | None = None,
    sensitivity_batches: int = 4,
    max_evals: int = 8,
    frontier_points: int = 8,
    cache_dir: str | Path | None = None,
    latency_example: Any = None,
    groups: bool | None = None,
    latency_rounds: int = 5,
    name: str = "searched",
    progress: bool = True,
) -> SearchResult:
    """Search a per-layer format assignment; return it as a recipe with its evidence.

    Args:
        model: the float model (never modified).
        formats: candidate formats, short names (``["w2-g32-gptq", "w3-g32-gptq",
            "w4-g32-gptq", "w8-g32-gptq"]``, ``"w2a8,w3a8,w4a8,w8a8"``).
        budget: size / average-bits / BOPs / latency limits, a :class:`Budget` or a dict of
            its fields (``{"avg_bits": 3}``); required unless ``eval_fn`` is given. A limit
            that every allowed assignment meets does not bind (a warning says so).
        calib_data: calibration inputs (the training split: the search never needs held-out
            data, only ``eval_fn`` should read it).
        eval_fn: ``eval_fn(compressed_model) -> quality`` (one finite number, higher is
            better; anything else is refused, naming what it returned) for the
            accuracy-aware mode; called on the float model once and on at most ``max_evals``
            compressed models.
        max_drop: the largest allowed ``eval_fn(model) - eval_fn(compressed)``, >= 0 and
            below a positive ``eval_fn(model)`` (else even a quality of 0 would pass).
        measure: ``"measured"`` (output error with one layer rounded) or ``"hessian"``
            (HAWQ-V2 Hutchinson trace times the rounding error).
        first_last_min_bits: the model's first and last layers (the first and last to run,
            as ``first_last_bits`` counts them) take only formats of at least this many
            weight bits (1 to 16, or None).
        embeddings: a short name for the embedding tables (e.g. ``"w3-g32"``); None leaves
            them in float. Not priced. A Linear tied to a table (an LM head) is never
            searched (``result.left_out``, with a warning): this step quantizes it with its
            table; without it, both stay in float.
        sensitivity_batches: calibration batches the sensitivity is measured on.
        max_evals: full evaluations allowed in accuracy-aware mode.
        frontier_points: budgets on the reported byte frontier.
        cache_dir: folder of ``sensitivity.json`` (cached per model, data and format).
        latency_example: an input batch: builds the per-layer latency table on the deploy
            runtime (each format deployed and timed) and checks the result end to end.
        groups: residual-group candidates (:mod:`~compactnn.mixed_precision.groups`): the
            channels of a whole residual stream pruned together at the ``ch<P>+`` formats'
            ratios, one exclusive choice each. None (default): on with a latency budget and
            ``ch<P>+`` formats, off otherwise; not with ``eval_fn``.
        latency_rounds: whole-model checks allowed with a latency budget: while the measured
            ratio (the larger of wall and CPU time) exceeds the budget, the table's budget is
            scaled by ``budget / measured`` and the allocation solved again. The last check
            decides ``result.budget["met"]``; a miss warns (measured vs budget, why it stopped).
        name: the recipe's name.
        progress: show progress bars.

    Example:
        >>> r = search(model, formats="w2a8,w4a8,w8a8", budget=Budget(avg_bits=4),
        ...            calib_data=images)  # doctest: +SKIP
        >>> qmodel = compactnn.compress(model, r.recipe, calib_data=images)  # doctest: +SKIP
    """
    args = dict(locals())
    # as compress runs it: a train-mode model's BatchNorm statistics stay, and eval_fn scores
    # the float model as it scores the compressed ones (in eval mode)
    with eval_mode(model):
        return _search(**args)


def _search(
    model: nn.Module,
    *,
    formats,
    budget,
    calib_data,
    eval_fn,
    max_drop,
    measure,
    first_last_min_bits,
    embeddings,
    sensitivity_batches,
    max_evals,
    frontier_points,
    cache_dir,
    latency_example,
    groups,
    latency_rounds,
    name,
    progress,
) -> SearchResult:
    """The body of :func:`search`, on ``model`` in eval mode."""
    start = time.perf_counter()
    fmts = parse_formats(list(formats) if not isinstance(formats, str) else formats)
    budget = checked_request(budget, first_last_min_bits)  # a dict of Budget fields is one
    if budget is None and (eval_fn is None or max_drop is None):
        raise CompactnnError(
            "search needs a budget (Budget(max_bytes=..., avg_bits=..., max_bops=...)) or "
            "eval_fn= with max_drop= (the accuracy-aware mode)."
        )
    if (eval_fn is None) != (max_drop is None):
        raise CompactnnError("eval_fn and max_drop go together: pass both or neither.")
    if max_drop is not None:
        max_drop = check_max_drop(max_drop)
        check_max_evals(max_evals)  # before the float model's evaluation
    has_latency = budget is not None and budget.max_latency_ratio is not None
    use_groups = check_group_request(fmts, groups, has_latency and eval_fn is None)
    if use_groups and eval_fn is not None:
        raise CompactnnError("groups=True does not combine with eval_fn (accuracy-aware mode).")
    if not isinstance(latency_rounds, int) or latency_rounds < 1:
        raise CompactnnError(f"latency_rounds={latency_rounds!r} must be an integer >= 1.")
    batches = calib_batches(model, calib_data)  # refused in one line if the model cannot run it
    warn_untrained(fmts)  # training-aware formats: calibrated only, not trained
    baseline = None  # the float model's quality: first, so a useless max_drop costs nothing
    if eval_fn is not None:
        baseline = quality_of(eval_fn(model), "the float model")
        check_drop_vs_baseline(float(max_drop), baseline)
    view = searched_model(model, fmts)  # its layers are those compress quantizes
    layers = searched_layers(view, batches)
    names = list(layers)
    left_out = tied_heads_left_out(view, embeddings)  # quantized with their tables or float
    if left_out:  # e.g. "search left out lm_head: tied to the embedding table ..."
        why = next(iter(left_out.values()))
        warnings.warn(
            f"search left out {name_list(list(left_out), 3)}: {why}", stacklevel=user_stacklevel()
        )
    tables = [n for n, m in view.named_modules() if isinstance(m, nn.Embedding)]
    if embeddings is not None and not tables:  # an empty step would only mislead
        warnings.warn(
            f"embeddings={embeddings!r} ignored: the model has no embedding table "
            "(nn.Embedding); drop embeddings=.",
            stacklevel=user_stacklevel(),
        )
        embeddings = None
    tables = [*tables, *left_out] if left_out else []
    shrinks = {
        f.prune: prunable(view, names, f, batches) for f in fmts if f.prune
    }  # which layers each pruning ratio can shrink (not those tied to a residual add)
    ends = end_layers(view, layers, batches) if first_last_min_bits is not None else None
    allowed = _allowed(layers, fmts, first_last_min_bits, shrinks, ends)
    check_allowed(layers, fmts, allowed, first_last_min_bits, ends)  # names who and why
    mode = detect_call_mode(view, batches[0])
    macs = count_macs(view, layers, lambda m: call_model(m, batches[0], mode))
    costs = cost_tables(layers, fmts, macs, biased_layers(view, names))  # folded BN biases
    cache = SensitivityCache(Path(cache_dir) / "sensitivity.json" if cache_dir else None)
    scores = sensitivity(
        view,
        names,
        fmts,
        batches[:sensitivity_batches],
        measure=measure,
        cache=cache,
        progress=progress,
    )
    scores = np.where(allowed, np.nan_to_num(scores, nan=0.0), 0.0)
    n_weights = float(sum(m.weight.numel() for m in layers.values()))
    limits = budget.limits({"code_bits": n_weights}) if budget is not None else {}
    lat: dict[str, Any] = {}
    if latency_example is not None or (budget is not None and budget.max_latency_ratio):
        lat = _latency_costs(
            model, names, fmts, batches, latency_example, macs, embeddings, allowed, tables
        )
        costs["latency"] = lat.pop("table")
        if budget is not None and budget.max_latency_ratio is not None:
            limits["latency"] = budget.max_latency_ratio * lat["per_format_ms"][lat["widest"]]
    table = costs
    found: list[Group] = []
    if use_groups:
        widest = max(fmts, key=lambda f: (f.weight.bits, f.act.bits if f.act else 32, -f.prune))
        found = measure_groups(
            model,
            names,
            sorted({f.prune for f in fmts if f.prune}),
            widest,
            lat.pop("uniform", None),
            batches,
            latency_example,
            [macs[n] for n in names],
            (lat["models"][lat["widest"]], lat["per_format_ms"][lat["widest"]]) if lat else None,
            sensitivity_batches,
        )
    lat.pop("uniform", None)

    def solve_all(lim: dict[str, float]) -> np.ndarray:
        if not found:
            return allocate(scores, table, lim, allowed)
        c, picks = allocate_with_groups(
            scores, table, lim, allowed, [(g.scores, g.costs) for g in found]
        )
        for g, k in zip(found, picks, strict=True):
            g.choice = k
        return c

    ref_ms = lat["per_format_ms"][lat["widest"]] if lat else None
    check_reachable(budget, table, allowed, found, n_weights, ref_ms)
    warn_unbound(budget, table, allowed, found, n_weights, ref_ms)  # a limit that cannot bite
    choice = solve_all(limits) if limits else None
    tried: list[dict[str, Any]] = []
    given = budget_given(budget, max_drop, max_evals)
    if eval_fn is not None:

        def evaluate(c: np.ndarray) -> float:
            recipe = build_recipe(name, names, fmts, c, embeddings, tables=tables)
            qmodel = compress(model, recipe, calib_data=batches, progress=False)
            return quality_of(eval_fn(qmodel), "a compressed model")

        def solve(b: float) -> np.ndarray:
            return allocate(
                scores, table, {**limits, "bytes": min(b, limits.get("bytes", b))}, allowed
            )

        best, trials = accuracy_search(
            solve,
            evaluate,
            scores,
            costs["bytes"],
            allowed,
            baseline=baseline,
            max_drop=float(max_drop),
            max_evals=max_evals,
        )
        tried = [trial_dict(t, names, [f.name for f in fmts]) for t in trials]
        if best is None:
            raise CompactnnError(
                f"no configuration within budget meets max_drop={max_drop}: the largest one "
                f"tried dropped {trials[0].drop:.4g}; add a larger format or raise max_drop."
            )
        choice = best
        chosen = next(t for t in trials if t.choice == tuple(int(j) for j in best))
        given.update(baseline=baseline, quality=chosen.quality, drop=chosen.drop)
    points = [
        {
            "bytes": c,
            "predicted": p,
            "assignment": {n: fmts[j].name for n, j in zip(names, ch, strict=True)},
        }
        for c, p, ch in frontier(scores, costs["bytes"], allowed, frontier_points)
    ]

    def pruned_groups() -> list[tuple[tuple[str, ...], float]]:
        return [(g.layers, g.ratio) for g in found if g.choice]

    def group_total(key: str) -> float:
        return sum(float(g.costs[key][g.choice]) for g in found if key in g.costs)

    recipe = build_recipe(name, names, fmts, choice, embeddings, pruned_groups(), tables)
    if lat:
        reference = (lat["widest"], lat.pop("models")[lat["widest"]])
        lat["checks"] = []
        stop = None  # why no further round was tried with the budget missed
        for round_ in range(latency_rounds if has_latency else 1):
            proxy = assignment_total(costs["latency"], choice) + group_total("latency")
            check = whole_model_check(model, recipe, batches, latency_example, proxy, reference)
            # sessions differ in load: compare the proxy's ratio with the measured ratios
            check["proxy_ratio"] = proxy / lat["per_format_ms"][lat["widest"]]
            check["proxy_ratio_error"] = check["proxy_ratio"] / check["cpu_ratio"] - 1
            lat["checks"].append(
                {
                    **check,
                    "latency_limit_ms": limits.get("latency"),
                    "assignment": {n: fmts[j].name for n, j in zip(names, choice, strict=True)},
                    "groups": {",".join(g.layers): g.ratio for g in found},
                }
            )
            worst = worst_ratio(check)
            if not has_latency or worst <= budget.max_latency_ratio:
                break
            if round_ + 1 == latency_rounds:
                stop = f"all latency_rounds={latency_rounds} whole-model checks were spent"
                break
            tighter = limits["latency"] * budget.max_latency_ratio / worst
            try:
                choice = solve_all({**limits, "latency": tighter})
            except CompactnnError:  # nothing faster in the table: the last check stands
                stop = tighter_failure(tighter, group_floor(table, allowed, found, "latency"))
                break
            limits["latency"] = tighter
            recipe = build_recipe(name, names, fmts, choice, embeddings, pruned_groups(), tables)
        lat["check"] = lat["checks"][-1]
        if has_latency:  # measured, not priced: the one limit that can be missed
            given.update(latency_verdict(lat["check"], budget.max_latency_ratio, stop))
    cost = {k: assignment_total(v, choice) + group_total(k) for k, v in costs.items()}
    if "code_bits" in cost and n_weights:  # what Budget(avg_bits=) bounds: the kept weights'
        cost["avg_bits"] = cost["code_bits"] / n_weights  # code bits over the unpruned count
        cost["weights"] = n_weights
    return SearchResult(
        recipe=recipe,
        assignment={n: fmts[j].name for n, j in zip(names, choice, strict=True)},
        layers=names,
        formats=[f.name for f in fmts],
        scores=scores,
        costs=costs,
        predicted=assignment_total(scores, choice),
        cost=cost,
        frontier=points,
        tried=tried,
        baseline=baseline,
        seconds=time.perf_counter() - start,
        latency=lat,
        groups=[g.to_dict() for g in found],
        budget=given,
        left_out=left_out,
    )


def _latency_costs(
    model, names, fmts, batches, example, macs, embeddings, allowed, tables=()
) -> dict[str, Any]:
    """Per-layer latency table (uniform deployments of each format, timed side by side)."""
    if example is None:
        raise CompactnnError("a latency budget needs latency_example= (an input batch).")
    check_deployable(fmts)
    w = max(range(len(fmts)), key=lambda k: (fmts[k].weight.bits, fmts[k].act.bits, -fmts[k].prune))
    widest = fmts[w].name

    def uniform(c: np.ndarray) -> Recipe:  # a uniform choice, unfit layers on their fallback
        j = int(c[0])
        c = np.where(allowed[:, j], j, fallback_format(fmts, j, w))
        return build_recipe("uniform", names, fmts, c, embeddings, tables=tables)

    table, per_format, models = measure_table(
        model,
        [f.name for f in fmts],
        uniform,
        names,
        batches,
        example,
        [macs[n] for n in names],
        reference=widest,
    )
    return {
        "table": table,
        "per_format_ms": per_format,
        "widest": widest,
        "models": models,
        "uniform": uniform(np.full(len(names), w)),
    }


def uniform_choice(formats: list[str], fmt: str, n_layers: int, first_last: str | None = None):
    """Format indices of a uniform assignment (``first_last`` for the first and last layers),
    to price and compare uniform recipes with the search's cost model."""
    choice = np.full(n_layers, formats.index(fmt))
    if first_last is not None:
        choice[[0, -1]] = formats.index(first_last)
    return choice
