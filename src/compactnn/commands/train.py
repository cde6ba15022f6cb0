"""``compactnn train MODEL --recipe R --data D --epochs N [--out DIR]``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import compactnn
from compactnn.commands._common import (
    add_ignore_arg,
    add_model_args,
    check_not_an_input,
    check_out,
    close_progress_bars,
    given_path,
    human_bytes,
    input_overlaps,
    load_model,
    path_relation,
    source_record,
)
from compactnn.commands._path_args import shown_path
from compactnn.commands.compress import DATA_FREE_TRAIN, default_out, eval_command
from compactnn.errors import CompactnnError
from compactnn.launch_env import env_rank
from compactnn.measure.quality import no_better_than_guessing
from compactnn.measure.size import artifact_bytes, float_artifact_bytes
from compactnn.model_io import LoadedModel, read_tensors
from compactnn.training.checkpoint import (
    check_checkpoint_dir,
    checkpoint_path,
    checkpoint_position,
    resume_line,
)
from compactnn.training.data import as_eval_data, labelled_keys, split_pair
from compactnn.training.epoch_log import format_epoch
from compactnn.training.loop import evaluate_top1

DATASETS = {
    "mnist": "compactnn.data.mnist:load_mnist",
    "digits": "compactnn.data.digits:load_digits8",
}
# a reference model -> the labelled data set it was trained on (its training split is the
# default --data; the other references have no labelled data set)
REFERENCE_DATA = {"mnist-cnn": "mnist", "digits-resnet": "digits"}


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="quantization-aware training (QAT, ternary, binary, INQ) to a packed artifact",
        description="Train MODEL with the training recipe R on labelled data D and save the "
        "frozen quantized model. Recipes: any training-aware short name, e.g. w2a2-lsq, "
        "w2a8-twn, w1a1-xnor, w2a2-tsq, w1a8-bap, w5-inq; `compactnn recipes` lists every "
        "form (see docs/training.md).",
    )
    p.add_argument("model", metavar="MODEL", help="reference name, HF dir, .pt2, or pkg.mod:fn")
    p.add_argument("--recipe", "-r", required=True, help="training recipe, e.g. w2a2-lsq")
    p.add_argument(
        "--data",
        "-d",
        help="labelled data: 'mnist', 'digits', or a .safetensors file with x/y (or "
        "x_train/y_train) tensors (default: the training split of mnist-cnn's or "
        "digits-resnet's data set)",
    )
    p.add_argument(
        "--eval-data",
        metavar="FILE",
        help="held-out labelled data scored after every epoch: a .safetensors file with x/y "
        "(or x_test/y_test) tensors, or 'mnist' (default: the test split of the --data set, "
        "or of a --data file holding x_test/y_test beside x_train/y_train; none for a file "
        "of one split)",
    )
    p.add_argument(
        "--keep-best",
        action="store_true",
        help="save the epoch with the best held-out top-1, not the last (needs eval data)",
    )
    p.add_argument(
        "--log",
        metavar="FILE",
        help="per-epoch JSON-lines log (default: <out>.training.jsonl beside the artifact)",
    )
    p.add_argument("--epochs", "-e", type=int, help="epochs (default: the recipe's)")
    p.add_argument("--out", "-o", help="artifact directory (default: out/<model>-<recipe>)")
    p.add_argument("--checkpoint-dir", help="write checkpoints here; an existing one resumes")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing artifact in --out and an existing training log",
    )
    add_ignore_arg(p)
    p.add_argument("--seed", type=int, default=0, help="seed (same seed: same run)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument(
        "--device",
        help="train on this device: cpu (default) or cuda; under torchrun each rank takes its "
        "LOCAL_RANK GPU (docs/scale.md)",
    )
    add_model_args(p)
    return p


def training_data(spec: str | None, loaded: LoadedModel) -> Any:
    """Labelled data named by ``--data`` (a data set name or a .safetensors file)."""
    ref = getattr(loaded.reference, "name", None)
    spec = spec or REFERENCE_DATA.get(ref)
    if spec is None:
        whose = (
            f"the reference {ref!r} has no labelled data set" if ref else "MODEL is no reference"
        )
        raise CompactnnError(
            f"training needs labelled data and {whose}: pass --data file.safetensors holding x "
            "and y tensors (or --data mnist / --data digits for models of their inputs)."
        )
    return labelled_data(REFERENCE_DATA.get(spec, spec))


def labelled_data(spec: str) -> Any:
    """A data set name (``mnist``, ``digits``) or a .safetensors file with x/y tensors."""
    if spec in DATASETS:
        import importlib

        module, fn = DATASETS[spec].split(":")
        return getattr(importlib.import_module(module), fn)()
    suffix = Path(spec).suffix
    if suffix == ".safetensors":
        return read_tensors(spec)
    if suffix in _CONVERTIBLE:
        target = Path(spec).with_suffix(".safetensors").name
        raise CompactnnError(
            f"{spec!r} is a {suffix} file: compactnn reads labelled data from .safetensors "
            f"files only (a {suffix} file is not loaded: {_CONVERTIBLE[suffix]}). Convert it "
            "once in Python: from safetensors.torch import save_file; save_file({'x': x, "
            f"'y': y}}, '{target}') with x the inputs and y the integer labels as tensors "
            "(torch.from_numpy(a) for a numpy array), or use mnist or digits."
        )
    raise CompactnnError(
        f"unknown training data {spec!r}: use {', '.join(DATASETS)} or a .safetensors file "
        "with x and y (labels) tensors." + (DATA_FREE_TRAIN if spec == "data-free" else "")
    )


# files people keep tensors in that --data does not read, and why
_CONVERTIBLE = {
    ".pt": "unpickling can run code",
    ".pth": "unpickling can run code",
    ".pkl": "unpickling can run code",
    ".npz": "numpy archives are not read",
    ".npy": "numpy arrays are not read",
}


def log_path(out: Path, spec: str | None) -> Path:
    """The training log: ``--log``, else ``<out>.training.jsonl`` beside the artifact
    directory (not inside it: the directory is replaced whole by ``--force`` and holds only
    what its manifest lists)."""
    return Path(spec) if spec else out.with_name(out.name + ".training.jsonl")


def check_log(log: Path, out: Path, args: argparse.Namespace) -> None:
    """Refuse, before any work, a training log path that would destroy a file: always one
    in or at --out (replaced whole by save), one that is an input (MODEL, --weights, --data,
    --eval-data, the checkpoint) or inside MODEL's folder; and any other existing file unless
    --force, or a --checkpoint-dir checkpoint resumes the run (it appends to its log)."""
    if args.log:
        name = f"--log {args.log!r}"
    else:
        name = f"the training log {str(log)!r} (the default, beside --out)"
    folders = {"--out": str(out)}
    if Path(args.model).is_dir():
        folders["MODEL"] = args.model
    for option, folder in folders.items():
        if _within(log, folder):
            raise CompactnnError(
                f"{name} is in {option} {folder!r}, whose files it would replace: "
                "pass --log FILE outside it."
            )
    inputs = _inputs(args)
    if args.checkpoint_dir:
        inputs["--checkpoint-dir"] = str(checkpoint_path(args.checkpoint_dir))
    option = "--log" if args.log else "the training log"
    check_not_an_input(log, option, inputs, "train.jsonl")
    resumes = args.checkpoint_dir and not args.no_resume
    resumes = resumes and checkpoint_path(args.checkpoint_dir).is_file()
    if log.is_dir():
        raise CompactnnError(f"{name} is a folder: pass --log FILE naming a file.")
    if os.path.lexists(log) and not args.force and not resumes:
        raise CompactnnError(
            f"{name} exists; pass --force to replace it, or --log FILE naming another file."
        )


def check_checkpoint_dir_option(args: argparse.Namespace, out: Path, log: Path) -> None:
    """Refuse, before any work, a --checkpoint-dir that is an input file (MODEL, --weights,
    --data, --eval-data), lies in MODEL's folder or in --out (replaced whole by save, which
    holds only the artifact's files), is the training log or under it; then anything
    :func:`~compactnn.training.checkpoint.check_checkpoint_dir` refuses (a file, a path
    under a file, a folder where nothing can be written)."""
    if not args.checkpoint_dir:
        return
    ckpt = Path(args.checkpoint_dir)
    name = f"--checkpoint-dir {args.checkpoint_dir!r}"
    for option, spec, path, how in input_overlaps(ckpt, _inputs(args)):
        if how == "same" and path.is_file():
            raise CompactnnError(
                f"{name} is the {option} file {spec!r}, not a folder: pass --checkpoint-dir DIR "
                "naming a folder apart from the inputs, e.g. --checkpoint-dir ckpt."
            )
    folders = {"--out": str(out), "MODEL": args.model if Path(args.model).is_dir() else None}
    for option, folder in folders.items():
        if folder is not None and _within(ckpt, folder):
            raise CompactnnError(
                f"{name} is in {option} {folder!r}, whose files the checkpoint would mix "
                "with: pass --checkpoint-dir DIR outside it, e.g. --checkpoint-dir ckpt."
            )
    if _within(ckpt, log):
        raise CompactnnError(
            f"{name} is the training log {str(log)!r} or lies under it: pass --checkpoint-dir "
            "DIR naming a folder of its own, e.g. --checkpoint-dir ckpt."
        )
    check_checkpoint_dir(ckpt, "--checkpoint-dir")


def _inputs(args: argparse.Namespace) -> dict[str, str | None]:
    """MODEL, --weights, --data, --eval-data: the input files (a data set name is none)."""
    named = {"--weights": args.weights, "--data": args.data, "--eval-data": args.eval_data}
    return {"MODEL": args.model, **{k: None if v in DATASETS else v for k, v in named.items()}}


def _within(path: Path, folder: str | Path) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (:func:`path_relation`)."""
    return path_relation(path, folder) in ("same", "inside")


def held_out_data(spec: str | None, data: Any) -> tuple | None:
    """``--eval-data`` (a file or a data set name), else the training data's test split: a
    data set's, or a ``--data`` file's ``x_test``/``y_test`` (``*_test`` keyword inputs and
    ``y_test``) beside its training split; None for data of one split."""
    if spec is None:
        return as_eval_data(data) if has_held_out_split(data) else None
    try:
        return as_eval_data(labelled_data(spec))
    except CompactnnError as exc:
        raise CompactnnError(f"--eval-data {spec}: {exc}") from None


def has_held_out_split(data: Any) -> bool:
    """Whether training ``data`` (a data set, or a file's tensors) holds a held-out split
    apart from the one it trains on.

    Example:
        >>> import torch
        >>> t = torch.zeros(2)
        >>> has_held_out_split({"x_train": t, "y_train": t, "x_test": t, "y_test": t})
        True
        >>> has_held_out_split({"x": t, "y": t})
        False
    """
    return (hasattr(data, "x_test") and hasattr(data, "y_test")) or split_pair(data) is not None


def eval_data_words(args: argparse.Namespace, data: Any, loaded: LoadedModel) -> str | None:
    """What the printed ``compactnn eval`` line passes as ``--data``: never the training
    data. ``--eval-data FILE``; else a ``--data`` file that holds a held-out split
    (``x_test``/``y_test``, which ``eval`` reads); else ``HELD_OUT_FILE`` for the user to
    fill in; a data set name (``eval`` scores its held-out split). None (no ``--data``) for a
    reference model: ``eval`` scores it on the reference data's own test split."""
    if args.eval_data and args.eval_data not in DATASETS:
        return args.eval_data
    named = args.eval_data or args.data
    if named is None:
        return None if loaded.reference is not None else "HELD_OUT_FILE"
    if named in DATASETS:  # eval scores a data set name on its held-out split
        return None if loaded.reference is not None else named
    if isinstance(data, dict) and labelled_keys(data, "eval") == ("x_test", "y_test"):
        return args.data
    return "HELD_OUT_FILE"


def run(args: argparse.Namespace) -> int:
    if args.epochs is not None and args.epochs < 1:  # before any work
        raise CompactnnError(
            f"--epochs {args.epochs} trains nothing: pass --epochs 1 or more (or leave it out "
            "for the recipe's), or run `compactnn compress` for a model calibrated without "
            "training."
        )
    out = given_path(args.out, "--out") or default_out(args.model, args.recipe)
    check_out(out, args.model, args.force)  # a file, /proc, an artifact, a model: before training
    log = log_path(out, args.log)
    check_log(log, out, args)  # an input, the artifact, an earlier file: before training
    check_checkpoint_dir_option(args, out, log)  # a file, an input, unwritable: before training
    recipe = compactnn.resolve_recipe(args.recipe)
    loaded = load_model(args.model, args)
    data = training_data(args.data, loaded)
    eval_data = held_out_data(args.eval_data, data)
    if args.eval_data is None and eval_data is not None and isinstance(data, dict) and _is_rank0():
        held = "/".join(labelled_keys(data, "eval") or ("*_test", "y_test"))
        print(
            f"note: --data {args.data} holds a held-out split ({held}) beside the training "
            "one: scoring it after every epoch (pass --eval-data FILE for other data)",
            file=sys.stderr,
        )
    if args.keep_best and eval_data is None:
        raise CompactnnError(
            "--keep-best picks the epoch with the best held-out top-1: pass --eval-data "
            "FILE.safetensors (x and y tensors) as well."
        )
    base = _float_top1(eval_data, loaded)  # a doubt about the data: before any training
    before = _file_state(log)
    resumes = args.checkpoint_dir and not args.no_resume
    position = checkpoint_position(args.checkpoint_dir) if resumes else None
    t0 = time.perf_counter()
    try:
        qmodel = _train(args, loaded, recipe, data, eval_data, log)
        seconds = time.perf_counter() - t0
        if not _is_rank0():  # under torchrun: rank 0 saves and reports
            return 0
        extra = qmodel._compactnn.setdefault("extra", {})
        extra["source"] = source_record(loaded)
        extra.update(loaded.extra)
        digest = compactnn.save(qmodel, out, force=args.force)
    except BaseException as exc:  # Ctrl-C included: no artifact was written (save is atomic)
        if _is_rank0():
            _tidy_log(args, log, before, interrupted=isinstance(exc, KeyboardInterrupt))
        raise
    hist = extra.get("training", {})
    epochs = f"{hist.get('epochs')} epoch{'' if hist.get('epochs') == 1 else 's'}"
    if position is not None and position["epoch"] >= position["epochs"]:
        print(f"nothing left to train: saved {args.model} trained with {recipe.name} for {epochs}")
    else:
        print(f"trained {args.model} with {recipe.name} for {epochs} in {seconds:.0f} s")
    if position is not None:  # the checkpoint was continued (a foreign one is refused)
        print(f"  {resume_line(args.checkpoint_dir, position)}")
    if args.no_progress:  # the per-epoch lines were not shown live: show them now
        for line in log.read_text(encoding="utf-8").splitlines():
            print("  " + format_epoch(json.loads(line), hist["epochs"]))
    if eval_data is not None:
        _print_eval(qmodel, eval_data, hist, base, eval_source(args, loaded))
    if (ref := loaded.reference) is not None:  # its own data, whatever --data was
        print(
            f"  {ref.metric} on {ref.name}'s own held-out data: float "
            f"{ref.evaluate(loaded.model):.2f}, trained {ref.evaluate(qmodel):.2f}"
        )
    size, float_size = artifact_bytes(out), float_artifact_bytes(loaded.model)
    bigger = size > float_size
    ratio = f"{size / float_size:.2f}x larger" if bigger else f"{float_size / size:.2f}x smaller"
    floats = f"float artifact {human_bytes(float_size)}"
    print(f"  artifact: {shown_path(out)}  {human_bytes(size)} ({floats}, {ratio})")
    print(f"  training log: {shown_path(log)}")
    print(f"  sha256 digest: {digest}")
    held_out = argparse.Namespace(**{**vars(args), "data": eval_data_words(args, data, loaded)})
    print(f"  evaluate it: {eval_command(out, held_out, loaded)}")
    return 0


def _train(args, loaded: LoadedModel, recipe, data, eval_data, log: Path):
    try:
        return _train_model(args, loaded, recipe, data, eval_data, log)
    except CompactnnError as exc:
        raise _ignore_words(exc) from None


# A library message naming a layer training cannot wrap, and the fix it suggests in the
# recipe's words: on the command line the fix is --ignore NAME (compress says the same).
_RECIPE_FIX_RE = (
    r"Leave (it|them) in float: ignore=\[([^\]]*)\] \(compress/train\) or the step's "
    r"targets\.ignore"
)


def _ignore_words(exc: CompactnnError) -> CompactnnError:
    """``exc`` with the command line's fix for layers training cannot take: ``--ignore NAME``
    for each layer it names, in place of the Python API's ``ignore=[...]`` words."""
    import re

    text = str(exc)
    if "cannot take" not in text:
        return exc
    fix = re.search(_RECIPE_FIX_RE, text)
    if fix is not None:
        flags = " ".join(f"--ignore {n}" for n in re.findall(r"'([^']+)'", fix[2]))
        words = f"Leave {fix[1]} in float with {flags} (or the recipe's targets.ignore)"
        return CompactnnError(text[: fix.start()] + words + text[fix.end() :])
    layer = re.match(r"layer '([^']+)'", text)
    if layer is None:
        return exc
    return CompactnnError(
        f"{text} Leave it in float with --ignore {layer[1]} (or the recipe's targets.ignore)."
    )


def _train_model(args, loaded: LoadedModel, recipe, data, eval_data, log: Path):
    return compactnn.train(
        loaded.model,
        recipe,
        data,
        epochs=args.epochs,
        eval_data=eval_data,
        seed=args.seed,
        checkpoint_dir=args.checkpoint_dir,
        resume=not args.no_resume,
        progress=not args.no_progress,
        log_path=log,
        force=args.force,
        keep_best=args.keep_best,
        device=args.device,
        ignore=args.ignore,
    )


def _file_state(path: Path) -> tuple[int, int, int] | None:
    """What tells whether a file was written since: its inode, size and modification time
    (None when there is no file)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _tidy_log(args: argparse.Namespace, log: Path, before: Any, interrupted: bool) -> None:
    """After a run that wrote no artifact, the log it wrote: kept where a checkpoint resumes
    it, the user named it (``--log``) or it replaced an earlier file (``--force``), and said
    so; else (this run created it) removed, so that no log of epochs stands beside an
    artifact that does not exist (or an earlier one it does not describe)."""
    if _file_state(log) in (None, before):
        return  # this run did not write it (stopped before training began)
    close_progress_bars()  # our lines start lines of their own
    run = "interrupted" if interrupted else "failed"
    if args.checkpoint_dir and checkpoint_path(args.checkpoint_dir).is_file():
        print(
            f"training log kept: {log} (the same command resumes from --checkpoint-dir "
            f"{args.checkpoint_dir} and appends to it)",
            file=sys.stderr,
        )
    elif args.log or before is not None:  # never remove a file this run did not create
        print(
            f"training log of the {run} run kept: {log} (no artifact was written)",
            file=sys.stderr,
        )
    else:
        with contextlib.suppress(OSError):  # never hide why the run stopped
            log.unlink()


def _float_top1(eval_data: tuple | None, loaded: LoadedModel) -> float | None:
    """The float model's held-out top-1 (None without eval data), with a warning, before
    any training, when it is no better than guessing (the data is not the model's)."""
    if eval_data is None or not _is_rank0():  # under torchrun: rank 0 reports
        return None
    base = evaluate_top1(loaded.model, *eval_data)
    if doubt := no_better_than_guessing(base, eval_data[1], "the eval data"):
        print(f"warning: {doubt}", file=sys.stderr)
    return base


def eval_source(args: argparse.Namespace, loaded: LoadedModel) -> str:
    """Which data the held-out top-1 is on, in the command's words.

    Example:
        >>> eval_source(argparse.Namespace(eval_data=None, data="digits"), None)
        "--data digits's held-out split"
        >>> eval_source(argparse.Namespace(eval_data="ev.safetensors", data="digits"), None)
        '--eval-data ev.safetensors'
    """
    if args.eval_data:
        return f"--eval-data {args.eval_data}"
    if args.data:
        return f"--data {args.data}'s held-out split"
    default = REFERENCE_DATA.get(getattr(loaded.reference, "name", None))
    return f"the held-out split of {default}, the default --data"


def _print_eval(qmodel: Any, eval_data: tuple, hist: dict, base: float, source: str) -> None:
    """The held-out top-1 of the float model (``base``) and of the saved one (which epoch,
    if kept), and which data (``source``) it is on."""
    x, y = eval_data
    kept = hist.get("kept_epoch")
    which = f" (epoch {kept} kept, the best)" if kept else ""
    print(
        f"  eval top-1 on {y.numel()} held-out samples: float "
        f"{base:.2f}%, trained {evaluate_top1(qmodel, x, y):.2f}%{which} - samples from {source}"
    )


def _is_rank0() -> bool:
    """Whether this process is rank 0 of a distributed run (or the only process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return env_rank() == 0  # torchrun's rank, before the group is formed (RANK beside WORLD_SIZE)
