"""``compactnn search MODEL --formats F,... (--max-bytes B | --avg-bits N | --max-bops N |
--max-drop D) --out DIR``: a per-layer mixed-precision recipe."""

from __future__ import annotations

import argparse
import math
import re
import sys
import tempfile
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

import compactnn
from compactnn.commands import search_cache
from compactnn.commands._common import (
    add_model_args,
    check_model_exists,
    given_path,
    load_model,
    model_words,
    non_negative_float,
    positive_int,
    source_record,
    split_labels,
)
from compactnn.commands._path_args import shell_join, shown_path
from compactnn.commands.eval_data import check_split_labelled
from compactnn.commands.evaluate import inputs_of
from compactnn.commands.search_report import (  # noqa: F401  (size_lines: the command's API)
    bits_line,
    print_summary,
    pruning_lines,
    size_lines,
)
from compactnn.core.calib import as_batches
from compactnn.errors import CompactnnError
from compactnn.measure import artifact_bytes
from compactnn.measure.quality import evaluate
from compactnn.mixed_precision import Budget, search
from compactnn.mixed_precision.result import check_search_folder
from compactnn.mixed_precision.sensitivity import cache_report
from compactnn.model_io import reference_names, resolve_data
from compactnn.recipe import parse_short_name
from compactnn.training.data import labelled_keys, split_pair


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
        type=budget_number("100000"),
        help="bytes of the searched layers' weights at most (packed codes, scales, biases): "
        "not the artifact, which adds the layers kept in float, recipe.yaml and its header "
        "(the artifact's size is measured and printed beside it)",
    )
    p.add_argument("--avg-bits", type=budget_number("4"), help="average weight bits at most")
    p.add_argument(
        "--max-bops", type=budget_number("1e9"), help="bit-operations per sample at most"
    )
    p.add_argument(
        "--max-latency-ratio",
        type=budget_number("0.5"),
        help="deployed latency at most this fraction of the widest format's uniform recipe "
        "(per-layer table measured on the int8 runtime; the result is timed end to end)",
    )
    p.add_argument(
        "--max-drop",
        type=non_negative_float,
        help="accuracy-aware: the smallest recipe whose quality drop is at most this (top-1 "
        "points, 0 to 100, on x_val/y_val of --data when it holds them, else on its "
        "x_test/y_test (or input_ids_test/y_test: the test split then selects the recipe, "
        "as search.json says), else on its labelled x/y (or input_ids/y), which also "
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


SENSITIVITY = search_cache.SENSITIVITY


def budget_number(example: str) -> Callable[[str], float]:
    """An argparse ``type=`` for a budget flag: a finite number above 0 (argparse names the
    flag in its message; ``example``: a value to suggest).

    Example:
        >>> budget_number("4")("2.5")
        2.5
    """

    def number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a finite number above 0, e.g. {example}"
            )
        return value

    return number


def check_embeddings(value: str | None, model: nn.Module | None = None) -> str | None:
    """``--embeddings`` checked: a short name (refused in the flag's words otherwise); None,
    with a warning, when ``model`` (once loaded) has no embedding table to quantize."""
    if value is None:
        return None
    try:
        parse_short_name(value)
    except CompactnnError as exc:
        raise CompactnnError(
            f"--embeddings {value!r} is not a format for the embedding tables: pass a short "
            "name such as w4-g32 or w8-g32 (`compactnn recipes` lists the forms)."
        ) from exc
    if model is not None and not any(isinstance(m, nn.Embedding) for m in model.modules()):
        print(
            f"warning: --embeddings {value} ignored: MODEL has no embedding table "
            "(nn.Embedding) to quantize; leave --embeddings out.",
            file=sys.stderr,
        )
        return None
    return value


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


def search_data(
    args: argparse.Namespace, loaded, raw: Any
) -> tuple[Any, tuple[Any, torch.Tensor] | None, tuple[str, str | None] | None]:
    """``(calibration inputs, labelled, names)`` of ``--data`` as read (``raw``), read as
    ``compactnn eval`` reads it (x/y tensors, or named inputs such as ``input_ids`` beside
    ``y``; of a file holding a ``_train`` and a ``_test`` split, the training split
    calibrates). With ``--max-drop``: ``labelled`` is the ``(inputs, labels)`` pair it scores
    (checked against the float model, as ``eval`` checks it) and ``names`` is
    ``(scored, calibrating)``, the latter None when the scored samples also calibrate;
    both None for unlabelled data or without ``--max-drop``."""
    if args.data is None:
        return raw, None, None
    check_split_labelled(raw, args.data)  # a split without labels: say which keys fit
    model = loaded.model
    pair = split_pair(raw)  # (training split, held-out split, its inputs' name, its inputs)
    if args.max_drop is None:
        calib = pair[3] if pair else split_labels(raw, "train", note=False, model=model)[0]
        return calib, None, None
    if (val := validation_split(raw)) is not None:  # selects; x_test stays for eval/report
        rest = {k: v for k, v in raw.items() if k not in VAL_KEYS}
        inputs, labels = inputs_of(args, loaded, {"x": val[0], "y": val[1]}, note=False)
        if pair is not None:
            return pair[3], (inputs, labels), ("/".join(VAL_KEYS), pair[2])
        keys = labelled_keys(rest, "train")
        calib = rest[keys[0]] if keys else split_labels(rest, "train", note=False, model=model)[0]
        return calib, (inputs, labels), ("/".join(VAL_KEYS), keys[0] if keys else "the rest")
    inputs, labels = inputs_of(args, loaded, raw, note=False)
    if labels is None:
        return inputs, None, None
    if pair is not None:
        keyword = pair[1].startswith("the ")
        if keyword:  # named inputs with y_train / y_test
            return pair[3], (inputs, labels), ("the *_test tensors", "the *_train tensors")
        return pair[3], (inputs, labels), (pair[1], pair[2])
    tensors = [k for k, v in raw.items() if isinstance(v, torch.Tensor)]
    keys = labelled_keys(tensors, "eval") or labelled_keys(tensors, "train")
    if keys is None:  # named inputs beside their labels
        label = next(k for k in ("y_test", "y_train", "y", "labels") if k in raw)
        keys = (", ".join(sorted(inputs)) if isinstance(inputs, dict) else "inputs", label)
    return inputs, (inputs, labels), ("/".join(keys), None)


VAL_KEYS = ("x_val", "y_val")


def validation_split(raw: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(x_val, y_val)`` of a ``--data`` mapping that holds both as tensors: the split
    ``--max-drop`` selects on, leaving ``x_test``/``y_test`` unseen by the search."""
    if not isinstance(raw, dict):
        return None
    pair = tuple(raw.get(k) for k in VAL_KEYS)
    return pair if all(isinstance(t, torch.Tensor) for t in pair) else None  # type: ignore


def selection_note(scored: str) -> str | None:
    """The line saying a ``--max-drop`` search selected on a test split (``scored``), so a
    score of the chosen recipe on that split is not held out; None for any other split.

    Example:
        >>> selection_note("x_test/y_test")[:66]
        'selected on x_test/y_test: a held-out score of the chosen recipe n'
        >>> selection_note("x_val/y_val") is None
        True
    """
    if "test" not in scored:
        return None
    return (
        f"selected on {scored}: a held-out score of the chosen recipe needs data the search "
        f"did not see (eval/report on {scored} is optimistic): add x_val/y_val to --data, "
        "which --max-drop then selects on, keeping the test split for eval and report"
    )


def evaluation(args: argparse.Namespace, loaded, labelled, names) -> tuple[Callable | None, dict]:
    """The quality ``--max-drop`` compares and what it is measured on (``measured_on``,
    ``in_sample``: recorded in search.json's budget): top-1 on the ``labelled`` pair of
    ``--data`` (``names``: ``(scored, calibrating)``; a warning when the scored samples also
    calibrate), else a reference model's held-out evaluation; ``(None, {})`` without
    ``--max-drop``. Each evaluation is said as it ends (:func:`watched`)."""
    if args.max_drop is None:
        return None, {}
    if labelled:
        scored, calib = names
        in_sample = calib is None
        where = f"{scored} of --data {args.data}"
        verb = "calibrate" if calib and calib.startswith("the ") else "calibrates"
        said = " (the calibration samples)"
        if not in_sample:  # unseen by calibration; a test split still selects the recipe
            kept = "the search never reads x_test/y_test" if scored == "/".join(VAL_KEYS) else None
            kept = kept or "not held out from the search: it selects the recipe"
            said = f" (not used for calibration, {calib} {verb}; {kept})"
        print(f"quality for --max-drop: top-1 (%) on {where}{said}")
        if in_sample:
            print(
                f"warning: the --max-drop drop is measured on the calibration samples ({where} "
                "also calibrate the search), so it may be optimistic; for a held-out measurement "
                "give a file with x_train/y_train (calibration) and x_test/y_test (scoring), or "
                "input_ids_train/y_train and input_ids_test/y_test; x_val/y_val beside them are "
                "scored instead, leaving the test split for eval and report.",
                file=sys.stderr,
            )
        measured = {"measured_on": f"top-1 (%) on {where}{said}", "in_sample": in_sample}
        if not in_sample and (note := selection_note(scored)):
            measured["selected_on_test"] = note  # the drop was chosen on this split
        return watched(partial(top1, data=labelled), args, loaded.model, "top-1"), measured
    if loaded.reference is not None:
        measured = {"measured_on": f"{args.model}'s held-out evaluation", "in_sample": False}
        metric = loaded.reference.metric
        return watched(loaded.reference.evaluate, args, loaded.model, metric), measured
    raise CompactnnError(
        "--max-drop compares the quality of each candidate with the float model's, and "
        "MODEL has no evaluation of its own: pass labelled --data FILE (a .safetensors with "
        "inputs x, or named inputs such as input_ids, and integer class labels y; top-1 on it "
        "is the quality; with x_train/y_train and x_test/y_test the _test split is scored), "
        "or use a reference model (its held-out evaluation)."
    )


def top1(model, data) -> float:
    """Top-1 (%) of ``model`` on the labelled ``data``, its warnings silenced: what the data
    holds (e.g. padding without an attention mask) was said once, when ``--data`` was read."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return evaluate(model, data)


def watched(fn: Callable, args: argparse.Namespace, float_model, metric: str) -> Callable:
    """``fn`` (an evaluation) that says each result as it comes: the float model's quality
    first (refusing a ``--max-drop`` not below it, in the flag's words), then one line per
    compressed candidate unless ``--no-progress``."""
    seen: list[float] = []
    unit = "%" if metric == "top-1" else ""

    def scored(model) -> Any:
        quality = fn(model)
        try:
            value = float(quality)
        except (TypeError, ValueError):
            return quality  # the search names a result that is no number
        if model is float_model and not seen:
            if value > 0 and args.max_drop >= value:
                raise CompactnnError(
                    f"--max-drop {args.max_drop:g} is not below the float model's quality "
                    f"({metric} {value:.4g}{unit}): even a quality of 0 would pass. Give the "
                    f"largest drop you accept, in {metric}{' points' if unit else ''}, e.g. "
                    f"--max-drop {value * 0.01:.2g} (1% of it)."
                )
            print(f"float model: {metric} {value:.4g}{unit}", flush=True)
        elif seen and not args.no_progress:
            n, drop = len(seen), seen[0] - value
            verdict = "within" if drop <= args.max_drop else "over"
            print(
                f"  evaluation {n} (at most {args.max_evals}): {metric} {value:.4g}{unit}, drop "
                f"{drop:.3g} ({verdict} --max-drop {args.max_drop:g})",
                flush=True,
            )
        seen.append(value)
        return quality

    return scored


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
    check_embeddings(args.embeddings)  # before loading the model
    loaded = load_model(args.model, args)
    args.embeddings = check_embeddings(args.embeddings, loaded.model)  # None: no tables
    raw = resolve_data(args.data, loaded)
    # a file's held-out split scores --max-drop and its training split calibrates
    calib, labelled, names = search_data(args, loaded, raw)
    eval_fn, measured = evaluation(args, loaded, labelled, names)
    example = latency_example(args, loaded, calib)
    with tempfile.TemporaryDirectory(prefix="compactnn-search-") as staging:
        # per user, outside --out, kept format by format: a killed search keeps its scores
        cache = search_cache.cache_folder(Path(staging))  # unwritable: staging, one warning
        search_cache.seed(cache, out / SENSITIVITY)  # an earlier search's scores (--force)
        with cache_report() as report:
            result = cli_worded(search)(
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
        search_cache.write_scores(out / SENSITIVITY, report)  # this search's scores only
    metric = "top-1" if labelled is not None else getattr(loaded.reference, "metric", "quality")
    print_summary(result, args, loaded.model, metric)
    if note := measured.get("selected_on_test"):
        print(f"  note: {note}")
    if line := search_cache.cache_line(report, cache, Path(staging)):
        print(line)
    print(f"  wrote {shown_path(out / 'recipe.yaml')} and {shown_path(out / 'search.json')}")
    words = ["compactnn", "compress", shown_path(args.model), "--recipe"]
    words.append(shown_path(out / "recipe.yaml"))
    print(f"  compress with it: {shell_join(words + model_words(args, loaded))}")
    return 0


def cli_worded(fn: Callable) -> Callable:
    """``fn`` whose CompactnnError messages name the command's flags, not the Python API's
    keywords (``max_drop=5.0`` -> ``--max-drop 5``).

    Example:
        >>> cli_words_of("meets max_drop=5.0; raise max_drop or max_evals=3")
        'meets --max-drop 5; raise --max-drop or --max-evals 3'
    """

    def worded(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CompactnnError as exc:
            raise CompactnnError(cli_words_of(str(exc))) from exc

    return worded


def cli_words_of(text: str) -> str:
    """``text`` with ``max_drop=N`` / ``max_evals=N`` / a bare ``max_drop`` in flag words."""
    text = re.sub(
        r"\b(max_drop|max_evals)=([-+\d.e]+)",
        lambda m: f"--{m[1].replace('_', '-')} {float(m[2].rstrip('.')):g}",
        text,
    )
    return re.sub(r"\b(?<!-)(max_drop|max_evals)\b", lambda m: "--" + m[1].replace("_", "-"), text)


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
