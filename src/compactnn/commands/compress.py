"""``compactnn compress MODEL --recipe R [--data D] [--out DIR] [--force]``."""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

import compactnn
from compactnn.commands._common import (
    add_ignore_arg,
    add_model_args,
    calib_inputs,
    check_apart_from_inputs,
    check_data_given,
    check_out,
    cli_words,
    given_path,
    human_bytes,
    load_model,
    model_words,
    source_record,
    split_labels,
)
from compactnn.commands._path_args import shell_join, shown_path
from compactnn.commands.compress_sizes import float_comparison, float_size_or_reason, peak_lines
from compactnn.commands.compress_summary import (
    layer_summary,
    note_lines,
    probe_layers,
    probe_lines,
    pruned_layers,
    pruning_lines,
)
from compactnn.commands.hf_checkpoint import checkpoint_comparison
from compactnn.core.calib import as_batches
from compactnn.core.provenance import record_source
from compactnn.core.qlayers import ActQuantizer, has_integer_weight
from compactnn.core.tokens import check_token_ids
from compactnn.data_files import check_float_inputs, takes_token_ids
from compactnn.errors import CompactnnError
from compactnn.measure.fidelity import collapse_on
from compactnn.measure.size import artifact_bytes
from compactnn.model_io import LoadedModel, resolve_data
from compactnn.training.data import keyword_split, labelled_keys


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "compress",
        help="compress a model with a recipe and save a packed artifact",
        description="Compress MODEL with recipe R and save the packed artifact in --out.",
    )
    p.add_argument("model", metavar="MODEL", help="reference name, HF dir, .pt2, or pkg.mod:fn")
    p.add_argument("--recipe", "-r", required=True, help="short name (w4a8) or recipe YAML file")
    p.add_argument(
        "--data",
        "-d",
        help="calibration inputs: a .safetensors/.npy file, a reference model's name (its "
        "calibration batches, e.g. mnist-cnn), or 'data-free' (calibrate on images generated "
        "from the model's batch-norm statistics; docs/data-free.md)",
    )
    p.add_argument(
        "--input-shape",
        metavar="C,H,W",
        help="input shape of the generated images with --data data-free (default: the "
        "reference model's)",
    )
    p.add_argument(
        "--data-free-images",
        metavar="N",
        type=int,
        help="how many images --data data-free generates (default 256; qdrop/brecq "
        "recommend 1024 or more; generation time grows with N)",
    )
    p.add_argument("--out", "-o", help="artifact directory (default: out/<model>-<recipe>)")
    p.add_argument("--force", action="store_true", help="replace an existing artifact in --out")
    add_ignore_arg(p)
    p.add_argument("--seed", type=int, default=0, help="seed for stochastic methods")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument(
        "--max-memory",
        metavar="SIZE",
        help="stream a Hugging Face directory of safetensors shards block by block within "
        "SIZE (e.g. 512MiB) of memory; resumes an interrupted run (docs/scale.md)",
    )
    add_model_args(p)
    return p


def default_out(model: str, recipe: str) -> Path:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(model.split(":")[-1]).stem or model)
    return Path("out") / f"{stem}-{Path(recipe).stem}"


DATA_FREE_IMAGES = 256


def data_free(args: argparse.Namespace, loaded) -> object:
    """``--data-free-images`` (default 256) images generated from the model alone
    (batch-norm statistics inversion)."""
    from compactnn.datafree import generate
    from compactnn.datafree.common import has_bn_stats

    if takes_token_ids(loaded.model):  # generated images are no token ids
        raise CompactnnError(
            f"--data data-free generates images from batch-norm statistics, and "
            f"{type(loaded.model).__name__} reads token ids: pass --data FILE.safetensors "
            "holding input_ids (and attention_mask when padded) from the model's own "
            "tokenizer, or use a recipe that calibrates on no data (sp50: magnitude pruning; "
            "w8 or w4-g32: weight-only quantization)."
        )
    if not has_bn_stats(loaded.model):  # before --input-shape: that would not help
        shape = args.input_shape or "C, H, W"
        raise CompactnnError(
            f"--data data-free matches the batch-norm statistics of MODEL, and "
            f"{type(loaded.model).__name__} has no BatchNorm layer with running statistics. "
            "Pass real inputs with --data FILE (.safetensors or .npy), or generate DAFL "
            "inputs (a generator trained against the model; the command line has no DAFL "
            "option) in Python and pass the file: data = compactnn.datafree.generate(model, "
            f"256, input_shape=({shape}), method='dafl'); "
            "safetensors.torch.save_file({'x': data.x}, 'dafl.safetensors'); then "
            "--data dafl.safetensors."
        )
    attr = getattr(loaded.model, "input_shape", None)  # as compactnn.datafree.generate reads
    if args.input_shape:
        shape = _cli_shape(args.input_shape, f"--input-shape {args.input_shape}")
    elif attr is not None:
        shape = _cli_shape(attr, f"{type(loaded.model).__name__}.input_shape={attr!r}")
    elif loaded.calib is not None:
        first = loaded.calib if hasattr(loaded.calib, "shape") else next(iter(loaded.calib))
        first = first[0] if isinstance(first, (tuple, list)) else first  # (inputs, labels)
        shape = tuple(first.shape[1:])
    else:
        raise CompactnnError(
            "--data data-free needs the per-sample input shape of this model: pass "
            "--input-shape C,H,W (e.g. --input-shape 1,28,28), or give the model an "
            "input_shape attribute."
        )
    n = data_free_images(args)
    data = generate(
        loaded.model, n, input_shape=shape, seed=args.seed, progress=not args.no_progress
    )
    print(f"generated {n} calibration images in {data.cost['seconds']:.1f} s (data-free)")
    return data


def _cli_shape(value, given: str) -> tuple[int, ...]:
    """``value`` (``"C,H,W"`` or a sequence) as a checked ``(C, H, W)``, refused in the
    command line's words (``given``: where it came from)."""
    from compactnn.datafree.common import check_input_shape

    try:
        return check_input_shape(value)
    except CompactnnError:
        raise CompactnnError(
            f"{given}: give the per-sample input shape C,H,W as three positive integers, "
            "e.g. --input-shape 1,28,28."
        ) from None


def data_free_images(args: argparse.Namespace) -> int:
    """``--data-free-images``, default 256; refused below 1."""
    n = getattr(args, "data_free_images", None)
    if n is None:
        return DATA_FREE_IMAGES
    if n < 1:
        raise CompactnnError(
            f"--data-free-images {n}: give a positive number of images, e.g. 1024."
        )
    return n


# train's --data data-free: the way to it (train does not generate its training data)
DATA_FREE_TRAIN = (
    " compactnn train does not generate its training data: generate it once in Python and "
    "pass the file: data = compactnn.datafree.generate(model, 1024, input_shape=(C, H, W)) "
    "(method='dafl' for a model without batch norm); safetensors.torch.save_file({'x': data.x, "
    "'y': data.y}, 'synthetic.safetensors') (y: the model's own top-1 labels); then --data "
    "synthetic.safetensors."
)


def calibration_record(data) -> dict:
    """What the artifact records of generated calibration images (``extra["calibration_data"]``):
    :func:`compactnn.datafree.artifact_record`, nothing machine-dependent (no wall time), so
    two identical runs write identical artifacts.

    Example:
        >>> from compactnn.datafree.common import GeneratedData
        >>> cost = {"method": "bn-inversion", "seconds": 1.5, "n": 3, "steps": 200}
        >>> r = calibration_record(GeneratedData(torch.zeros(3, 1, 2, 2), torch.zeros(3), cost))
        >>> r["data"], r["images"], r["input_shape"], "seconds" in r
        ('data-free', 3, [1, 2, 2], False)
    """
    from compactnn.datafree import artifact_record

    return artifact_record(data)


def calibration_line(record: dict) -> str:
    """The summary line of ``extra["calibration_data"]``.

    Example:
        >>> r = {"method": "bn-inversion", "images": 256, "steps": 200, "input_shape": [1, 8, 8]}
        >>> calibration_line(r).split(" (")[0]
        '  calibration: 256 generated images'
    """
    shape = "x".join(str(d) for d in record["input_shape"])
    return (
        f"  calibration: {record['images']} generated images (data-free, {record['method']}, "
        f"{record['steps']} steps per batch, shape {shape}), no real data"
    )


def eval_command(out: Path, args: argparse.Namespace, loaded: LoadedModel) -> str:
    """The ``compactnn eval`` line that works for this artifact: only a reference model is
    rebuilt from the artifact's record; any other MODEL is named again (with its data).

    Example:
        >>> ns = argparse.Namespace(model="hf", weights=None, trust_pickle=False, data="d.npy")
        >>> eval_command(Path("art"), ns, LoadedModel(None, "hf"))
        'compactnn eval art --model hf --data d.npy'
    """
    words = ["compactnn", "eval", shown_path(out)]
    if loaded.reference is None:
        words += ["--model", shown_path(args.model)]
    return shell_join(words + model_words(args, loaded))


def run(args: argparse.Namespace) -> int:
    out = given_path(args.out, "--out") or default_out(args.model, args.recipe)
    check_out(out, args.model, args.force)  # a file, /proc, an artifact, a model: before work
    # inside a model folder (a Hugging Face model); --weights/--data files are checked later
    check_apart_from_inputs(out, "--out", {"MODEL": args.model}, "out/model-compressed")
    recipe = compactnn.resolve_recipe(args.recipe)  # fail fast on a bad recipe
    check_input_shape(args)
    if args.max_memory is not None:
        return run_streamed(args, out, recipe)
    check_data_given(recipe, args.data, args.model)  # before loading the model
    note_training_recipe(recipe, args.model, args.recipe, args.data)
    loaded = load_model(args.model, args)
    if args.data == "data-free" and not reads_data(recipe):
        print(
            f"note: no step of {recipe.name} calibrates on data: no images generated for "
            "--data data-free",
            file=sys.stderr,
        )
        given, data = None, None
    elif args.data == "data-free":
        given, data = None, data_free(args, loaded)
    else:
        given = resolve_data(args.data, loaded)  # read once: calibration and the eval line
        what = f"--data {args.data}" if args.data else "--data"  # a file's x, as calib_inputs
        data = split_labels(given, role="train", what=what, model=loaded.model)[0]
        if args.data is not None:  # inputs the model cannot take: said before any work
            check_float_inputs(loaded.model, data, f"--data {args.data}")  # int64 pixels
            check_token_ids(loaded.model, data, f"--data {args.data}")
    t0 = time.perf_counter()
    warned: list[str] = []  # printed as they came: the notes repeat them
    try:
        with shown_warnings(warned):
            qmodel = compactnn.compress(
                loaded.model,
                recipe,
                calib_data=data,
                seed=args.seed,
                progress=not args.no_progress,
                ignore=args.ignore,
            )
    except CompactnnError as exc:
        raise cli_words(exc, args.data) from None
    seconds = time.perf_counter() - t0
    extra = qmodel._compactnn.setdefault("extra", {})
    record_source(extra, source_record(loaded))  # an HF directory: named by its files' SHA-256
    extra.update(loaded.extra)
    if args.data == "data-free" and data is not None:
        extra["calibration_data"] = calibration_record(data)
    digest = compactnn.save(qmodel, out, force=args.force)
    size, float_size = artifact_bytes(out), float_size_or_reason(loaded.model)
    info = compactnn.info_of(qmodel)
    print(f"compressed {args.model} with {recipe.name} in {seconds:.1f} s")
    probed = probe_layers(extra, loaded.model)
    summary = layer_summary(
        [n for n, _ in qmodel.named_modules()],
        info["float_layers"],
        pruned_layers(extra, loaded.model),
        probed,
        {n for n, m in qmodel.named_modules() if hasattr(m, "weight_codes")},
    )
    for line in summary:
        print(line)
    if "calibration_data" in extra:
        print(calibration_line(extra["calibration_data"]))
    for line in pruning_lines(extra.get("pruning", {})):
        print(line)
    calib = as_batches(data) if probed and data is not None else []
    for line in probe_lines(extra, loaded.model, calib[0] if calib else None):
        print(line)
    for line in note_lines(info["notes"], set(warned)):
        print(line)
    first = as_batches(data)[:1] if data is not None else []  # one forward of each model
    done = what_it_did(qmodel, extra)
    if first and (collapsed := collapse_on(loaded.model, qmodel, first[0], **done)) is not None:
        print(f"warning: {collapsed}", file=sys.stderr)
    for line in peak_lines(info.get("measured", {})):
        print(line)
    stored = checkpoint_comparison(size, args.model)  # "" unless a bfloat16/float16 folder
    shown = f"{shown_path(out)}  {human_bytes(size)} ({float_comparison(size, float_size)}{stored})"
    print(f"  artifact: {shown}")
    print(f"  sha256 digest: {digest}  (pin it: compactnn.load(..., expect_sha256=...))")
    held_out = argparse.Namespace(**{**vars(args), "data": eval_data_file(args, loaded, given)})
    print(f"  evaluate it: {eval_command(out, held_out, loaded)}")
    return 0


PRUNE_KEYS = ("pruning", "resized", "probe_prune")  # extra entries a pruning step writes


def what_it_did(qmodel: torch.nn.Module, extra: dict) -> dict[str, bool]:
    """``quantized`` / ``pruned``: what the recipe did to ``qmodel`` (``extra``: its
    artifact's), for the collapse warning's words (``fidelity.collapse_text``): a
    pruning-only recipe that collapsed a trained model is not told to compress a trained
    model."""
    pruned = any(extra.get(k) for k in PRUNE_KEYS)
    quantized = any(has_integer_weight(m) or isinstance(m, ActQuantizer) for m in qmodel.modules())
    return {"quantized": quantized or not pruned, "pruned": pruned}


@contextlib.contextmanager
def shown_warnings(shown: list[str]) -> Iterator[None]:
    """Append the text of each warning shown inside the block to ``shown`` (still shown)."""
    previous = warnings.showwarning

    def show(message, *rest, **kw) -> None:
        shown.append(str(message))
        previous(message, *rest, **kw)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def reads_data(recipe) -> bool:
    """Whether a step of ``recipe`` reads calibration data (``MethodConfig.uses_data``:
    activation grids, GPTQ, Wanda, self-distilling pruning, FFN's refit...). A weight-only
    RTN recipe reads none.

    Example:
        >>> [reads_data(compactnn.resolve_recipe(r)) for r in ("w4", "w4a8", "sp90-dns")]
        [False, True, True]
    """
    return any(step.config.uses_data() for step in recipe.steps)


def check_input_shape(args: argparse.Namespace) -> None:
    """Refuse ``--input-shape`` without ``--data data-free``: only generated images take it
    (a data file's inputs have their own shape), and a silently unused option misleads."""
    images = getattr(args, "data_free_images", None)
    if images is not None and args.data != "data-free":
        given = f"--data {args.data}" if args.data else "no --data"
        raise CompactnnError(
            f"--data-free-images {images} sets how many images --data data-free generates, "
            f"and this run has {given}: drop --data-free-images, or pass --data data-free."
        )
    if args.input_shape is not None and args.data != "data-free":
        given = f"--data {args.data} (inputs of their own shape)" if args.data else "no --data"
        raise CompactnnError(
            f"--input-shape {args.input_shape} sets the shape of the images --data data-free "
            f"generates, and this run has {given}: drop --input-shape, or pass --data data-free."
        )


def eval_data_file(args: argparse.Namespace, loaded: LoadedModel, data: Any) -> str | None:
    """What the printed ``compactnn eval`` line passes as ``--data``: never the calibration
    data. A ``--data`` file that also holds a held-out split (``x_test``/``y_test``, or a
    keyword split's ``y_test`` beside ``input_ids_test``..., which ``eval`` reads; ``data``
    is what the file held, read once for calibration); else
    ``HELD_OUT_FILE`` for the user to fill in; None for a reference model (``eval`` scores
    it on its own test split) or a model that brings its own sample input (a Hugging Face
    folder). A user's model compressed without a data file (data-free, or a weight-only
    recipe) needs one too: without it ``eval`` has no sample input."""
    if args.data is None or args.data == "data-free":
        own = loaded.reference is not None or loaded.example is not None or "hf" in loaded.extra
        return None if own else "HELD_OUT_FILE"
    if isinstance(data, dict):
        tensors = [k for k, v in data.items() if isinstance(v, torch.Tensor)]
        if labelled_keys(tensors, "eval") == ("x_test", "y_test"):
            return args.data
        if "y_test" in tensors and keyword_split(data, "eval") is not None:
            return args.data  # a keyword split: input_ids_test, attention_mask_test, y_test
    return None if loaded.reference is not None else "HELD_OUT_FILE"


def note_training_recipe(recipe, model: str, recipe_arg: str, data: str | None = None) -> None:
    """A training-aware recipe compresses here without its training (the post-training
    form of its quantizers, calibrated): say so and name the command that trains it, with
    the ``--data`` given (else ``TRAIN_DATA`` for the user to fill in). A method that trains
    inside compress (TernaryBERT's label-free distillation on the calibration text) is not
    noted: ``compactnn train`` takes classifiers only. ``compactnn report`` and ``eval``
    label such an artifact "(calibrated only, not trained)" (no training record in it:
    :func:`compactnn.report.delivery.untrained_label`)."""
    from compactnn.report.delivery import training_recipe

    if training_recipe(recipe):
        given = data is not None and data != "data-free"
        train = ["compactnn", "train", shown_path(model), "--recipe", shown_path(recipe_arg)]
        train.append("--data")
        print(
            f"note: {recipe.name} is a training-aware recipe; compress calibrates it without "
            'training (its post-training accuracy; report and eval label it "calibrated '
            'only, not trained")'
            + (
                f"; --data {data} only calibrates it here, compactnn train trains on it: "
                + shell_join([*train, shown_path(data)])
                if given
                else ". Train it with: " + shell_join([*train, "TRAIN_DATA"])
            ),
            file=sys.stderr,
        )


def run_streamed(args: argparse.Namespace, out: Path, recipe) -> int:
    """``--max-memory``: the model directory streamed block by block (docs/scale.md)."""
    if args.data is None:
        raise compactnn.CompactnnError(
            "--max-memory needs --data (token ids as .safetensors or .npy): the model is "
            "never loaded whole, so no default calibration text is taken from it."
        )
    t0 = time.perf_counter()
    report = compactnn.compress(
        args.model,
        recipe,
        calib_data=calib_inputs(args.data),
        seed=args.seed,
        progress=not args.no_progress,
        ignore=args.ignore,
        max_memory=args.max_memory,
        out=out,
        force=args.force,
    )
    print(f"compressed {args.model} with {recipe.name} in {time.perf_counter() - t0:.1f} s")
    print(
        f"  streamed {report.blocks} blocks (from block {report.resumed_from}); peak resident "
        f"memory {report.peak_mib:.0f} MiB = {report.baseline_mib:.0f} MiB at start + "
        f"{report.added_peak_mib:.0f} MiB (budget {report.budget_mib:.0f} MiB)"
    )
    print(f"  artifact: {shown_path(out)}  {human_bytes(artifact_bytes(out))}")
    print(f"  sha256 digest: {report.digest}  (pin it: compactnn.load(..., expect_sha256=...))")
    return 0
