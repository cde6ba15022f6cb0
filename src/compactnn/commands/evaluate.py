"""``compactnn eval MODEL_OR_ARTIFACT``: quality, size and latency next to the float model."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

import compactnn
from compactnn.commands._common import add_model_args, human_bytes, load_model
from compactnn.core.calib import (
    as_batches,
    batch_size_of,
    call_model,
    describe,
    expected_input_hint,
)
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
from compactnn.measure import evaluate as evaluate_labelled
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
    p.add_argument(
        "--data",
        "-d",
        help="evaluation inputs (.safetensors/.npy or data set name); a .safetensors with x "
        "and y tensors (inputs and labels) gives top-1",
    )
    p.add_argument(
        "--deploy",
        action="store_true",
        help="also run the compressed model on int8 kernels (w8a8 artifacts) and measure it",
    )
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch threads (2)")
    p.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="timed runs (median shown)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_model_args(p)
    return p


_LABEL_KEYS = (("x", "y"), ("x_train", "y_train"), ("inputs", "labels"))


def split_labels(data: Any) -> tuple[Any, torch.Tensor | None]:
    """``(inputs, labels)`` of ``--data``: a mapping with x/y tensors has labels; anything else
    (a tensor, keyword inputs, a reference data set's batches) is inputs only.

    Example:
        >>> split_labels({"x": torch.ones(2, 3), "y": torch.tensor([0, 1])})[1]
        tensor([0, 1])
    """
    if isinstance(data, dict):
        for kx, ky in _LABEL_KEYS:
            if isinstance(data.get(kx), torch.Tensor) and isinstance(data.get(ky), torch.Tensor):
                return data[kx], data[ky]
    return data, None


def check_inputs(loaded: LoadedModel, batch: Any, option: str = "--data") -> None:
    """Run the float model on one batch; a failure becomes one line naming both shapes."""
    try:
        with torch.no_grad():
            call_model(loaded.model.eval(), batch)
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        example = loaded.example
        like = (
            f"; its example input has shape {tuple(example.shape)}"
            if isinstance(example, torch.Tensor)
            else ""
        )
        raise CompactnnError(
            f"{option} does not fit the model: it holds {describe(batch)}, the model expects "
            f"{expected_input_hint(loaded.model)}{like} ({first}). Pass inputs of that shape "
            "(float32; integer token ids for a language model)."
        ) from exc


def inputs_of(args: argparse.Namespace, loaded: LoadedModel) -> tuple[Any, torch.Tensor | None]:
    """The ``--data`` inputs (checked against the float model) and labels, if any."""
    if not args.data:
        return None, None
    inputs, labels = split_labels(resolve_data(args.data, loaded))
    batches = as_batches(inputs)
    if batches:
        check_inputs(loaded, batches[0])
    if labels is not None and labels.shape[:1] != batch_rows(inputs):
        raise CompactnnError(
            f"--data holds {batch_rows(inputs)[0]} inputs but {labels.shape[0]} labels (y); "
            "they must match."
        )
    return inputs, labels


def batch_rows(inputs: Any) -> tuple[int, ...]:
    return (int(inputs.shape[0]),) if isinstance(inputs, torch.Tensor) else ()


def _compressed(args: argparse.Namespace):
    """The float model, the compressed one (or None), its artifact size, and the ``--data``
    inputs and labels."""
    if artifact_exists(args.target):
        header = read_header(args.target)
        loaded = skeleton_for(
            header, args.model, weights=args.weights, trust_pickle=args.trust_pickle
        )
        qmodel = compactnn.load(args.target, model=loaded.model)
        return loaded, qmodel, artifact_bytes(args.target), inputs_of(args, loaded)
    if Path(args.target).is_dir() and not (Path(args.target) / "config.json").is_file():
        raise CompactnnError(
            f"{args.target!r} holds neither a compactnn artifact nor a Hugging Face model."
        )
    loaded = load_model(args.target, args)
    data = inputs_of(args, loaded)
    if not args.recipe:
        return loaded, None, None, data
    calib = data[0] if data[0] is not None else loaded.calib
    qmodel = compactnn.compress(
        loaded.model, args.recipe, calib_data=calib, progress=not args.no_progress
    )
    with tempfile.TemporaryDirectory(prefix="compactnn-eval-") as tmp:
        compactnn.save(qmodel, Path(tmp) / "a")
        return loaded, qmodel, artifact_bytes(Path(tmp) / "a"), data


def _quality(
    args: argparse.Namespace, loaded: LoadedModel, model: nn.Module, data, batches: list
) -> tuple[str, float | None]:
    inputs, labels = data
    if labels is not None:
        return "top1", evaluate_labelled(model, (inputs, labels), progress=not args.no_progress)
    if loaded.reference is not None:
        return loaded.reference.metric, float(loaded.reference.evaluate(model))
    if not batches:
        return "output cosine vs float", None
    return "output cosine vs float", output_fidelity(loaded.model, model, batches)["cosine"]


def _deployed(qmodel: nn.Module | None, example: Any) -> tuple[nn.Module | None, str]:
    """``compactnn.deploy(qmodel)`` and a line saying how it went (or why it could not)."""
    if qmodel is None:
        return None, "deploy: nothing to deploy (pass an artifact or --recipe)"
    if example is None:
        return None, "deploy: not possible without sample inputs (pass --data)"
    try:
        deployed = compactnn.deploy(qmodel, example=example)
    except CompactnnError as exc:
        return None, f"deploy: not deployable on int8 kernels: {exc}"
    return deployed, f"deployed on {deployed.backend}: {deployed.verification}"


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Rows (float, compressed when there is one, deployed with ``--deploy``) with quality,
    size and latency, plus the batch size and threads of the timing."""
    loaded, qmodel, qsize, data = _compressed(args)
    batches = as_batches(data[0]) if data[0] is not None else as_batches(loaded.example)
    example = batches[0] if batches else loaded.example
    models = [("float", loaded.model, None), ("compressed", qmodel, qsize)]
    notes = []
    if args.deploy:
        deployed, note = _deployed(qmodel, example)
        models.append(("deployed", deployed, qsize))
        notes.append(note)
    rows = []
    for label, model, size in models:
        if model is None:
            continue
        metric, quality = _quality(args, loaded, model, data, batches[:8])
        timing = (
            time_model(model, example, threads=args.threads, runs=args.runs)
            if (example is not None)
            else None
        )
        sized = qmodel if label == "deployed" else model
        rows.append(
            {
                "model": label,
                "recipe": compactnn.info_of(qmodel).get("recipe").name
                if label != "float"
                else "float",
                "metric": metric,
                "quality": quality,
                "size_bytes": size if size is not None else float_artifact_bytes(sized),
                "theoretical_bytes": theoretical_bytes(sized),
                "latency": timing.to_dict() if timing else None,
                "latency_text": timing.fmt() if timing else "n/a (no input known: pass --data)",
            }
        )
    return {
        "target": args.target,
        "threads": args.threads,
        "batch": batch_size_of(example) if example is not None else None,
        "notes": notes,
        "rows": rows,
    }


def run(args: argparse.Namespace) -> int:
    result = evaluate(args)
    base = result["rows"][0]
    for note in result["notes"]:
        print(note)
    print(f"quality: {base['metric']}")
    print(f"{'':11}{'recipe':>10}{'quality':>11}{'size on disk':>15}{'x smaller':>11}  latency")
    for row in result["rows"]:
        quality = fmt_quality(row["metric"], row["quality"])
        ratio = base["size_bytes"] / row["size_bytes"]
        print(
            f"{row['model']:11}{row['recipe']:>10}{quality:>11}"
            f"{human_bytes(row['size_bytes']):>15}{ratio:>10.2f}x  {row['latency_text']}"
        )
    batch = f", batch {result['batch']}" if result["batch"] is not None else ""
    print(f"(latency: median of {args.runs} runs after warm-up{batch}, {args.threads} threads)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0
