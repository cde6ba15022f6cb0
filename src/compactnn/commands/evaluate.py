"""``compactnn eval MODEL_OR_ARTIFACT``: quality, size and latency next to the float model.

By default the compressed model runs on its delivered form (:func:`compactnn.report.delivery.
deliver`: integer kernels for CNNs, low-bit kernels for transformers): its quality is that
of the deployed model, its latency is timed side by side with every float path, and the
speedup is over the fastest one (named). ``--simulated`` measures the simulated model
instead (no speedup is claimed for it).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

import compactnn
from compactnn.commands._common import (
    add_model_args,
    check_not_an_input,
    human_bytes,
    load_model,
    positive_int,
    source_record,
    split_labels,
    thread_count,
)
from compactnn.commands.eval_data import (
    calibration_inputs,
    check_data_size,
    check_split_labelled,
    drop_lm_labels,
    read_data,
)
from compactnn.commands.eval_notes import calibration_scored_note, simulated_note
from compactnn.commands.eval_table import result_lines, speed_note
from compactnn.commands.hf_checkpoint import float_row_note
from compactnn.core.calib import (
    as_batches,
    batch_size_of,
    call_model,
    expected_inputs,
    input_spec,
    main_output,
)
from compactnn.core.tokens import check_token_ids
from compactnn.deployment.api import DeployedModel
from compactnn.errors import CompactnnError, first_line
from compactnn.export.artifact import artifact_exists, read_header
from compactnn.export.fs import atomic_write_text, check_file_path
from compactnn.export.size import artifact_size, stored_bits
from compactnn.measure import (
    DEFAULT_RUNS,
    DEFAULT_THREADS,
    artifact_bytes,
    float_artifact_bytes,
    output_fidelity,
    theoretical_bytes,
)
from compactnn.measure import evaluate as evaluate_labelled
from compactnn.measure.float_paths import EAGER, fastest_float_path
from compactnn.measure.perplexity import is_causal_lm, nll_totals
from compactnn.measure.quality import no_better_than_guessing
from compactnn.measure.size import check_tmpdir, companion_bytes
from compactnn.measure.timing import omp_wait_policy, spin_count
from compactnn.model_io import LoadedModel, is_hf_model, skeleton_for
from compactnn.training.data import check_labels


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
        help="evaluation inputs: a .safetensors/.npy file (x and y tensors give top-1; of "
        "x_train/y_train and x_test/y_test, x_test/y_test is scored and --recipe calibrates "
        "on x_train), a data set name (mnist, digits, or mnist-cnn, digits-resnet for theirs: "
        "the held-out split) or another reference model's name (its calibration batches)",
    )
    p.add_argument(
        "--simulated",
        action="store_true",
        help="measure the simulated (fake-quantized) model instead of deploying it",
    )
    p.add_argument(
        "--deploy",
        action="store_true",
        help="(the default now) run the compressed model on its deployed form",
    )
    p.add_argument("--quick", action="store_true", help="no torch.compile float path, 3 timed runs")
    p.add_argument(
        "--threads", type=thread_count, default=DEFAULT_THREADS, help="torch threads (2)"
    )
    p.add_argument(
        "--runs", type=positive_int, default=DEFAULT_RUNS, help="timed runs, at least (median)"
    )
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--force", action="store_true", help="replace an existing --json file")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_model_args(p)
    return p


def check_inputs(loaded: LoadedModel, batch: Any, option: str = "--data") -> Any:
    """Run the float model on one batch and return its output; a failure becomes one line
    naming the batch's dtype and shape and the ones the model takes."""
    try:
        with torch.no_grad():
            return call_model(loaded.model.eval(), batch)
    # AssertionError: a torch.export (.pt2) model's input guards ("Guard failed: ...")
    except (RuntimeError, TypeError, ValueError, IndexError, AssertionError) as exc:
        want = expected_inputs(loaded.model, loaded.example, batch)
        ints = isinstance(batch, torch.Tensor) and not batch.is_floating_point()
        if ints and "float" in want:  # a file's floats are cast to the model's dtype, not ints
            want += " (integers are not cast: save floating-point values)"
        raise CompactnnError(
            f"{option} does not fit the model: it holds {input_spec(batch)} "
            f"({first_line(exc)}). Pass {want}."
        ) from exc


def inputs_of(
    args: argparse.Namespace, loaded: LoadedModel, raw: Any = None, note: bool = True
) -> tuple[Any, torch.Tensor | None]:
    """The ``--data`` inputs (checked against the float model) and labels, if any: the
    held-out split of a file or data set that holds two (``raw``: ``--data`` as read, if
    it was; ``note``: say which split is scored)."""
    if not args.data:
        return None, None
    raw = read_data(args.data, loaded) if raw is None else raw
    check_data_size(args.data, loaded, raw)  # images of another size: report's one line
    check_split_labelled(raw, args.data)  # a split without labels: say which keys fit
    inputs, labels = split_labels(raw, note=note, model=loaded.model)
    labels = drop_lm_labels(loaded.model, inputs, labels, args.data)
    check_token_ids(loaded.model, inputs, f"--data {args.data}")  # before a run names neither
    batches = as_batches(inputs, what=f"--data {args.data}")
    out = check_inputs(loaded, batches[0]) if batches else None
    if labels is not None and labels.shape[:1] != batch_rows(inputs):
        raise CompactnnError(
            f"--data holds {batch_rows(inputs)[0]} inputs but {labels.shape[0]} labels (y); "
            "they must match."
        )
    if labels is not None and out is not None:  # before any deployment or timing
        check_top1_labels(main_output(out), labels, f"--data {args.data}")
    return inputs, labels


def check_top1_labels(logits: torch.Tensor, labels: torch.Tensor, where: str) -> None:
    """The float model's output on the first batch must be (N, classes) logits, and every
    label a class index below ``classes``: what top-1 scoring needs."""
    if logits.dim() != 2:
        raise CompactnnError(
            f"{where}: top-1 scoring needs logits of shape (N, classes) but the model outputs "
            f"shape {tuple(logits.shape)}; pass --data without labels (y) to compare outputs."
        )
    check_labels(labels, int(logits.shape[1]), where=where)


def batch_rows(inputs: Any) -> tuple[int, ...]:
    """``(samples,)`` of a tensor or a dict of keyword tensors, ``()`` otherwise."""
    from compactnn.training.data import rows

    return (rows(inputs),) if isinstance(inputs, (torch.Tensor, dict)) else ()


def _compressed(args: argparse.Namespace):
    """The float model, the compressed one (or None), its artifact size, and the ``--data``
    inputs and labels. Sets ``args.stored_bits`` (bits per weight as stored, per layer and
    ``"total"``; empty without a compressed model), ``args.deployed`` (the model of a
    deployed artifact, rebuilt on its recorded backend; ``qmodel`` is then its simulated
    source) and ``args.companion_bytes`` (the verification batch a deployed artifact stores
    beside its model: counted in its size on disk, as every file of it is)."""
    args.stored_bits, args.deployed, args.companion_bytes = {}, None, 0
    if artifact_exists(args.target):
        from compactnn.report.sources import check_skeleton, refuse_changed_weights

        header = read_header(args.target)
        loaded = refuse_changed_weights(
            lambda: skeleton_for(header, args.model, weights=args.weights,
                                 trust_pickle=args.trust_pickle),
            header, "eval compares the artifact with its float model: pass the --weights "
            "(MODEL) it was made from.",
        )  # fmt: skip
        option = f"--model {args.model}" if args.model else "the recorded model"
        check_skeleton(args.target, header, loaded.model, option)
        data = inputs_of(args, loaded)  # checked before a deployed artifact is rebuilt
        qmodel = compactnn.load(args.target, model=loaded.model)
        if isinstance(qmodel, DeployedModel):  # `deploy --save`: re-deployed and verified here
            args.deployed, qmodel = qmodel, qmodel.source
        args.stored_bits = stored_bits(args.target)
        args.companion_bytes = companion_bytes(args.target)
        return loaded, qmodel, artifact_size(args.target), data  # size: every file of it
    if Path(args.target).is_dir() and not (Path(args.target) / "config.json").is_file():
        raise CompactnnError(
            f"{args.target!r} holds neither a compactnn artifact nor a Hugging Face model."
        )
    loaded = load_model(args.target, args)
    raw = read_data(args.data, loaded) if args.data else None
    data = inputs_of(args, loaded, raw, note=not args.recipe)
    if not args.recipe:
        return loaded, None, None, data
    check_tmpdir(  # before compressing: the size needs a temporary copy
        "cannot measure the compressed model's size on disk: eval saves it in a temporary folder"
    )
    # the training split of --data beside the held-out one it scores (not the scored data)
    calib = calibration_inputs(raw, data[0]) if raw is not None else loaded.calib
    qmodel = compactnn.compress(
        loaded.model, args.recipe, calib_data=calib, progress=not args.no_progress
    )
    extra = qmodel._compactnn.setdefault("extra", {})  # as compress records it: same size
    extra["source"] = source_record(loaded)
    extra.update(loaded.extra)
    with tempfile.TemporaryDirectory(prefix="compactnn-eval-") as tmp:
        compactnn.save(qmodel, Path(tmp) / "a")
        args.stored_bits = stored_bits(Path(tmp) / "a")
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


def _kind(model: nn.Module, example: Any) -> str:
    """A Hugging Face model, or one taking keyword inputs (``input_ids``...), is a
    transformer; anything else a CNN."""
    return "transformer" if is_hf_model(model) or isinstance(example, dict) else "cnn"


def _delivered(args, qmodel: nn.Module | None, example: Any) -> tuple[str, Any, str, list]:
    """The compressed row's label, model, runtime and notes (deployed unless --simulated)."""
    # the application: loaded here
    from compactnn.report.delivery import (
        SIMULATED,
        deliver,
        deliver_float,
        deliver_probe_pruned,
        is_plain_float,
        is_probe_pruned,
        runtime_name,
    )

    if qmodel is None:
        return "compressed", None, SIMULATED, []
    if args.simulated:
        return "compressed", qmodel, SIMULATED, ["--simulated: the simulated model is measured"]
    if args.deployed is not None:
        deployed = args.deployed
        return (
            "deployed",
            deployed,
            runtime_name(deployed),
            [
                f"deployed artifact: rebuilt on {deployed.backend} and verified on this machine "
                f"({deployed.verification})"
            ],
        )
    if example is None:
        return "compressed", qmodel, SIMULATED, ["runs simulated: no sample input (pass --data)"]
    if is_plain_float(qmodel):  # e.g. channel-pruned: runs as itself, on its fastest float path
        fast, runtime, notes = deliver_float(
            qmodel, example, quick=args.quick, threads=args.threads
        )
        return "compressed", fast, runtime, notes
    if is_probe_pruned(qmodel):  # its MLPs run on sliced weights: it is its delivered form
        return "compressed", *deliver_probe_pruned(qmodel)
    model, runtime, notes = deliver(_kind(qmodel, example), qmodel, example)
    label = "compressed" if runtime == SIMULATED else "deployed"
    return label, model, runtime, notes


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Rows (float on its fastest path, and the compressed model on its delivered form)
    with quality, size, latency, runtime and speedup, plus the timing's conditions."""
    from compactnn.report.delivery import (
        DENSE_NO_SPEEDUP,
        SIMULATED,
        dense_note,
        rounding_cause,
        same_dense_compute,
        untrained_label,
    )

    loaded, qmodel, qsize, data = _compressed(args)
    batches = as_batches(data[0]) if data[0] is not None else as_batches(loaded.example)
    if not batches and args.deployed is not None:  # the batch it was verified on
        batches = as_batches(args.deployed.example)
    example = batches[0] if batches else loaded.example
    label, delivered, runtime, notes = _delivered(args, qmodel, example)
    if args.companion_bytes:
        notes = [
            *notes,
            "size on disk counts every file of the artifact, the verification batch stored "
            f"beside the model included (deployment.safetensors, "
            f"{human_bytes(args.companion_bytes)} of sample inputs; the model alone: "
            f"{human_bytes(artifact_bytes(args.target))})",
        ]
    paths = None
    if example is not None:
        extra = {label: delivered} if delivered is not None else {}
        paths = fastest_float_path(
            loaded.model,
            example,
            quick=args.quick,
            threads=args.threads,
            runs=3 if args.quick else args.runs,
            extra=extra,
        )
    info = compactnn.info_of(qmodel) if qmodel is not None else {}
    own = calibration_scored_note(  # the data it calibrated on: a flattering score
        info.get("extra", {}), data[0], loaded.model, artifact_exists(args.target)
    )
    notes = [*notes, own] if own is not None else notes
    recipe = getattr(info.get("recipe"), "name", None) if qmodel is not None else None
    entries = [("float", loaded.model, None, "float", None)]
    if delivered is not None:  # a training recipe never trained says so beside its name
        shown = recipe + untrained_label(info) if recipe else recipe
        entries.append((label, delivered, qsize, shown, runtime))
    rows = [_row(args, loaded, data, batches, paths, qmodel, *e) for e in entries]
    if (stored := float_row_note(loaded.source, rows[0]["size_bytes"], qsize)) is not None:
        notes = [*notes, stored]  # a bfloat16/float16 folder: the float row is its float32 copy
    tokens = _perplexities(loaded, data, [e[1] for e in entries], batches[:8], rows)
    for row in rows:  # what the compressed layers store, per weight (float: none)
        row["bits_per_weight_stored"] = None if row is rows[0] else args.stored_bits.get("total")
    labels = data[1]
    doubt = labels is not None and no_better_than_guessing(
        rows[0]["quality"], labels, f"--data {args.data}"
    )
    if doubt:
        print(f"warning: {doubt}", file=sys.stderr)
    simulated = _simulated_quality(args, loaded, qmodel, data, batches, rows[-1])
    said = simulated_note(
        rows[-1], simulated, rounding_cause(delivered) if simulated is not None else None
    )
    if said is not None:
        notes = [*notes, said]
    base = rows[0]["latency"]
    dense = qmodel is not None and same_dense_compute(loaded.model, qmodel)
    for row in rows[1:]:
        fair = base and row["latency"] and row["runtime"] != SIMULATED
        row["speedup"] = base["median_s"] / row["latency"]["median_s"] if fair else None
        if fair and dense:  # unstructured zeros: the float row's compute, timed again
            row["speedup"], row["no_speedup"] = None, DENSE_NO_SPEEDUP
            notes = [*notes, dense_note(base["median_s"], row["latency"]["median_s"])]
        elif fair and (n := speed_note(base, row["latency"])):
            notes = [*notes, n]
    return {
        "target": args.target,
        "threads": args.threads,
        "batch": batch_size_of(example) if example is not None else None,
        "omp_wait_policy": omp_wait_policy() or "unset",
        "gomp_spincount": spin_count() or "unset",
        "float_paths": paths.to_dict() if paths else None,
        "notes": notes,
        "warnings": [doubt] if doubt else [],
        "scored_on_calibration": own is not None,
        "rows": rows,
        "simulated_quality": simulated,
        "stored_bits": dict(args.stored_bits),
        "verification_batch_bytes": args.companion_bytes or None,
        "float_weights": _float_weights(loaded.model, qmodel, recipe, args.stored_bits),
        "perplexity_tokens": tokens,
        "perplexity_data": (f"--data {args.data}" if args.data else "the model's example input")
        if tokens
        else None,
    }


def _perplexities(loaded, data, models: list, batches: list, rows: list) -> int | None:
    """Next-token perplexity of each model (``row["perplexity"]``, and times the float one,
    ``row["perplexity_ratio"]``) on the token ids of ``batches`` (those scored for quality):
    for a causal LM without labels and without a perplexity of its own (``tiny-lm``). Returns
    the number of predicted tokens scored (padding excluded), or None when not scored."""
    for row in rows:
        row["perplexity"] = row["perplexity_ratio"] = None
    own = loaded.reference is not None and loaded.reference.metric == "perplexity"
    if data[1] is not None or own or not batches or not is_causal_lm(loaded.model):
        return None
    for row, model in zip(rows, models, strict=True):
        total, count = nll_totals(model, batches)
        if not count:  # one-token sequences predict nothing
            return None
        row["perplexity"] = math.exp(total / count)
    for row in rows[1:]:
        row["perplexity_ratio"] = row["perplexity"] / rows[0]["perplexity"]
    return int(count)


def _simulated_quality(args, loaded, qmodel, data, batches, row) -> float | None:
    """The simulated model's quality on the data that scored a deployed row (one more
    evaluation pass): what ``compress`` and ``train`` report. None unless the row is a
    deployed (integer-kernel) form of ``qmodel`` scored on labels (``--data`` x/y, or a
    reference model's test split)."""
    if qmodel is None or row["model"] != "deployed":
        return None
    if data[1] is None and loaded.reference is None:
        return None
    return _quality(args, loaded, qmodel, data, batches[:8])[1]


def _float_weights(
    float_model: nn.Module, qmodel: nn.Module | None, recipe: str | None, bits: dict
) -> dict[str, Any] | None:
    """For a compressed model with no compressed layer (e.g. channel-pruned): the width its
    weights are stored at and its parameter count next to the float model's; else None."""
    if qmodel is None or bits:
        return None
    widths = {8 * p.element_size() for p in qmodel.parameters() if p.is_floating_point()}
    return {
        "bits": widths.pop() if len(widths) == 1 else None,
        "params_float": sum(p.numel() for p in float_model.parameters()),
        "params": sum(p.numel() for p in qmodel.parameters()),
        "recipe": recipe,
    }


def _row(args, loaded, data, batches, paths, qmodel, label, model, size, recipe, runtime):
    """One row. The compressed model's quality is measured on the form that is timed; the
    float model's on PyTorch fp32 (eager) whatever float path is fastest: its row's
    ``quality_runtime`` says so beside the ``runtime`` that gave its latency."""
    from compactnn.report.delivery import float_path_name

    metric, quality = _quality(args, loaded, model, data, batches[:8])
    timing = None
    if paths is not None:
        timing = paths.best if label == "float" else paths.timings[label]
    sized = qmodel if label != "float" else model
    return {
        "model": label,
        "recipe": recipe,
        "runtime": (float_path_name(paths.winner) if paths else "fp32 (not timed)")
        if label == "float"
        else runtime,
        "quality_runtime": float_path_name(EAGER) if label == "float" else runtime,
        "metric": metric,
        "quality": quality,
        "size_bytes": size if size is not None else float_artifact_bytes(sized),
        "theoretical_bytes": theoretical_bytes(sized),
        "latency": timing.to_dict() if timing else None,
        "latency_text": timing.fmt() if timing else "n/a (no input known: pass --data)",
    }


def run(args: argparse.Namespace) -> int:
    if args.json:  # before the slow work
        inputs = {"MODEL_OR_ARTIFACT": args.target, "--model": args.model}
        inputs |= {"--weights": args.weights, "--data": args.data}
        check_not_an_input(args.json, "--json", inputs, suggest="eval.json")
        check_file_path(args.json, "--json", force=args.force, suggest="eval.json")
    result = evaluate(args)
    for line in result_lines(args, result):  # the table first, its notes under it
        print(line)
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1))
    return 0
