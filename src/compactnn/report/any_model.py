"""A report for any model: the user's artifacts measured on the user's data.

:func:`build_report` loads each artifact directory into the user's float model, measures
quality (on labelled data top-1 by default, or a ``metric(outputs, labels) -> float`` batch
mean, as :func:`compactnn.evaluate` takes; on inputs alone next-token perplexity for a causal
language model, lower is better, else mean output cosine vs the float model:
:mod:`compactnn.report.scoring`), bytes on disk, and latency of the simulated model; where
:func:`compactnn.deploy` lowers an artifact to int8 kernels (w8a8 CNNs), or
:func:`compactnn.to_kernels` runs a transformer on low-bit kernels, that model gets its own
row, measured in the same interleaved timing rounds as the float model. With ``memory=True``
(``compactnn report`` unless ``--no-memory``) each row's delivered form is also rebuilt from
its artifact in a fresh process for its resident memory (:mod:`compactnn.report.resident`,
as the demo does). It writes
``report.md``, ``report.html``, ``pareto.png`` (quality vs size and vs latency, with the
Pareto front) and ``results.json``.

Example:
    >>> build_report(["out/w8a8", "out/w4a8"], model=net, data=(x_test, y_test),
    ...              out="out/report")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import compactnn
from compactnn.core.calib import call_model, main_output
from compactnn.core.progress import bar as progress_bar
from compactnn.errors import CompactnnError, first_line, name_list, user_stacklevel
from compactnn.export.artifact import artifact_exists, removed_if_failed
from compactnn.export.fs import writable_folder
from compactnn.measure import (
    DEFAULT_RUNS,
    DEFAULT_THREADS,
    artifact_bytes,
    first_rows,
    float_artifact_bytes,
    layer_formats,
    theoretical_bytes,
)
from compactnn.measure.environment import environment
from compactnn.measure.float_paths import fastest_float_path
from compactnn.measure.quality import no_better_than_guessing
from compactnn.measure.timing import omp_wait_policy
from compactnn.model_io import is_hf_model
from compactnn.report.any_model_table import SIMULATED, _blocks, folder_labels, resident_note
from compactnn.report.delivery import (
    DENSE_NO_SPEEDUP,
    deliver,
    deliver_float,
    deliver_probe_pruned,
    dense_note,
    float_path_name,
    is_plain_float,
    is_probe_pruned,
    same_dense_compute,
    slower_note,
    timing_suspect,
    untrained_label,
)
from compactnn.report.plot import pareto_png
from compactnn.report.scoring import (
    Metric,
    check_runs,
    front_labels,
    higher_is_better,
    metric_name,
    perplexity,
    resolve_metric,
    samples,
    scorer,
    split_data,
    split_used,
)
from compactnn.report.sources import (
    calibration_note,
    calibration_text,
    check_artifacts,
    check_float_model,
    given_as,
    own_calibration_note,
)
from compactnn.report.writer import write_files
from compactnn.training.data import as_eval_data, check_labels

FLOAT = "float"
FP32 = "fp32 eager"
DEPLOYED = "deployed"  # runs_as of a deployed row is the runtime's name ("oneDNN int8")
LATENCY_BATCH = 16  # samples per timed call, as in the demo report


def labelled_data(data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, labels)`` from a pair, a dict (``x``/``y``, ``x_test``/``y_test`` or
    ``inputs``/``labels``) or an object with ``x_test``/``y_test`` (the embedded splits): the
    forms ``compactnn.train`` takes as ``eval_data``.

    Raises:
        CompactnnError: the data has no labels, or inputs and labels differ in length.

    Example:
        >>> x, y = labelled_data({"x": torch.zeros(4, 3), "y": torch.arange(4)})
        >>> tuple(x.shape), y.tolist()
        ((4, 3), [0, 1, 2, 3])
    """
    return as_eval_data(data, what="data")


REPORT_FILES = ("report.md", "report.html", "pareto.png", "results.json")


def _leftover(name: str) -> bool:
    """A temporary file of a report write that was killed (``atomic_write``'s names)."""
    return any(name.startswith(f".{f}.") and name.endswith(".tmp") for f in REPORT_FILES)


def check_report_folder(out: str | os.PathLike, force: bool = False, cli: bool = False) -> Path:
    """Refuse, before any slow work, a report folder that cannot or should not be written.

    A new or empty folder is used; one holding only an earlier report (its
    ``REPORT_FILES``) is replaced only with ``force``; one holding anything else (an
    artifact, a Hugging Face model folder, the user's files) is refused even with ``force``,
    since the report would mix with or replace those files.

    Raises:
        CompactnnError: naming the folder and the way out (``--out`` / ``--force`` wording
            when ``cli``).

    Example:
        >>> check_report_folder("out/report", force=False)  # doctest: +SKIP
    """
    out = Path(out)
    label = f"--out {str(out)!r}" if cli else f"out={str(out)!r}"
    force_word = "--force" if cli else "force=True"
    if writable_folder(out, label) != out:  # a new folder (its nearest existing one writable)
        return out
    names = sorted(e.name for e in os.scandir(out) if not _leftover(e.name))
    if others := [n for n in names if n not in REPORT_FILES]:
        what = "a compactnn artifact" if artifact_exists(out) else "other files"
        raise CompactnnError(
            f"{label} holds {what} ({name_list(others, 3)}): the report would mix with or "
            f"replace them. Choose a new or empty folder, e.g. {str(out / 'report')!r} "
            f"({force_word} only replaces an earlier report)."
        )
    if names and not force:
        raise CompactnnError(
            f"{label} already holds a report ({name_list(names, 4)}); pass {force_word} to "
            "replace it or choose another folder."
        )
    return out


def _kind(model: nn.Module, example: Any) -> str:
    """A Hugging Face model, or one taking keyword inputs, is a transformer (delivered by
    ``to_kernels``); anything else a CNN (``deploy``), as ``compactnn eval`` decides."""
    return "transformer" if is_hf_model(model) or isinstance(example, dict) else "cnn"


def _try_deploy(qmodel: nn.Module, example: Any, notes: list[str]) -> Any:
    """``(delivered model, runtime name)`` of ``qmodel`` (``deploy(backend="auto")`` for a
    CNN, ``to_kernels`` for a transformer), or None (the reason goes to ``notes``)."""
    deployed, runtime, more = deliver(_kind(qmodel, example), qmodel, example)
    notes += more
    return None if runtime == SIMULATED else (deployed, runtime)


def check_top1_labels(model: nn.Module, x: Any, y: Any, where: str) -> None:
    """Every label a class index of ``model``'s logits (its output on two samples), checked
    on the whole data before any row is scored, naming the data as ``where``."""
    with torch.no_grad():
        out = call_model(model, first_rows(x, 2))
    logits = out if isinstance(out, torch.Tensor) else main_output(out)
    if isinstance(logits, torch.Tensor) and logits.dim() == 2 and isinstance(y, torch.Tensor):
        check_labels(y, int(logits.shape[1]), where=where)


def _row(label: str, runs_as: str, metric: str, quality: float, size: int) -> dict[str, Any]:
    return {"label": label, "runs_as": runs_as, "metric": metric, "quality": quality,
            "size_bytes": size, "notes": []}  # fmt: skip


def _measure(
    model: nn.Module,
    float_model: nn.Module,
    artifacts: list[Path],
    example: Any,
    score: Callable[[nn.Module], float],
    name: str,
    y: torch.Tensor | None,
    bar,
    quick: bool,
    headers: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows (float, then per artifact simulated and, when deliverable, delivered) and the
    callables to time, keyed like the rows' labels; ``score(model)`` is each row's quality
    (metric ``name``; ``y``: the labels, if any); a plain float artifact races the float
    paths the float row does (``quick``: without ``torch.compile``); a recipe given more
    than once is told apart by each artifact's folder (``headers``: theirs, in order)."""
    rows = [_row(FLOAT, FP32, name, score(float_model), 0)]
    rows[0] |= {"size_bytes": float_artifact_bytes(float_model), "recipe": FLOAT}
    rows[0] |= {"theoretical_bytes": theoretical_bytes(float_model), "layers": {}}
    guess = y is not None and name == "top1"
    if guess and (doubt := no_better_than_guessing(rows[0]["quality"], y, "the data")):
        warnings.warn(doubt, stacklevel=user_stacklevel())
        rows[0]["notes"].append(doubt)
    runners: dict[str, Any] = {FLOAT: float_model}
    folders, names = folder_labels(artifacts), []
    for path, folder, header in zip(artifacts, folders, headers, strict=True):
        bar.set_postfix_str(path.name)
        qmodel = compactnn.load(path, model=model).eval()
        info = compactnn.info_of(qmodel)
        recipe = info["recipe"].name if info.get("recipe") is not None else path.name
        untrained = untrained_label(info)  # a training recipe compressed without training
        named = recipe + untrained
        label = named if named not in runners else f"{named} ({folder})"
        names.append(named)
        row = _row(label, SIMULATED, name, score(qmodel), artifact_bytes(path))
        if untrained:
            row["notes"].append(
                "a training recipe calibrated without its training (compactnn compress): its "
                "post-training accuracy; `compactnn train` gives the trained model"
            )
        row |= {"recipe": recipe, "artifact": str(path), "layers": layer_formats(qmodel)}
        row |= {"theoretical_bytes": theoretical_bytes(qmodel)}
        row["float_layers"] = dict(info.get("float_layers", {}))
        row["calibration"] = calibration_text(header)
        rows.append(row)
        runners[label] = qmodel
        if is_plain_float(qmodel) or is_probe_pruned(qmodel):  # delivered as itself
            if is_probe_pruned(qmodel):  # sliced weights per batch, in eager PyTorch
                fast, row["runs_as"], notes = deliver_probe_pruned(qmodel)
            else:  # e.g. channel-pruned: a smaller float model on its fastest float path
                fast, row["runs_as"], notes = deliver_float(
                    qmodel, example, quick=quick, threads=None, name=label
                )
                row["dense"] = same_dense_compute(float_model, qmodel)  # e.g. sp50: no speedup
            row["notes"] += notes
            row["quality"] = score(fast)
            runners[label] = fast
            bar.update(1)
            continue
        delivered = _try_deploy(qmodel, example, row["notes"])
        if delivered is not None:
            deployed, runtime = delivered
            cnn = _kind(qmodel, example) == "cnn"
            dlabel = f"{label} int8" if cnn else f"{label} kernels"
            drow = _row(dlabel, runtime, name, score(deployed), row["size_bytes"])
            drow |= {"recipe": recipe, "artifact": str(path), "shares_size": True}
            if cnn:
                drow["notes"].append(f"verified against the simulation: {deployed.verification}")
            rows.append(drow)
            runners[dlabel] = deployed
        bar.update(1)
    for named in {n for n in names if names.count(n) > 1}:  # the first of them: its folder too
        _relabel(rows, runners, named, f"{named} ({folders[names.index(named)]})")
    return rows, runners


def _relabel(rows: list[dict[str, Any]], runners: dict[str, Any], old: str, new: str) -> None:
    """Rename the rows labelled ``old`` (and its delivered ``old int8`` / ``old kernels``)."""
    for row in rows:
        label = row["label"]
        if label == old or label in (f"{old} int8", f"{old} kernels"):
            row["label"] = new + label[len(old) :]
            runners[row["label"]] = runners.pop(label)


def _time(
    rows: list[dict[str, Any]], runners: dict[str, Any], example: Any, runs: int, quick: bool
) -> dict[str, Any]:
    """Latency of every row, timed side by side with every float path in rotating blocks;
    the float row is the fastest float path, speedups are over it (none for simulated rows).
    Returns the float paths' results."""
    extra = {label: m for label, m in runners.items() if label != FLOAT}
    paths = fastest_float_path(
        runners[FLOAT], example, quick=quick, threads=None, runs=runs, extra=extra
    )
    base = rows[0]
    base["runs_as"] = float_path_name(paths.winner)
    for row in rows:
        timing = paths.best if row["label"] == FLOAT else paths.timings[row["label"]]
        row["latency"] = timing.to_dict()
        simulated = row["runs_as"] == SIMULATED
        row["speedup"] = None if simulated else base["latency"]["median_s"] / timing.median_s
        if row.pop("dense", False):  # the float model's dense compute: a gap is noise
            row["speedup"], row["no_speedup"] = None, DENSE_NO_SPEEDUP
            row["notes"].append(dense_note(paths.best.median_s, timing.median_s))
        elif row is not base and not simulated:
            suspect = timing_suspect(base["latency"], row["latency"])
            note = slower_note(paths.best.median_s, timing.median_s, suspect=suspect)
            row["notes"] += filter(None, [note])
        row["size_ratio"] = base["size_bytes"] / row["size_bytes"]
        row["quality_delta"] = row["quality"] - base["quality"]
    return paths.to_dict()


def _memory(
    rows: list[dict[str, Any]],
    runners: dict[str, Any],
    model: nn.Module,
    example: Any,
    winner: str,
    threads: int,
    source: dict[str, Any] | None,
) -> None:
    """Fill each row's ``resident_bytes`` / ``resident_anon_bytes`` (and ``peak_bytes``, the
    build's own peak): its delivered form
    rebuilt from its artifact in a fresh process, two at a time
    (:func:`compactnn.report.resident.measure_rows`); a row that cannot be measured gets a
    note. ``source``: the MODEL the user named, for a float model of other classes than
    ``torch.nn`` / ``compactnn`` ones (:func:`compactnn.report.plain_model.float_record`)."""
    from compactnn.report import resident

    kind = _kind(model, example)
    with resident.temporary_folder() as tmp:
        try:
            inputs = resident.save_inputs(Path(tmp), model, example, source)
        except Exception as exc:  # e.g. a class no trusted constructor rebuilds: a note
            for row in rows:
                row["notes"].append(
                    f"resident memory not measured: {type(exc).__name__}: {first_line(exc, 300)}"
                )
            return
        pairs = []
        for row in rows:
            recipe = FLOAT if row is rows[0] else "artifact"  # memory_job: "float" or not
            try:
                how = resident.memory_job(
                    kind, recipe, row["runs_as"], runners[row["label"]], winner
                )
            except ValueError as exc:
                row["notes"].append(f"resident memory not measured: {first_line(exc, 300)}")
                continue
            artifact = str(Path(row.get("artifact", ".")).resolve())
            pairs.append((row, resident.job(artifact, *how, inputs, source)))
        resident.measure_rows(pairs, threads)


def build_report(
    artifacts: Sequence[str | os.PathLike],
    *,
    model: nn.Module,
    data: Any,
    metric: Metric | None = None,
    out: str | os.PathLike,
    threads: int = DEFAULT_THREADS,
    title: str | None = None,
    runs: int = DEFAULT_RUNS,
    progress: bool = True,
    quick: bool = False,
    force: bool = False,
    memory: bool = False,
    source: dict[str, Any] | None = None,
    data_name: str = "data",
) -> dict[str, Any]:
    """Measure artifacts of one float model on the user's data and write the report.

    Args:
        artifacts: artifact directories made from ``model`` (``compactnn.save``).
        model: the float model (also the skeleton each artifact is loaded into; not changed).
        data: labelled evaluation data: ``(inputs, labels)``, a dict with ``x``/``y``, or a
            split with ``x_test``/``y_test``; or inputs alone: a tensor, or a dict of keyword
            tensors such as a tokenizer's ``input_ids`` / ``attention_mask``.
        metric: on labelled data ``"top1"`` (percent, the default) or a function
            ``metric(outputs, labels) -> float`` giving a batch mean, as
            :func:`compactnn.evaluate` takes; on inputs alone ``"perplexity"`` (next-token,
            lower is better; the default for a Hugging Face causal LM) or ``"cosine"`` (mean
            output cosine vs the float model; the default for any other model).
        out: directory for ``report.md``, ``report.html``, ``pareto.png``, ``results.json``.
        threads: torch threads for every measurement (stated in the report).
        title: the report's heading (default: "compactnn report: <model class>").
        runs: timed runs per model (the median is reported).
        progress: show a progress bar.
        quick: leave ``torch.compile`` out of the float paths (see
            :func:`compactnn.measure.float_paths.fastest_float_path`).
        force: replace an earlier report in ``out`` (a folder of other files, such as an
            artifact or a Hugging Face model folder, is refused even so).
        memory: measure each row's resident memory once every timing is done: its delivered
            form rebuilt from the artifact in a fresh process, two at a time (5-20 s per
            row); ``compactnn report`` does unless ``--no-memory``.
        source: ``{"model", "weights", "trust_pickle"}``, the MODEL the user named (as
            :func:`compactnn.model_io.resolve_model` takes it): how a fresh process rebuilds a
            float model whose classes are not ``torch.nn`` / ``compactnn`` ones or an
            allow-listed Hugging Face architecture (without it, such rows get a note).
        data_name: how messages name ``data`` (``compactnn report``: ``--data FILE``).

    Returns:
        The results written to ``results.json``: ``rows`` (float, then per artifact the
        simulated model and, when deliverable, the int8 or kernels model), ``metric``,
        ``higher_is_better``, ``pareto_front`` (row labels per panel; on the latency panel
        simulated rows and rows whose timing looked inflated are left out),
        ``latency_suspect`` (the labels of those rows: their latency and speedup cells end
        in ``*``), ``scored_on_calibration`` (the labels of rows scored on their artifact's
        own calibration inputs: each says so in its notes), ``environment``...

    Raises:
        CompactnnError: data the model cannot run on, a metric the data or model cannot
            give, an unwritable ``out``, an ``out`` holding a report (without ``force``) or
            other files, a path that is not an artifact, or artifacts of different float
            models.

    Example:
        >>> results = build_report(["out/w8a8"], model=net, data=(x, y), out="out/r")
        ... # doctest: +SKIP
        >>> results["rows"][0]["runs_as"]  # doctest: +SKIP
        'fp32 eager'
    """
    out = check_report_folder(out, force)
    x, y = split_data(data)
    metric = resolve_metric(metric, model, labelled=y is not None)
    headers = check_artifacts(artifacts)
    check_float_model(artifacts, headers, model, given_as(source))  # its digest: same weights
    float_model = copy.deepcopy(model).eval()
    batches = check_runs(float_model, x) if y is None else []
    if y is not None and metric == "top1":  # labels past the model's classes: said up front
        check_top1_labels(float_model, x, y, data_name)
    score = scorer(metric, float_model, x, y, batches)
    tokens = perplexity(float_model, batches)[1] if metric == "perplexity" else None
    example = first_rows(x, LATENCY_BATCH)
    name = type(model).__name__
    title = title or f"compactnn report: {name}"
    previous = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        with progress_bar(total=len(artifacts) + 1, desc="report", progress=progress) as bar:
            rows, runners = _measure(
                model, float_model, [Path(a) for a in artifacts], example, score,
                metric_name(metric), y, bar, quick, headers,
            )  # fmt: skip
            if note := split_used(data):  # x_test/y_test of a file or data set: say so
                rows[0]["notes"].append(note)
            bar.set_postfix_str("timing")
            paths = _time(rows, runners, example, runs, quick)
            bar.update(1)
            used, memory_s = torch.get_num_threads(), None
            if memory:  # after every timing: the children must not slow a timed call
                bar.set_postfix_str(f"resident memory ({len(rows)} processes)")
                t_memory = time.perf_counter()
                _memory(rows, runners, model, example, paths["winner"], used, source)
                memory_s = round(time.perf_counter() - t_memory, 1)
    finally:
        torch.set_num_threads(previous)
    own = [r for r in rows[1:] if not r.get("shares_size")]  # one per artifact, in order
    if calibrated := calibration_note([(r["label"], h) for r, h in zip(own, headers, strict=True)]):
        warnings.warn(calibrated, stacklevel=user_stacklevel())
    flattered = []  # rows scored on their artifact's own calibration inputs
    for row, header in zip(own, headers, strict=True):
        if said := own_calibration_note(header.get("extra", {}), x, model):
            row["notes"].append(said)
            flattered.append(row["label"])
    better = higher_is_better(rows[0]["metric"])
    for row in rows:
        row["model"], row["higher_is_better"] = name, better
    n = samples(x)
    results = {
        "environment": environment(
            used, runs=runs, omp_wait_policy=omp_wait_policy() or "unset", memory_s=memory_s
        ),
        "float_paths": paths,
        "metric": rows[0]["metric"],
        "higher_is_better": better,
        "labelled": y is not None,
        "samples": n,
        "scored_tokens": tokens,
        "latency_batch": min(LATENCY_BATCH, n),
        "pareto_front": {p: front_labels(rows, p) for p in ("size", "latency")},
        "latency_suspect": [r["label"] for r in rows if r["latency"].get("suspect")],
        "resident_note": resident_note(rows),
        "calibration_note": calibrated,
        "scored_on_calibration": flattered,
        "rows": rows,
    }
    png = pareto_png(results, panels=("size", "latency"))
    with removed_if_failed(out):  # a failed write leaves no folder it created
        write_files(out, results, _blocks(results, png, title), png, title)
    return results
