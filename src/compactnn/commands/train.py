"""``compactnn train MODEL --recipe R --data D --epochs N [--out DIR]``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import compactnn
from compactnn.commands._common import add_model_args, human_bytes, load_model, source_record
from compactnn.commands.compress import default_out
from compactnn.errors import CompactnnError
from compactnn.export.artifact import check_writable
from compactnn.measure.size import artifact_bytes, float_artifact_bytes
from compactnn.model_io import LoadedModel, read_tensors

DATASETS = {
    "mnist": "compactnn.data.mnist:load_mnist",
    "digits": "compactnn.data.digits:load_digits8",
}
REFERENCE_DATA = {"mnist-cnn": "mnist"}


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="quantization-aware training (QAT, ternary, binary, INQ) to a packed artifact",
        description="Train MODEL with the training recipe R on labelled data D and save the "
        "frozen quantized model. Recipes: w2a2-lsq, w4a4-pact, w2a8-ttq, w2a8-twn, "
        "w1a1-xnor, w1a1-bireal, w1a1-reactnet, w5-inq (see docs/training.md).",
    )
    p.add_argument("model", metavar="MODEL", help="reference name, HF dir, .pt2, or pkg.mod:fn")
    p.add_argument("--recipe", "-r", required=True, help="training recipe, e.g. w2a2-lsq")
    p.add_argument(
        "--data",
        "-d",
        help="labelled data: 'mnist', or a .safetensors file with x/y (or x_train/y_train) "
        "tensors (default: the reference model's training split)",
    )
    p.add_argument("--epochs", "-e", type=int, help="epochs (default: the recipe's)")
    p.add_argument("--out", "-o", help="artifact directory (default: out/<model>-<recipe>)")
    p.add_argument("--checkpoint-dir", help="write checkpoints here; an existing one resumes")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--force", action="store_true", help="replace an existing artifact in --out")
    p.add_argument("--seed", type=int, default=0, help="seed (same seed: same run)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_model_args(p)
    return p


def training_data(spec: str | None, loaded: LoadedModel) -> Any:
    """Labelled data named by ``--data`` (a data set name or a .safetensors file)."""
    ref = getattr(loaded.reference, "name", None)
    spec = spec or REFERENCE_DATA.get(ref)
    if spec is None:
        raise CompactnnError(
            "training needs labelled data: pass --data mnist or --data file.safetensors "
            "holding x and y tensors."
        )
    spec = REFERENCE_DATA.get(spec, spec)
    if spec in DATASETS:
        import importlib

        module, fn = DATASETS[spec].split(":")
        return getattr(importlib.import_module(module), fn)()
    if Path(spec).suffix == ".safetensors":
        return read_tensors(spec)
    raise CompactnnError(
        f"unknown training data {spec!r}: use {', '.join(DATASETS)} or a .safetensors file "
        "with x and y (labels) tensors."
    )


def run(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else default_out(args.model, args.recipe)
    check_writable(out, args.force)  # a file, /proc, an artifact, read-only: before training
    recipe = compactnn.resolve_recipe(args.recipe)
    loaded = load_model(args.model, args)
    data = training_data(args.data, loaded)
    eval_data = (data.x_test, data.y_test) if hasattr(data, "x_test") else None
    t0 = time.perf_counter()
    qmodel = compactnn.train(
        loaded.model,
        recipe,
        data,
        epochs=args.epochs,
        eval_data=eval_data,
        seed=args.seed,
        checkpoint_dir=args.checkpoint_dir,
        resume=not args.no_resume,
        progress=not args.no_progress,
    )
    seconds = time.perf_counter() - t0
    extra = qmodel._compactnn.setdefault("extra", {})
    extra["source"] = source_record(loaded)
    extra.update(loaded.extra)
    digest = compactnn.save(qmodel, out, force=args.force)
    hist = extra.get("training", {})
    print(
        f"trained {args.model} with {recipe.name} for {hist.get('epochs')} epochs "
        f"in {seconds:.0f} s"
    )
    if hist.get("eval_top1"):
        print(f"  held-out top-1 per epoch: {', '.join(f'{a:.1f}' for a in hist['eval_top1'])}")
    if loaded.reference is not None:
        print(
            f"  {loaded.reference.metric}: float {loaded.reference.evaluate(loaded.model):.2f}, "
            f"trained {loaded.reference.evaluate(qmodel):.2f}"
        )
    size, float_size = artifact_bytes(out), float_artifact_bytes(loaded.model)
    print(
        f"  artifact: {out}  {human_bytes(size)} "
        f"(float artifact {human_bytes(float_size)}, {float_size / size:.2f}x smaller)"
    )
    print(f"  sha256 digest: {digest}")
    print(f"  evaluate it: compactnn eval {out}")
    return 0
