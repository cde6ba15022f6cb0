"""The demo: compress the reference models with the suite and write the report.

For every (reference model, recipe) entry of :data:`compactnn.demo_suite.SUITE` it runs the
compressed model on its *delivered* form (:func:`deliver_row`: ``compactnn.deploy`` for
CNNs, ``compactnn.to_kernels`` for transformers, a plain float model such as a channel-pruned
one on the fastest of its own float paths, "simulated" with the reason when none applies)
and measures quality of that delivered model (top-1 or mean cosine vs float), the artifact's
bytes on disk beside the theoretical size, latency side by side with every float path
(:func:`compactnn.measure.float_paths.fastest_float_path`; the speedup is over the fastest),
the compression time, the resident memory of the delivered model (a fresh process per row,
:mod:`compactnn.report.resident`), each layer's format and the layers kept in float; then
:func:`compactnn.report.write_report` writes ``report.md``, ``report.html``, ``pareto.png``
and ``results.json``.

Example:
    >>> results = run_demo("out/demo", force=True)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import compactnn
from compactnn.core.calib import batch_size_of, call_model, main_output
from compactnn.core.progress import bar as progress_bar
from compactnn.demo_suite import SUITE, suite_recipe
from compactnn.errors import CompactnnError, first_line
from compactnn.export.artifact import check_writable
from compactnn.measure import (
    DEFAULT_RUNS,
    DEFAULT_THREADS,
    artifact_bytes,
    first_rows,
    float_weight_layers,
    layer_formats,
    set_threads,
    theoretical_bytes,
)
from compactnn.measure.environment import environment
from compactnn.measure.float_paths import FloatPaths, fastest_float_path
from compactnn.measure.timing import TimingWarning, check_environment, omp_wait_policy
from compactnn.report.delivery import (
    SIMULATED,
    deliver,
    deliver_float,
    float_path_name,
    is_plain_float,
    slower_note,
    timing_suspect,
)

FLOAT = "float"
RESULTS = "results.json"
LATENCY_BATCH = 16  # samples per timed call: enough to show throughput, cheap enough for CI


def _default_loader(name: str) -> Any:
    from compactnn.models import load_reference

    return load_reference(name, progress=False)


def group_suite(suite: list[tuple[str, str]]) -> dict[str, list[str]]:
    """``{model: [recipes...]}`` in suite order, with ``"float"`` first for every model."""
    grouped: dict[str, list[str]] = {}
    for model, recipe in suite:
        recipes = grouped.setdefault(model, [FLOAT])
        if recipe not in recipes:
            recipes.append(recipe)
    return grouped


def _check_out(out: Path, force: bool, grouped: dict[str, list[str]]) -> None:
    """Refuse, before any model loads, an ``out`` the demo could not write: an earlier report
    without ``force``, or an artifact folder that ``compactnn.save`` would refuse (a system
    folder, a file on the path, not writable)."""
    if (out / RESULTS).exists() and not force:
        raise CompactnnError(
            f"{str(out)!r} already holds a demo report; pass --force to replace it or "
            "choose another --out."
        )
    for name, recipes in grouped.items():  # the checks of measure_recipe's saves, up front
        for recipe in recipes:
            check_writable(out / "artifacts" / name / recipe, force=True, what="--out")
    if force and (out / "artifacts").is_dir():
        shutil.rmtree(out / "artifacts")  # stale artifacts of recipes no longer in the suite


def _bit_exact(ref: Any, qmodel: torch.nn.Module, path: Path, batch: Any) -> bool:
    """Load the artifact into a fresh skeleton; outputs must equal the saved model's."""
    loaded = compactnn.load(path, model=ref.skeleton())
    with torch.no_grad():
        a = main_output(call_model(qmodel, batch))
        b = main_output(call_model(loaded, batch))
    return bool(torch.equal(a, b))


def measure_recipe(
    name: str, ref: Any, recipe: str, out: Path, batch: Any
) -> tuple[dict[str, Any], torch.nn.Module]:
    """Compress ``ref.model`` with ``recipe`` (``"float"``: as is), save and measure it
    (all but latency, which :func:`time_models` measures side by side).

    Returns the row and the compressed model. ``batch`` is the input used to check that the
    reloaded artifact is bit-exact.
    """
    t0 = time.perf_counter()
    trained = None
    if recipe == FLOAT:
        model = ref.model
    elif is_training_recipe(recipe):
        model, seconds, hit = _trained(name, ref, recipe)
        trained = {"epochs": compactnn.info_of(model)["extra"]["training"]["epochs"]}
        trained |= {"train_s": seconds, "from_cache": hit}
    else:
        model = compactnn.compress(
            ref.model, suite_recipe(recipe), calib_data=ref.calib, progress=False
        )
    compress_s = time.perf_counter() - t0 if trained is None else trained["train_s"]
    path = out / "artifacts" / name / recipe
    if recipe != FLOAT:  # the reference by name: `compactnn eval ARTIFACT` needs no --model
        model._compactnn.setdefault("extra", {})["source"] = {"kind": "reference", "model": name}
    compactnn.save(model, path, force=True)
    info = compactnn.info_of(model)
    row = {
        "model": name,
        "recipe": recipe,
        "metric": ref.metric,
        "quality": None,  # measured on the delivered model (run_model)
        "size_bytes": artifact_bytes(path),
        "theoretical_bytes": theoretical_bytes(model),
        "latency_batch": batch_size_of(batch),
        "compress_s": compress_s,
        "bit_exact_load": True if recipe == FLOAT else _bit_exact(ref, model, path, batch),
        "layers": layer_formats(model),
        "float_layers": float_weight_layers(model),
        "notes": list(info.get("notes", [])),
        "artifact": str(path.relative_to(out)),
    }
    if trained is not None:
        row["training"] = trained
        row["notes"].append(
            f"trained with compactnn.train for {trained['epochs']} epochs on the reference's "
            f"training split ({trained['train_s']:.0f} s when first trained; cached since)"
        )
    return row, model


def is_training_recipe(recipe: str) -> bool:
    """Whether ``recipe`` is a training-aware recipe (the demo trains it, once, cached)."""
    from compactnn.engines.qat import QATConfig
    from compactnn.recipe import resolve_recipe

    steps = resolve_recipe(suite_recipe(recipe)).steps
    return (
        len(steps) == 1
        and isinstance(steps[0].config, QATConfig)
        and not getattr(type(steps[0].config), "post_training", False)  # Network Sketching
    )


def _trained(name: str, ref: Any, recipe: str) -> tuple[torch.nn.Module, float, bool]:
    """The reference trained with a training recipe on its own data set (cached on disk)."""
    import importlib

    from compactnn.commands.train import DATASETS, REFERENCE_DATA
    from compactnn.models.trained import cached_train

    if name not in REFERENCE_DATA:
        raise CompactnnError(
            f"the demo trains {recipe!r} on the reference's own labelled data, and {name!r} "
            f"has none; training recipes work on {sorted(REFERENCE_DATA)}."
        )
    module, fn = DATASETS[REFERENCE_DATA[name]].split(":")
    data = getattr(importlib.import_module(module), fn)()
    return cached_train(ref, recipe, data)


def time_models(
    float_model: torch.nn.Module,
    models: dict[str, Any],
    batch: Any,
    *,
    threads: int,
    quick: bool,
) -> FloatPaths:
    """Every float path of ``float_model`` and every delivered model in ``models``, timed
    side by side in rotating blocks (BENCHMARKING.md); the float paths name the fastest."""
    runs = 3 if quick else DEFAULT_RUNS
    check_environment()  # the wait-policy warning is shown; per-timing doubts go in the report
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TimingWarning)
        return fastest_float_path(
            float_model, batch, quick=quick, threads=threads, runs=runs, warmup=2, extra=models
        )


def deliver_row(
    kind: str,
    model: torch.nn.Module,
    batch: Any,
    *,
    quick: bool = True,
    threads: int | None = DEFAULT_THREADS,
) -> tuple[torch.nn.Module, str, list[str]]:
    """A compressed row's delivered model, runtime and notes, as ``compactnn eval`` gets
    them: a plain float model (:func:`is_plain_float`, e.g. channel-pruned) runs as itself
    on the fastest of its own float paths (:func:`deliver_float`), anything else on the
    runtime :func:`deliver` finds (``"simulated"`` when none runs it).

    Example:
        >>> fast, runtime, notes = deliver_row("cnn", pruned, images[:16])  # doctest: +SKIP
        >>> runtime                                                         # doctest: +SKIP
        'ONNX Runtime fp32'
    """
    if is_plain_float(model):
        return deliver_float(model, batch, quick=quick, threads=threads)
    return deliver(kind, model, batch)


def run_model(
    name: str,
    ref: Any,
    recipes: list[str],
    out: Path,
    *,
    threads: int,
    quick: bool,
    bar: Any,
    memory: list | None = None,
    memory_dir: Path | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of one reference model, each on its delivered form, all timed side by side
    with the float paths; returns the rows and the float paths' results. With ``memory``
    (a list) and ``memory_dir``, appends each row's resident-memory job
    (:func:`memory_jobs`), measured later by :func:`compactnn.report.resident.measure_rows`."""
    batch = first_rows(ref.example, LATENCY_BATCH)
    rows, delivered = [], {}
    for recipe in recipes:
        bar.set_postfix_str(f"{name}: {recipe}")
        row, model = measure_recipe(name, ref, recipe, out, batch)
        if recipe != FLOAT:
            bar.set_postfix_str(f"{name}: {recipe} (deploy)")
            kind = getattr(ref, "kind", "cnn")
            delivered[recipe], row["runtime"], notes = deliver_row(
                kind, model, batch, quick=quick, threads=threads
            )
            row["notes"] += notes
        row["quality"] = float(ref.evaluate(delivered.get(recipe, model)))
        rows.append(row)
        bar.update(1)
    bar.set_postfix_str(f"{name}: timing")
    paths = time_models(ref.model, delivered, batch, threads=threads, quick=quick)
    for row in rows:
        if row["recipe"] == FLOAT:
            row["runtime"] = float_path_name(paths.winner)
            row["latency"] = paths.best.to_dict()
        else:
            row["latency"] = paths.timings[row["recipe"]].to_dict()
        row["float_path"] = paths.winner
    if memory is not None and memory_dir is not None:
        kind = getattr(ref, "kind", "cnn")
        memory += memory_jobs(
            rows, delivered, kind, ref.model, batch, paths.winner, out, memory_dir
        )
    return rows, paths.to_dict()


def memory_jobs(
    rows: list[dict[str, Any]],
    delivered: dict[str, Any],
    kind: str,
    float_model: torch.nn.Module,
    batch: Any,
    winner: str,
    out: Path,
    folder: Path,
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """``(row, job)`` for each row whose delivered form a child process can rebuild
    (:func:`compactnn.report.resident.row_job`); the float model and ``batch`` are saved into
    ``folder`` for the children. A row that cannot be rebuilt gets a note instead."""
    from compactnn.report import resident

    pairs = []
    try:
        inputs = resident.save_inputs(folder / rows[0]["model"], float_model, batch)
    except Exception as exc:  # e.g. a model that does not pickle: a note, not a failure
        for row in rows:
            row["notes"].append(
                f"resident memory not measured: {type(exc).__name__}: {first_line(exc, 300)}"
            )
        return pairs
    for row in rows:
        try:
            job = resident.row_job(row, kind, delivered.get(row["recipe"]), winner, out, inputs)
        except Exception as exc:
            row["notes"].append(f"resident memory not measured: {first_line(exc, 300)}")
            continue
        pairs.append((row, job))
    return pairs


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Ratios of each row to its model's float row: size, speed, quality delta."""
    base = {r["model"]: r for r in rows if r["recipe"] == FLOAT}
    for r in rows:
        b = base.get(r["model"])
        if b is None:
            continue
        r["size_ratio"] = b["size_bytes"] / r["size_bytes"]
        simulated = r.get("runtime") == SIMULATED
        r["speedup"] = None if simulated else b["latency"]["median_s"] / r["latency"]["median_s"]
        slow = r is not b and not simulated
        suspect = timing_suspect(b["latency"], r["latency"])
        if slow and (
            n := slower_note(b["latency"]["median_s"], r["latency"]["median_s"], suspect=suspect)
        ):
            r.setdefault("notes", []).append(n)
        r["quality_delta"] = r["quality"] - b["quality"]
        r["size_vs_theoretical"] = r["size_bytes"] / r["theoretical_bytes"] - 1.0


def run_demo(
    out: str | os.PathLike = "out/demo",
    *,
    force: bool = False,
    quick: bool = False,
    threads: int = DEFAULT_THREADS,
    suite: list[tuple[str, str]] | None = None,
    loader: Callable[[str], Any] = _default_loader,
    progress: bool = True,
    memory: bool = True,
) -> dict[str, Any]:
    """Run the suite, write the report into ``out`` and return the results.

    Args:
        out: report directory (artifacts go to ``out/artifacts/<model>/<recipe>``).
        force: replace an existing report.
        quick: fewer timed runs (3 instead of 10; not the benchmark protocol) and no
            ``torch.compile`` float path.
        threads: torch threads for everything, reported.
        suite: (model, recipe) pairs; default :data:`compactnn.demo_suite.SUITE`.
        loader: reference name -> reference model (tests pass tiny ones).
        progress: show a progress bar.
        memory: measure each row's resident memory once every timing is done (a fresh
            process per row, two at a time: about 5-20 s per row on 2 cores).
    """
    from compactnn.report import write_report
    from compactnn.report.resident import measure_rows, temporary_folder

    out = Path(out)
    grouped = group_suite(list(suite if suite is not None else SUITE))
    _check_out(out, force, grouped)
    previous = torch.get_num_threads()
    threads = set_threads(threads)
    rows, models, jobs = [], {}, [] if memory else None
    t_start = time.perf_counter()
    total = sum(len(r) for r in grouped.values())
    memory_s = 0.0 if memory else None  # None: not measured (--no-memory)
    with temporary_folder() as tmp:
        try:
            with progress_bar(total=total, desc="demo", progress=progress) as bar:
                for name, recipes in grouped.items():
                    bar.set_postfix_str(f"{name}: loading")
                    ref = loader(name)
                    model_rows, paths = run_model(
                        name, ref, recipes, out, threads=threads, quick=quick, bar=bar,
                        memory=jobs, memory_dir=Path(tmp),
                    )  # fmt: skip
                    models[name] = {"metric": ref.metric, "kind": ref.kind, "float_paths": paths}
                    rows += model_rows
                if jobs:  # after every timing: the children must not slow a timed call
                    bar.set_postfix_str(f"resident memory ({len(jobs)} processes)")
                    t_memory = time.perf_counter()
                    measure_rows(jobs, threads)
                    memory_s = round(time.perf_counter() - t_memory, 1)
        finally:
            torch.set_num_threads(previous)
    add_ratios(rows)
    env = environment(
        threads,
        quick=quick,
        omp_wait_policy=omp_wait_policy() or "unset",
        load_avg=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        demo_s=round(time.perf_counter() - t_start, 1),
        memory_s=memory_s,
    )
    results = {"environment": env, "models": models, "rows": rows}
    write_report(results, out)
    return results
