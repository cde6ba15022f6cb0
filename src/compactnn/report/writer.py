"""Write the demo report: ``report.md``, ``report.html``, ``pareto.png``, ``results.json``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from compactnn.export.fs import atomic_write, atomic_write_text
from compactnn.measure.fidelity import fmt_quality
from compactnn.measure.size import ratio_cell
from compactnn.measure.timing import SUSPECT_MARK, ms_text, suspect_mark, timing_suspect  # noqa: F401
from compactnn.report.document import NOT_MEASURED, Block, Spoken, to_html, to_markdown
from compactnn.report.front_text import alt_text, front_blocks
from compactnn.report.plot import METRIC_LABELS, pareto_png
from compactnn.report.scoring import front_labels

NOT_TARGETED = "not targeted by the recipe"
SUMMARY_HEADER = [
    "model",
    "recipe",
    "runs on",
    "quality (top-1 / cosine)",
    "vs float",
    "size on disk",
    "theoretical",
    "x smaller",
    "latency",
    "speedup vs fastest float",
    "resident memory",
    "compress",
    "load bit-exact",
]
SIMULATED = "simulated"
NO_SUCH_LAYER = Spoken("-", "no such layer")
PANELS = ("size", "latency")
SUSPECT_FOOTNOTE = (
    '* this timing looked inflated (the reasons are listed under "Latencies that may be '
    'inflated"): the machine was busy while it was measured, so the latency and the speedups '
    "computed from it may be the machine's, not the model's; rerun on a quieter machine "
    "before relying on them. On the latency panel of pareto.png such points are drawn "
    "hollow, labelled with *, and left out of the Pareto front."
)


def _mib(n: float) -> str:
    """``57,344`` -> ``"56.0 KiB"``; ``23,000,000`` -> ``"21.93 MiB"``."""
    return f"{n / 2**10:.1f} KiB" if n < 2**20 else f"{n / 2**20:.2f} MiB"


def _num(x: Any, fmt: str) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return format(x, fmt)


def latency_cell(lat: dict[str, Any], digits: int | None = 1, mark: str = "") -> str:
    """``"10.00 ms"``, with the runs' min-max when they spread more than 10% around the
    median: ``"10.00 ms (10.0-15.0)"`` in Markdown, said ``"(10.0 to 15.0)"`` in HTML
    (:class:`~compactnn.report.document.Spoken`: a screen reader says "minus" for ``-``);
    ``digits`` as :func:`~compactnn.measure.timing.ms_text` takes them, ``mark`` appended.

    Example:
        >>> cell = latency_cell({"median_s": 0.01, "min_s": 0.01, "max_s": 0.015}, mark=" *")
        >>> cell, cell.words
        ('10.00 ms (10.0-15.0) *', '10.00 ms (10.0 to 15.0) *')
    """
    spread = (lat["max_s"] - lat["min_s"]) / lat["median_s"] if lat["median_s"] else 0
    latency = f"{ms_text(lat['median_s'])} ms"
    if spread <= 0.10:
        return latency + mark
    low, high = (ms_text(lat[k], digits) if digits else ms_text(lat[k]) for k in ("min_s", "max_s"))
    return Spoken(f"{latency} ({low}-{high}){mark}", f"{latency} ({low} to {high}){mark}")


def _latency_cell(lat: dict[str, Any]) -> str:
    return latency_cell(lat, 1, suspect_mark(lat))


def resident_cell(r: dict[str, Any]) -> str:
    """``"23.49 MiB (2.61 MiB anon.)"``: the RSS the running delivered model adds and its
    anonymous part (heap, tensors: where a dense copy of the weights shows); ``"-"`` when
    not measured (said "not measured" in HTML). A change below zero (the allocator gave back
    more than it took) reads 0.

    Example:
        >>> resident_cell({"resident_bytes": 3 * 2**20, "resident_anon_bytes": 2**20})
        '3.00 MiB (1.00 MiB anon.)'
    """
    resident = r.get("resident_bytes")
    if resident is None:
        return NOT_MEASURED
    cell = _mib(max(resident, 0))
    anon = r.get("resident_anon_bytes")
    return cell if anon is None else f"{cell} ({_mib(max(anon, 0))} anon.)"


def _speedup_cell(r: dict[str, Any], base: dict[str, Any] | None = None) -> str:
    """``"3.20x"``, marked ``" *"`` when the row's or its float row's (``base``) timing looked
    inflated; ``"simulated"`` for a row that no runtime delivered (no honest ratio)."""
    if r.get("runtime") == SIMULATED:
        return SIMULATED
    if r.get("no_speedup"):  # the float model's dense compute (e.g. unstructured zeros)
        return r["no_speedup"]
    mark = suspect_mark(r["latency"], base["latency"] if base else None)
    return _num(r.get("speedup"), ".2f") + "x" + mark


def any_suspect(rows: list[dict[str, Any]]) -> bool:
    """Whether a row's latency looked inflated (its cells then carry :data:`SUSPECT_MARK`)."""
    return timing_suspect(*(r.get("latency") for r in rows))


def summary_rows(results: dict[str, Any]) -> list[list[str]]:
    """One row per (model, recipe), in the order of ``SUMMARY_HEADER``.

    ``runs on`` is the runtime that ran the row (the float row: the fastest float path);
    ``resident memory`` is filled where a row has ``resident_bytes`` (:func:`resident_cell`).
    """
    rows = []
    bases = {r["model"]: r for r in results["rows"] if r["recipe"] == "float"}
    for r in results["rows"]:
        rows.append(
            [
                r["model"],
                r["recipe"],
                r.get("runtime", "PyTorch eager" if r["recipe"] == "float" else SIMULATED),
                fmt_quality(r["metric"], r["quality"]),
                fmt_quality(r["metric"], r.get("quality_delta"), delta=True),
                _mib(r["size_bytes"]),
                _mib(r["theoretical_bytes"]),
                ratio_cell(r.get("size_ratio")),
                _latency_cell(r["latency"]),
                _speedup_cell(r, bases.get(r["model"])),
                resident_cell(r),
                f"{r['compress_s']:.2f} s",
                "yes" if r["bit_exact_load"] else "NO",
            ]
        )
    return rows


def summary_table(results: dict[str, Any]) -> str:
    """The summary as a Markdown table (printed by ``compactnn demo``)."""
    return to_markdown([("table", (SUMMARY_HEADER, summary_rows(results)))]).strip()


def module_order(name: str) -> list:
    """A sort key putting module names in model order: numbered parts by number.

    Example:
        >>> sorted(["12", "3", "layer1.10.conv", "layer1.2.conv", "0"], key=module_order)
        ['0', '3', '12', 'layer1.2.conv', 'layer1.10.conv']
    """
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]


def _layer_blocks(results: dict[str, Any]) -> list[Block]:
    """Per model: a table of layer x recipe formats, then the layers kept in float."""
    blocks: list[Block] = [("h2", "Layer formats")]
    for model in results["models"]:
        rows = [r for r in results["rows"] if r["model"] == model and r["recipe"] != "float"]
        if not rows:
            continue
        layers = list(dict.fromkeys(name for r in rows for name in r["layers"]))
        table = [[name] + [r["layers"].get(name, NO_SUCH_LAYER) for r in rows] for name in layers]
        blocks.append(("h3", model))
        caption = f"Layer formats of {model}: each layer's weight format per recipe"
        blocks.append(("table", (["layer"] + [r["recipe"] for r in rows], table, caption)))
        kept = [
            f"{r['recipe']}: `{name}` ({r['float_layers'][name]})"
            for r in rows
            for name in sorted(r["float_layers"], key=module_order)
        ]
        blocks.append(
            (
                "p",
                f"Layers of {model} with float weights (kept in float, or pruned only):"
                if kept
                else f"No layer of {model} has float weights.",
            )
        )
        if kept:
            blocks.append(("list", kept))
    return blocks


def _method_blocks(results: dict[str, Any]) -> list[Block]:
    env = results["environment"]
    runs = "3 (quick mode)" if env.get("quick") else "10"
    metrics = ", ".join(
        f"{m}: {METRIC_LABELS.get(v['metric'], v['metric'])}" for m, v in results["models"].items()
    )
    notes = [f"{r['model']} {r['recipe']}: {n}" for r in results["rows"] for n in r["notes"]]
    batches = "; ".join(
        f"{m}: {b}" for m, b in {r["model"]: r["latency_batch"] for r in results["rows"]}.items()
    )
    suspect = [
        f"{r['model']} {r['recipe']}: {reason}"
        for r in results["rows"]
        for reason in r["latency"].get("suspect", [])
    ]
    blocks: list[Block] = [
        ("h2", "How this was measured"),
        (
            "list",
            [
                f"Quality on held-out data never used for calibration ({metrics}).",
                "Size: bytes on disk of the saved artifact directory (`os.stat`), beside the "
                "theoretical size the recipe implies (`theoretical`: its tensors as the "
                "artifact stores them, a pruned weight's zeros by their sparse index, without "
                "the file's headers); the float row is the float model saved in the same format.",
                "Latency: each row runs on its delivered form, named in `runs on` "
                "(`compactnn.deploy` on integer kernels for CNNs, `compactnn.to_kernels` for "
                "transformers; `simulated` where neither applies, with the reason in the "
                "notes, and then no speedup is claimed). The float row is the fastest float "
                f"path of the same run ({_float_paths_text(results)}); every speedup is over "
                f"it. {env['threads']} threads, OMP_WAIT_POLICY="
                f"{env.get('omp_wait_policy', 'unset')}, 1-minute load "
                f"{env.get('load_avg', 'n/a')}; every contender in its own block of calls "
                f"after a pause (about 0.1 s of calls for a fast model), three rounds in rotating "
                f"order, median of at least {runs} runs on one "
                f"fixed input batch ({batches} samples; min-max shown when the runs spread more "
                "than 10%).",
                _memory_text(results),
                "Quality is measured by running the delivered model itself.",
                "Load bit-exact: the artifact loaded into a fresh skeleton gives outputs equal "
                "(`torch.equal`) to the compressed model's.",
                *([env["oversubscribed"]] if env.get("oversubscribed") else []),
                *([SUSPECT_FOOTNOTE] if suspect else []),
            ],
        ),
    ]
    if suspect:
        blocks += [("h2", "Latencies that may be inflated (noisy machine)"), ("list", suspect)]
    if notes:
        blocks += [("h2", "Notes from compression and delivery"), ("list", notes)]
    return blocks


def _memory_text(results: dict[str, Any]) -> str:
    """How the resident memory column was measured (or that it was not)."""
    env = results["environment"]
    if env.get("memory_s") is None:
        return "Resident memory: not measured (`--no-memory`)."
    batches = ", ".join(
        f"{m}: {b}" for m, b in {r["model"]: r["latency_batch"] for r in results["rows"]}.items()
    )
    return (
        "Resident memory: what the row's delivered form adds to a fresh Python process "
        "(`compactnn.measure.memory.resident_memory`; RSS after building it from the saved "
        "artifact and one forward pass on the latency batch, heap trimmed, minus RSS before), "
        "with its anonymous part (heap and tensors, where a dense copy of the weights shows; "
        "the rest is file-backed, mostly library code the first forward maps). The form is the "
        "one the latency column times: the float row on the float path that won (`runs on`), "
        "int8 rows as `compactnn.deploy` with the row's backend (the deployed model keeps its "
        "simulated source for `save_deployed`, which counts), transformer rows as "
        "`compactnn.load(artifact, kernels=True)`, a plain float (pruned) row on its float "
        "path, simulated rows as the simulated model. The input batch, the float skeleton "
        "and the libraries (torch, onnxruntime, transformers, torch._dynamo) are loaded "
        "before the first reading, for every row alike, so they do not count. "
        f"{env['threads']} threads, batches of {batches}; {env['memory_s']:.0f} s for all rows."
    )


def _float_paths_text(results: dict[str, Any]) -> str:
    """``"mnist-cnn: ort-fp32 won; fp32-eager 1.2 ms, ...; torch.compile skipped (...)"``."""
    parts = []
    for model, info in results["models"].items():
        paths = info.get("float_paths")
        if not paths:
            continue
        times = ", ".join(
            f"{k} {ms_text(v['median_s'])} ms"
            for k, v in paths["timings"].items()
            if k in paths.get("errors", {})
        )
        skipped = "; ".join(f"{k} skipped: {v}" for k, v in paths.get("skipped", {}).items())
        parts.append(f"{model}: {paths['winner']} won ({times}){'; ' + skipped if skipped else ''}")
    return "; ".join(parts) or "fp32 eager"


def report_blocks(results: dict[str, Any], png: bytes) -> list[Block]:
    env = results["environment"]
    plotted = _plot_results(results)["rows"]
    caption = "Results: one row per model and recipe"
    return [
        ("h1", "compactnn demo report"),
        (
            "p",
            f"compactnn {env['compactnn']}, torch {env['torch']}, Python {env['python']}, "
            f"{env['machine']}, {env['threads']} torch threads, OMP_WAIT_POLICY="
            f"{env.get('omp_wait_policy', 'unset')}, {env['date']}.",
        ),
        ("h2", "Results"),
        ("table", (SUMMARY_HEADER, summary_rows(results), caption, 2)),  # model, recipe
        ("img", (alt_text(plotted, PANELS), png, "pareto.png")),
        *front_blocks(plotted, PANELS),
        *_layer_blocks(results),
        *_method_blocks(results),
    ]


def write_report(results: dict[str, Any], out: str | os.PathLike) -> dict[str, Path]:
    """Write the four report files into ``out`` and return their paths; ``results`` gets
    ``pareto_front`` (:func:`pareto_fronts`), as ``results.json`` holds it.

    Example:
        >>> write_report(run_demo_results, "out/demo")  # doctest: +SKIP
    """
    plotted = _plot_results(results)
    png = pareto_png(plotted, panels=PANELS)
    results["pareto_front"] = pareto_fronts(results["rows"])  # recipes, as the table names them
    return write_files(out, results, report_blocks(results, png), png, "compactnn demo report")


def pareto_fronts(rows: list[dict[str, Any]]) -> dict[str, dict[str, list[str]]]:
    """Per model, the labels on the Pareto front of each panel of ``pareto.png``
    (:func:`compactnn.report.scoring.front_labels`): ``results.json``'s ``pareto_front``."""
    models = dict.fromkeys(r["model"] for r in rows)
    return {
        m: {p: front_labels([r for r in rows if r["model"] == m], p) for p in PANELS}
        for m in models
    }


def _plot_results(results: dict[str, Any]) -> dict[str, Any]:
    """Rows for the plot: a simulated row's label says so (its latency is not delivered)."""
    rows = [
        r | {"label": f"{r['recipe']} (simulated)"} if r.get("runtime") == SIMULATED else r
        for r in results["rows"]
    ]
    return {"rows": rows}


def write_files(
    out: str | os.PathLike, results: dict[str, Any], blocks: list[Block], png: bytes, title: str
) -> dict[str, Path]:
    """Write ``results.json``, ``pareto.png``, ``report.md`` and ``report.html`` into ``out``.

    Shared by the demo report and :func:`compactnn.report.build_report`; every file (the
    picture too) is replaced atomically, so a crash leaves the old file or the new one, never
    a half-written one, and gets the mode a plain ``open()`` would give (``0o666`` less the
    umask, as :func:`compactnn.export.fs.atomic_write` sets it).

    Example:
        >>> write_files("out/r", {"rows": []}, [("h1", "r")], png, "r")  # doctest: +SKIP
    """
    # every file's text first: an error while rendering (a bad row) writes nothing, rather
    # than a new results.json beside the previous run's report
    texts = {
        "results.json": json.dumps(results, indent=1, sort_keys=False),
        "report.md": to_markdown(blocks),
        "report.html": to_html(blocks, title),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("results.json", "pareto.png", "report.md")}
    paths["report.html"] = out / "report.html"
    atomic_write(paths["pareto.png"], lambda tmp: Path(tmp).write_bytes(png))
    for name, text in texts.items():  # each with a plain open()'s mode: 0o666 less the umask
        atomic_write_text(paths[name], text)
    return paths
