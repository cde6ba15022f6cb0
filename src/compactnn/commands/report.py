"""``compactnn report ART [ART ...] --model MODEL --data FILE --out DIR [--force]
[--no-memory]``: the report (Markdown, HTML, Pareto plot, JSON) of artifacts of one model on
the user's data: labelled (top-1), or inputs alone (next-token perplexity for a causal LM,
else output cosine vs the float model), with each row's resident memory (its delivered form
in a fresh process) unless ``--no-memory``."""

from __future__ import annotations

import argparse
from pathlib import Path

from compactnn.commands._common import add_model_args, given_path, positive_int, thread_count
from compactnn.commands.eval_data import EVAL_DATA_SETS, check_input_size
from compactnn.errors import CompactnnError
from compactnn.measure import DEFAULT_RUNS, DEFAULT_THREADS


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "report",
        help="report quality, size and latency of artifacts of one model on your data",
        description=(
            "Load each artifact into the float MODEL, measure quality on --data (top-1 on "
            "labelled data: tensors 'x' and 'y' in a .safetensors file; on inputs alone, such "
            "as token ids 'input_ids'/'attention_mask' or a .npy array: next-token perplexity "
            "for a causal language model, lower is better, else mean output cosine vs the "
            "float model), size on disk and latency (simulated, and int8 or low-bit kernels "
            "where compactnn.deploy or to_kernels succeeds), beside the float model, and the "
            "resident memory of each row's delivered form in a fresh process; write "
            "report.md, report.html, pareto.png and results.json into --out: a new or empty "
            "folder, or one holding an earlier report (replaced only with --force)."
        ),
    )
    p.add_argument("artifacts", metavar="ART", nargs="+", help="artifact directories")
    p.add_argument(
        "--model",
        "-m",
        help="the float MODEL the artifacts were made from (needed unless a reference model)",
    )
    p.add_argument(
        "--data",
        "-d",
        required=True,
        help="a .safetensors file with inputs 'x' and integer labels 'y' (top-1), or inputs "
        "alone: a .safetensors (e.g. input_ids, attention_mask) or .npy file; or a reference "
        "model's name: mnist-cnn and digits-resnet give top-1 on their data set's held-out "
        "test split (so do the data set names mnist, digits), the others their calibration "
        "batches (inputs alone)",
    )
    p.add_argument("--out", "-o", required=True, help="report directory")
    p.add_argument("--force", action="store_true", help="replace an existing report in --out")
    p.add_argument("--title", help="the report's heading")
    p.add_argument(
        "--threads", type=thread_count, default=DEFAULT_THREADS, help="torch threads (2)"
    )
    p.add_argument(
        "--runs", type=positive_int, default=DEFAULT_RUNS, help="timed runs, at least (median)"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--quick", action="store_true", help="leave torch.compile out of the float paths"
    )
    p.add_argument(
        "--no-memory",
        action="store_true",
        help="skip the resident memory column (each row's delivered form measured in a fresh "
        "process, two at a time: about 5-20 s per row)",
    )
    add_model_args(p)
    return p


# a reference model (or data set) name -> its labelled data set (held-out x_test/y_test)
# a data set name, or a reference model's name -> its labelled data set (eval's table)
LABELLED_DATA_SETS = EVAL_DATA_SETS


def read_labelled(spec: str) -> object | None:
    """The tensors of a labelled ``.safetensors`` file (inputs and labels), or the labelled
    data set of a reference model's name (:data:`LABELLED_DATA_SETS`: its held-out test split
    is scored, as the reference scores itself), or None for a file of inputs alone or
    another reference's name (read once the model is loaded: :func:`read_inputs`)."""
    from compactnn.commands.train import labelled_data as data_set
    from compactnn.model_io import read_tensors, reference_names
    from compactnn.training.data import labelled_keys

    if spec in LABELLED_DATA_SETS:
        _split_note(spec, ["x_train", "y_train", "x_test", "y_test"])
        return data_set(LABELLED_DATA_SETS[spec])
    if spec in reference_names():
        return None
    if Path(spec).suffix not in (".safetensors", ".npy"):
        names = ", ".join(sorted({*reference_names(), *LABELLED_DATA_SETS}))
        raise CompactnnError(
            f"--data {spec!r} must be a .safetensors file (inputs 'x' and labels 'y', or "
            "inputs alone such as input_ids/attention_mask), a .npy file of inputs, or a "
            f"reference model or data set name ({names})."
        )
    if Path(spec).suffix == ".npy":
        return None
    tensors = read_tensors(spec)
    if (keys := labelled_keys(tensors, "eval")) is None:
        return None
    _split_note(spec, list(tensors), keys)
    return tensors


def _split_note(spec: str, names: list[str], used: tuple[str, str] = ("x_test", "y_test")):
    """Say on stderr which labelled split of ``--data`` is scored when it holds two, as
    ``compactnn eval`` does (the training split is not used)."""
    import sys

    from compactnn.training.data import split_note

    if note := split_note(names, used, f"--data {spec}"):
        print(f"note: {note}", file=sys.stderr)


def read_inputs(args: argparse.Namespace, loaded) -> object:
    """``--data`` without labels, read and checked against the float model as ``compactnn
    eval`` does (a file whose only labelled split is x_train/y_train gives that pair); a
    reference model's name without a labelled data set gives its calibration batches, joined
    into one input (:func:`join_batches`; said on stderr: training data, not held out)."""
    import sys

    from compactnn.commands.evaluate import inputs_of
    from compactnn.model_io import reference_names

    if args.data in reference_names():
        from compactnn.models import load_reference

        print(
            f"note: --data {args.data} scores on the reference's calibration batches (its "
            "training data, not held out) as inputs alone; pass a held-out file for a fairer "
            "score.",
            file=sys.stderr,
        )
        return join_batches(load_reference(args.data, progress=False).calib, args.data)
    inputs, labels = inputs_of(args, loaded)
    return inputs if labels is None else (inputs, labels)


def join_batches(batches: list, name: str) -> object:
    """Batches (tensors, or dicts of keyword tensors) joined along the first dimension.

    Example:
        >>> import torch
        >>> join_batches([torch.zeros(2, 3), torch.ones(1, 3)], "r").shape
        torch.Size([3, 3])
        >>> join_batches([{"ids": torch.zeros(2, 4)}, {"ids": torch.ones(1, 4)}], "r")["ids"].shape
        torch.Size([3, 4])
    """
    import torch

    try:
        if all(isinstance(b, dict) for b in batches):
            return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
        return torch.cat(list(batches))
    except (RuntimeError, TypeError, KeyError) as exc:
        raise CompactnnError(
            f"--data {name}: its calibration batches cannot be joined into one input "
            f"({exc}); pass a .safetensors or .npy file of inputs."
        ) from exc


def model_source(loaded, trust_pickle: bool) -> dict:
    """The MODEL as the user named it (files as absolute paths), for the resident memory
    children that rebuild it (:func:`compactnn.report.plain_model.float_record`)."""

    def absolute(path: str | None) -> str | None:
        return str(Path(path).resolve()) if path and Path(path).exists() else path

    return {
        "model": loaded.source if loaded.reference is not None else absolute(loaded.source),
        "weights": absolute(loaded.weights),
        "trust_pickle": bool(trust_pickle),
    }


def run(args: argparse.Namespace) -> int:
    from compactnn.commands.term_table import render, terminal_width
    from compactnn.model_io import skeleton_for
    from compactnn.report import build_report, labelled_data
    from compactnn.report.any_model import check_report_folder
    from compactnn.report.any_model_table import header, table_rows
    from compactnn.report.sources import check_artifacts, check_skeleton, refuse_changed_weights

    if args.runs < 1 or args.threads < 1:
        raise CompactnnError("--runs and --threads must be at least 1.")
    given_path(args.out, "--out")  # "" would be the current folder
    check_report_folder(args.out, args.force, cli=True)
    headers = check_artifacts(args.artifacts)  # before loading anything: cheap refusals first
    labelled = read_labelled(args.data)
    data = labelled_data(labelled) if labelled is not None else None
    loaded = refuse_changed_weights(
        lambda: skeleton_for(
            headers[0], args.model, weights=args.weights, trust_pickle=args.trust_pickle
        ),
        headers[0],
        "A report compares the artifacts with their float model: pass the --weights (MODEL) "
        "they were made from.",
    )
    option = f"--model {args.model}" if args.model else "the recorded model"
    check_skeleton(str(args.artifacts[0]), headers[0], loaded.model, option)
    if data is None:
        data = read_inputs(args, loaded)
    check_input_size(args.data, loaded, data)
    results = build_report(
        args.artifacts,
        model=loaded.model,
        data=labelled if labelled is not None else data,  # a split: its note in the report
        out=args.out,
        threads=args.threads,
        title=args.title,
        runs=args.runs,
        progress=not args.no_progress,
        quick=args.quick,
        force=args.force,
        memory=not args.no_memory,
        source=model_source(loaded, args.trust_pickle),
        data_name=f"--data {args.data}",
    )
    for line in render(header(results), table_rows(results), terminal_width()):
        print(line)  # aligned, or a block per row where the terminal is too narrow
    if results.get("resident_note"):
        print(results["resident_note"])
    print(f"\nreport: {args.out}/report.html (also report.md, pareto.png, results.json)")
    return 0
