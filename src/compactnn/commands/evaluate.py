"""``compactnn eval MODEL_OR_ARTIFACT``: quality, size and latency next to the float model."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

import compactnn
from compactnn.commands._common import add_model_args, human_bytes, load_model
from compactnn.core.calib import as_batches
from compactnn.errors import CompactnnError
from compactnn.export.artifact import artifact_exists, read_header
from compactnn.measure import (
    DEFAULT_RUNS,
    DEFAULT_THREADS,
    artifact_bytes,
    float_artifact_bytes,
    fmt_quality,
    output_fidelity,
    theoretical_bytes,
    time_model,
)
from compactnn.model_io import LoadedModel, resolve_data, skeleton_for


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval",
        help="quality, size and latency of an artifact (or model) next to the float model",
        description=(
            "Evaluate an artifact directory against the float model it came from, or a MODEL "
            "(optionally compressed in memory with --recipe) against itself in float."
        ),
    )
    p.add_argument("target", metavar="MODEL_OR_ARTIFACT")
    p.add_argument(
        "--model",
        "-m",
        help="float MODEL of an artifact (needed unless it was made from a reference model)",
    )
    p.add_argument("--recipe", "-r", help="compress MODEL in memory with this recipe first")
    p.add_argument("--data", "-d", help="evaluation inputs (.safetensors/.npy or data set name)")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch threads (2)")
    p.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="timed runs (median shown)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    add_model_args(p)
    return p


def _compressed(args: argparse.Namespace) -> tuple[LoadedModel, nn.Module | None, int | None]:
    """The float model, the compressed one (or None) and its artifact size."""
    if artifact_exists(args.target):
        header = read_header(args.target)
        loaded = skeleton_for(
            header, args.model, weights=args.weights, trust_pickle=args.trust_pickle
        )
        qmodel = compactnn.load(args.target, model=loaded.model)
        return loaded, qmodel, artifact_bytes(args.target)
    if Path(args.target).is_dir() and not (Path(args.target) / "config.json").is_file():
        raise CompactnnError(
            f"{args.target!r} holds neither a compactnn artifact nor a Hugging Face model."
        )
    loaded = load_model(args.target, args)
    if not args.recipe:
        return loaded, None, None
    data = resolve_data(args.data, loaded) if args.data or loaded.calib is not None else None
    qmodel = compactnn.compress(loaded.model, args.recipe, calib_data=data)
    with tempfile.TemporaryDirectory(prefix="compactnn-eval-") as tmp:
        compactnn.save(qmodel, Path(tmp) / "a")
        return loaded, qmodel, artifact_bytes(Path(tmp) / "a")


def _quality(loaded: LoadedModel, model: nn.Module, batches: list) -> tuple[str, float | None]:
    if loaded.reference is not None:
        return loaded.reference.metric, float(loaded.reference.evaluate(model))
    if not batches:
        return "output cosine vs float", None
    return "output cosine vs float", output_fidelity(loaded.model, model, batches)["cosine"]


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Rows (float, and compressed when there is one) with quality, size and latency."""
    loaded, qmodel, qsize = _compressed(args)
    data = resolve_data(args.data, loaded) if args.data else None
    batches = as_batches(data) if data is not None else as_batches(loaded.example)
    example = batches[0] if batches else loaded.example
    rows = []
    for label, model, size in (("float", loaded.model, None), ("compressed", qmodel, qsize)):
        if model is None:
            continue
        metric, quality = _quality(loaded, model, batches[:8])
        timing = (
            time_model(model, example, threads=args.threads, runs=args.runs)
            if (example is not None)
            else None
        )
        rows.append(
            {
                "model": label,
                "recipe": compactnn.info_of(model).get("recipe").name
                if qmodel is model
                else "float",
                "metric": metric,
                "quality": quality,
                "size_bytes": size if size is not None else float_artifact_bytes(model),
                "theoretical_bytes": theoretical_bytes(model),
                "latency": timing.to_dict() if timing else None,
                "latency_text": timing.fmt() if timing else "n/a (no input known: pass --data)",
            }
        )
    return {"target": args.target, "threads": args.threads, "rows": rows}


def run(args: argparse.Namespace) -> int:
    result = evaluate(args)
    base = result["rows"][0]
    print(f"quality: {base['metric']}")
    print(f"{'':11}{'recipe':>10}{'quality':>11}{'size on disk':>15}{'x smaller':>11}  latency")
    for row in result["rows"]:
        quality = fmt_quality(row["metric"], row["quality"])
        ratio = base["size_bytes"] / row["size_bytes"]
        print(
            f"{row['model']:11}{row['recipe']:>10}{quality:>11}"
            f"{human_bytes(row['size_bytes']):>15}{ratio:>10.2f}x  {row['latency_text']}"
        )
    print(f"(latency: median of {args.runs} runs after warm-up, {args.threads} threads)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0
