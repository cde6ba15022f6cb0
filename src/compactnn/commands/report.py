"""``compactnn report ART [ART ...] --model MODEL --data labelled.safetensors --out DIR
[--force]``: the report (Markdown, HTML, Pareto plot, JSON) of artifacts of one model on
labelled data."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from compactnn.commands._common import add_model_args, positive_int
from compactnn.errors import CompactnnError
from compactnn.measure import DEFAULT_RUNS, DEFAULT_THREADS


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "report",
        help="report quality, size and latency of artifacts of one model on labelled data",
        description=(
            "Load each artifact into the float MODEL, measure top-1 on the labelled --data "
            "(tensors 'x' and 'y' in a .safetensors file), size on disk and latency (simulated, "
            "and int8 kernels where compactnn.deploy succeeds), beside the float model; write "
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
        help="labelled data: a .safetensors file with inputs 'x' and integer labels 'y'",
    )
    p.add_argument("--out", "-o", required=True, help="report directory")
    p.add_argument("--force", action="store_true", help="replace an existing report in --out")
    p.add_argument("--title", help="the report's heading")
    p.add_argument(
        "--threads", type=positive_int, default=DEFAULT_THREADS, help="torch threads (2)"
    )
    p.add_argument(
        "--runs", type=positive_int, default=DEFAULT_RUNS, help="timed runs, at least (median)"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--quick", action="store_true", help="leave torch.compile out of the float paths"
    )
    add_model_args(p)
    return p


def read_labelled(spec: str) -> dict:
    """The tensors of a labelled ``.safetensors`` file (inputs and labels)."""
    from compactnn.model_io import read_tensors

    if Path(spec).suffix != ".safetensors":
        raise CompactnnError(
            f"--data {spec!r} must be a .safetensors file holding inputs 'x' and labels 'y' "
            "(a .npy file holds one array, so it has no labels)."
        )
    return read_tensors(spec)


def run(args: argparse.Namespace) -> int:
    from compactnn.model_io import skeleton_for
    from compactnn.report import build_report, labelled_data
    from compactnn.report.any_model import (
        HEADER,
        check_artifacts,
        check_report_folder,
        table_rows,
    )

    if args.runs < 1 or args.threads < 1:
        raise CompactnnError("--runs and --threads must be at least 1.")
    check_report_folder(args.out, args.force, cli=True)
    headers = check_artifacts(args.artifacts)  # before loading anything: cheap refusals first
    data = labelled_data(read_labelled(args.data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = skeleton_for(
            headers[0], args.model, weights=args.weights, trust_pickle=args.trust_pickle
        )
    for w in caught:
        if "is not the file this artifact was made from" in str(w.message):
            raise CompactnnError(
                f"{w.message} A report compares the artifacts with their float model: pass the "
                "--weights (MODEL) they were made from."
            )
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    results = build_report(
        args.artifacts,
        model=loaded.model,
        data=data,
        out=args.out,
        threads=args.threads,
        title=args.title,
        runs=args.runs,
        progress=not args.no_progress,
        quick=args.quick,
        force=args.force,
    )
    lines = [HEADER, *table_rows(results)]
    widths = [max(len(str(c)) for c in col) for col in zip(*lines, strict=True)]
    for line in lines:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    print(f"\nreport: {args.out}/report.html (also report.md, pareto.png, results.json)")
    return 0
