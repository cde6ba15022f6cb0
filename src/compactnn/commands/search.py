"""``compactnn search MODEL --formats F,... (--max-bytes B | --avg-bits N | --max-bops N |
--max-drop D) --out DIR``: a per-layer mixed-precision recipe."""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import compactnn
from compactnn.commands._common import (
    add_model_args,
    check_model_exists,
    given_path,
    human_bytes,
    load_model,
    model_words,
    positive_int,
    source_record,
)
from compactnn.core.calib import as_batches
from compactnn.errors import CompactnnError
from compactnn.export.fs import atomic_write
from compactnn.measure import artifact_bytes
from compactnn.measure.quality import evaluate
from compactnn.mixed_precision import Budget, search
from compactnn.mixed_precision.result import check_search_folder
from compactnn.model_io import reference_names, resolve_data
from compactnn.training.data import labelled_keys


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "search",
        help="search per-layer formats under a size, bits, BOPs, latency or accuracy budget",
        description="Score every layer at every format on calibration data, allocate formats "
        "with an integer program, and write recipe.yaml (run it with compactnn compress "
        "--recipe DIR/recipe.yaml) and search.json into --out.",
    )
    p.add_argument("model", metavar="MODEL", help="reference name, HF dir, .pt2, or pkg.mod:fn")
    p.add_argument(
        "--formats",
        "-f",
        required=True,
        help="comma-separated short names, e.g. w2a8,w4a8,w8a8 (ch50+w8a8: channel-pruned)",
    )
    p.add_argument(
        "--max-bytes",
        type=float,
        help="bytes of the searched layers' weights at most (packed codes, scales, biases): "
        "not the artifact, which adds the layers kept in float, recipe.yaml and its header "
        "(the artifact's size is measured and printed beside it)",
    )
    p.add_argument("--avg-bits", type=float, help="average weight bits at most")
    p.add_argument("--max-bops", type=float, help="bit-operations per sample at most")
    p.add_argument(
        "--max-latency-ratio",
        type=float,
        help="deployed latency at most this fraction of the widest format's uniform recipe "
        "(per-layer table measured on the int8 runtime; the result is timed end to end)",
    )
    p.add_argument(
        "--max-drop",
        type=float,
        help="accuracy-aware: the smallest recipe whose quality drop is at most this (top-1 "
        "points on the held-out x_test/y_test of --data, else on its labelled x/y, which also "
        "calibrate; else the reference model's own evaluation)",
    )
    p.add_argument(
        "--max-evals", type=positive_int, default=8, help="full evaluations (with --max-drop)"
    )
    p.add_argument("--measure", choices=("measured", "hessian"), default="measured")
    p.add_argument("--first-last-min-bits", type=int, help="first/last layers keep >= N bits")
    p.add_argument("--embeddings", help="short name for embedding tables (e.g. w4-g32)")
    p.add_argument(
        "--data",
        "-d",
        help="calibration inputs (.safetensors/.npy or a data set; x_train of a file that also "
        "holds x_test/y_test, which --max-drop scores)",
    )
    p.add_argument("--out", "-o", required=True, help="folder for recipe.yaml and search.json")
    p.add_argument("--force", action="store_true", help="replace an earlier search in --out")
    p.add_argument(
        "--groups",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="offer whole residual streams as channel-pruning choices (default: only with "
        "--max-latency-ratio and ch<P>+ formats)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_model_args(p)
    return p


SENSITIVITY = "sensitivity.json"


def check_search_out(out: Path, force: bool) -> None:
    """Refuse, before any work, an ``--out`` the search's files would damage: a compactnn
    artifact (its recipe.yaml would be replaced), a folder of other files, or an earlier
    search without ``--force``."""
    check_search_folder(out, force, cli=True)


def check_search_data(data: str | None, model_spec: str) -> None:
    """Refuse, before the model is loaded, a search without calibration inputs (only
    reference models bring their own) or with ``--data data-free`` (a compress option)."""
    if data == "data-free":
        raise CompactnnError(
            "compactnn search does not take --data data-free (only compactnn compress generates "
            "calibration images): pass --data FILE (.safetensors or .npy inputs; to search on "
            "generated images, save data = compactnn.datafree.generate(model, 256, "
            "input_shape=(C, H, W)) with safetensors.torch.save_file({'x': data.x}, "
            "'gen.safetensors')), or leave --data out for a reference model."
        )
    if data is None and model_spec not in reference_names():
        check_model_exists(model_spec)  # a missing MODEL is named before the missing --data
        raise CompactnnError(
            "compactnn search scores every layer on calibration inputs and MODEL brings none: "
            "pass --data FILE (.safetensors or .npy model inputs from the training split; a "
            "labelled file with x and y also works)."
        )


def data_keys(data: Any) -> tuple[tuple[str, str] | None, tuple[str, str] | None]:
    """``(scored, calibrating)`` key pairs of a labelled ``--data`` mapping: ``--max-drop``
    scores the held-out split ``x_test``/``y_test`` when there is one, else the labelled
    pair that also calibrates (``x_train``/``y_train``, ``x``/``y``, ``inputs``/``labels``;
    a file's only split, ``x_test``/``y_test`` alone included, does both);
    ``(None, None)`` for unlabelled data.

    Example:
        >>> data_keys(dict.fromkeys(["x_train", "y_train", "x_test", "y_test"], torch.ones(1)))
        (('x_test', 'y_test'), ('x_train', 'y_train'))
        >>> data_keys(dict.fromkeys(["x", "y"], torch.ones(1)))
        (('x', 'y'), ('x', 'y'))
        >>> data_keys(dict.fromkeys(["x_test", "y_test"], torch.ones(1)))
        (('x_test', 'y_test'), ('x_test', 'y_test'))
    """
    if not isinstance(data, dict):
        return None, None
    tensors = [k for k, v in data.items() if isinstance(v, torch.Tensor)]
    calib = labelled_keys(tensors, "train") or labelled_keys(tensors, "eval")
    return labelled_keys(tensors, "eval") or calib, calib


def evaluation(args: argparse.Namespace, loaded, labelled, keys) -> tuple[Callable | None, dict]:
    """The quality ``--max-drop`` compares and what it is measured on (``measured_on``,
    ``in_sample``: recorded in search.json's budget): top-1 on the ``keys``
    ``(scored, calibrating)`` pairs of labelled ``--data`` (a warning when they are the same
    samples), else a reference model's held-out evaluation; ``(None, {})`` without
    ``--max-drop``."""
    if args.max_drop is None:
        return None, {}
    if labelled:
        (kx, ky), calib = keys
        in_sample = keys[0] == calib
        where = f"{kx}/{ky} of --data {args.data}"
        said = " (the calibration samples)" if in_sample else f" (held out; {calib[0]} calibrates)"
        print(f"quality for --max-drop: top-1 (%) on {where}{said}")
        if in_sample:
            print(
                f"warning: the --max-drop drop is measured on the calibration samples ({where} "
                "also calibrate the search), so it may be optimistic; for a held-out measurement "
                "give a file with x_train/y_train (calibration) and x_test/y_test (scoring).",
                file=sys.stderr,
            )
        measured = {"measured_on": f"top-1 (%) on {where}{said}", "in_sample": in_sample}
        return (lambda model: evaluate(model, labelled)), measured
    if loaded.reference is not None:
        measured = {"measured_on": f"{args.model}'s held-out evaluation", "in_sample": False}
        return loaded.reference.evaluate, measured
    raise CompactnnError(
        "--max-drop compares the quality of each candidate with the float model's, and "
        "MODEL has no evaluation of its own: pass labelled --data FILE (a .safetensors with "
        "inputs x and integer class labels y; top-1 on it is the quality and x calibrates), "
        "or use a reference model (its held-out evaluation)."
    )


def latency_example(args: argparse.Namespace, loaded, inputs) -> object:
    """The batch ``--max-latency-ratio`` times: the first batch of ``--data`` when given,
    else MODEL's own example (reference models, HF folders, .pt2 archives)."""
    if args.max_latency_ratio is None:
        return None
    if args.data is not None:
        return as_batches(inputs)[0]
    if loaded.example is None:
        raise CompactnnError(
            "--max-latency-ratio times the model on an example batch and MODEL brings none: "
            "pass --data FILE (its first batch of 32 inputs is timed)."
        )
    return loaded.example


def run(args: argparse.Namespace) -> int:
    limits = {
        "max_bytes": args.max_bytes,
        "avg_bits": args.avg_bits,
        "max_bops": args.max_bops,
        "max_latency_ratio": args.max_latency_ratio,
    }
    budget = Budget(**limits) if any(v is not None for v in limits.values()) else None
    if budget is None and args.max_drop is None:
        raise CompactnnError(
            "compactnn search needs a budget: --max-bytes, --avg-bits, --max-bops, "
            "--max-latency-ratio or --max-drop."
        )
    out = given_path(args.out, "--out")
    check_search_out(out, args.force)  # before the (slow) search
    check_search_data(args.data, args.model)  # before loading the model
    loaded = load_model(args.model, args)
    raw = resolve_data(args.data, loaded)
    scored, calib_keys = data_keys(raw)  # a file's held-out split scores --max-drop
    calib = raw[calib_keys[0]] if calib_keys else raw  # and its training split calibrates
    labelled = (raw[scored[0]], raw[scored[1]]) if scored else None
    eval_fn, measured = evaluation(args, loaded, labelled, (scored, calib_keys))
    example = latency_example(args, loaded, calib)
    with tempfile.TemporaryDirectory(prefix="compactnn-search-") as staging:
        cache = Path(staging)
        if (out / SENSITIVITY).is_file():  # an earlier search's scores (--force): reused
            shutil.copyfile(out / SENSITIVITY, cache / SENSITIVITY)
        result = search(
            loaded.model,
            formats=args.formats,
            budget=budget,
            calib_data=calib,
            eval_fn=eval_fn,
            max_drop=args.max_drop,
            measure=args.measure,
            first_last_min_bits=args.first_last_min_bits,
            embeddings=args.embeddings,
            max_evals=args.max_evals,
            cache_dir=cache,
            latency_example=example,
            groups=args.groups,
            progress=not args.no_progress,
        )
        result.budget.update(measured)  # what --max-drop's quality was measured on
        if args.max_bytes is not None:  # the budget bounds a payload: the file is measured
            result.budget["artifact_bytes"] = measured_artifact_bytes(loaded, result.recipe, calib)
        result.save(out, force=args.force)  # only now: a search that fails leaves --out as it was
        if (cache / SENSITIVITY).is_file():
            atomic_write(out / SENSITIVITY, lambda tmp: shutil.copyfile(cache / SENSITIVITY, tmp))
    print_summary(result, args)
    print(f"  wrote {out / 'recipe.yaml'} and {out / 'search.json'}")
    words = ["compactnn", "compress", args.model, "--recipe", str(out / "recipe.yaml")]
    print(f"  compress with it: {shlex.join(words + model_words(args, loaded))}")
    return 0


def measured_artifact_bytes(loaded, recipe, calib) -> int:
    """Bytes on disk of the artifact the found recipe gives: the loaded MODEL (not changed)
    compressed with ``recipe`` on ``calib``, with the source record ``compactnn compress``
    adds, saved to a temporary folder (what ``compactnn compress --recipe DIR/recipe.yaml``
    writes), warnings silenced (the compress the user runs shows them)."""
    with tempfile.TemporaryDirectory(prefix="compactnn-search-size-") as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qmodel = compactnn.compress(loaded.model, recipe, calib_data=calib, progress=False)
        extra = qmodel._compactnn.setdefault("extra", {})
        extra["source"] = source_record(loaded)  # as compress records it: header bytes
        extra.update(loaded.extra)
        compactnn.save(qmodel, Path(tmp) / "a")
        return artifact_bytes(Path(tmp) / "a")


def size_lines(
    payload: float, artifact: int | None, max_bytes: float | None, floor: float | None = None
) -> list[str]:
    """The searched layers' payload (what ``--max-bytes`` bounds) and, when measured, the
    artifact's bytes on disk, with a note when the artifact exceeds ``--max-bytes``
    (``floor``: the smallest reachable payload, below which no ``--max-bytes`` is suggested).

    Example:
        >>> for line in size_lines(11_236, 21_464, 12_000): print(line[:58])
          searched layers: 11.0 KiB (11,236 B; what --max-bytes 12
          artifact on disk: 21.0 KiB (21,464 B, measured: the mode
          note: the artifact is 9,464 B over --max-bytes 12,000: t
    """
    bound = f"; what --max-bytes {max_bytes:,.0f} bounds" if max_bytes is not None else ""
    lines = [
        f"  searched layers: {human_bytes(payload)} ({payload:,.0f} B{bound}: the packed "
        "weight codes, scales and biases of the searched layers only)"
    ]
    if artifact is not None:
        lines.append(
            f"  artifact on disk: {human_bytes(artifact)} ({artifact:,} B, measured: the model "
            "compressed with recipe.yaml and saved; adds the layers kept in float, "
            "recipe.yaml and the header)"
        )
    if artifact is not None and max_bytes is not None and artifact > max_bytes:
        rest = artifact - payload  # float layers, recipe.yaml, header (and sparse savings)
        fix = (
            f"for an artifact of at most {max_bytes:,.0f} B, search with --max-bytes "
            f"{max_bytes - rest:,.0f} (the rest of the artifact, {rest:,.0f} B, staying the same)"
            if max_bytes > rest
            else f"the rest of the artifact alone takes {rest:,.0f} B"
        )
        if floor is not None and rest < max_bytes < rest + floor:
            fix = (
                f"an artifact of at most {max_bytes:,.0f} B is out of reach with these formats: "
                f"the rest of the artifact takes {rest:,.0f} B and the searched layers at least "
                f"{floor:,.0f} B (a smaller --embeddings format or cheaper formats shrink it)"
            )
        lines.append(
            f"  note: the artifact is {artifact - max_bytes:,.0f} B over --max-bytes "
            f"{max_bytes:,.0f}: the budget bounds the searched layers, not the file; {fix}"
        )
    return lines


def pruning_lines(result) -> list[str]:
    """The channel pruning a result chose: each pruned residual group with its ratio."""
    return [
        f"  channel pruning: residual group {','.join(g['layers'])} at {g['chosen']} "
        f"({g['chosen'][2:]}% of its channels removed)"
        for g in result.groups
        if g["chosen"] != "keep"
    ]


def bits_line(result, avg_bits: float | None) -> str:
    """The average bits per weight: the kept weights' code bits over the searched layers'
    weight count before any pruning (the quantity ``--avg-bits`` bounds; a ``ch<P>+`` format
    is priced on its own kept rows, the next layer's removed inputs not counted)."""
    pruned = any(g["chosen"] != "keep" for g in result.groups) or any(
        f.startswith("ch") for f in result.assignment.values()
    )
    n = f"{int(result.cost['weights']):,}"
    over = f"code bits of the kept weights / the {n} weights before pruning" if pruned else ""
    over = over or f"over {n} weights"
    limit = f"; budget {avg_bits:g}" if avg_bits is not None else ""
    return f"  average bits per weight: {result.cost['avg_bits']:.3g} ({over}{limit})"


def print_summary(result, args: argparse.Namespace) -> None:
    """The search's result in a few lines: formats, pruning, size, bits, trials, latency."""
    counts: dict[str, int] = {}
    for fmt in result.assignment.values():
        counts[fmt] = counts.get(fmt, 0) + 1
    print(f"searched {len(result.layers)} layers in {result.seconds:.1f} s")
    print("  formats: " + ", ".join(f"{f} x{n}" for f, n in counts.items()))
    for line in pruning_lines(result):
        print(line)
    floor = min((p["bytes"] for p in result.frontier), default=None)  # cheapest reachable
    for line in size_lines(
        result.cost["bytes"], result.budget.get("artifact_bytes"), args.max_bytes, floor
    ):
        print(line)
    if "avg_bits" in result.cost:
        print(bits_line(result, args.avg_bits))
    for t in result.tried:
        mark = "ok " if t["passed"] else "no "
        print(f"  tried ({t['stage']}): {mark} drop {t['drop']:.3f}, {human_bytes(t['bytes'])}")
    check = result.latency.get("check")
    if check:
        print(
            f"  deployed latency: {check['measured_ms']:.2f} ms vs {check['reference']} "
            f"{check['reference_ms']:.2f} ms (ratio {check['measured_ratio']:.2f}, CPU-time "
            f"ratio {check['cpu_ratio']:.2f}); per-layer proxy {check['proxy_ms']:.2f} ms "
            f"(error {100 * check['proxy_error']:+.0f}%)"
        )
    if result.budget.get("met") is True:
        print(
            f"  latency budget met: {result.budget['measured_ratio']:.2f}x <= "
            f"--max-latency-ratio {args.max_latency_ratio:g}"
        )
    elif result.budget.get("met") is False:
        print(f"  budget NOT met: {result.budget['not_met']}")
