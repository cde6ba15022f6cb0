"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint holds the wrapped model's state, the optimizer and scheduler states, the torch
RNG state, the position (epoch, batch within the epoch, global step), the history and log
records so far, the epoch under way (:mod:`compactnn.training.resume`), and what defines
the run (the recipe's YAML, epochs, batch size, seed, ``keep_best``, and SHA-256
fingerprints of the starting float model, of the training data and of the held-out data, so
that a checkpoint is never continued with another model or other data). It is written with
``atomic_write`` (temporary file, fsync, rename), so an interruption never leaves a broken
checkpoint, and read with ``torch.load(weights_only=True)`` (no arbitrary unpickling).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compactnn.core.digest import tensors_sha256
from compactnn.errors import CompactnnError
from compactnn.export.fs import atomic_write, system_folder
from compactnn.training.resume import keeps_loader_rng

CHECKPOINT = "qat-checkpoint.pt"
_FRESH = (
    "Pass resume=False (--no-resume) to start over, or use a new checkpoint_dir (--checkpoint-dir)"
)
# what each fingerprint is of, for the messages
_PRINTS = {
    "model_sha256": "starting float model (--weights)",
    "data_sha256": "training data (--data)",
}


def run_fingerprints(model: nn.Module, data: Any) -> dict[str, str]:
    """``model_sha256`` (the float model's ``state_dict``) and ``data_sha256`` (the tensors
    of tensor data; for batches, their number and the first batch) that a checkpoint must
    match to be continued. ``data`` is a :class:`compactnn.training.data.TrainData`; the
    torch RNG state and the loader's own generators are left as they were (a shuffling
    loader draws from them): with or without a checkpoint the run is the same."""
    prints = {"model_sha256": tensors_sha256(model.state_dict().items())}
    if data.loader is None:
        prints["data_sha256"] = tensors_sha256([("x", data.x), ("y", data.y)])
        return prints
    with keeps_loader_rng(data.loader):
        first = next(iter(data.batches(1, 0, 0)), None)
    items = [("batches", data.steps(1))]
    items += [] if first is None else [("x0", first[0]), ("y0", first[1])]
    prints["data_sha256"] = tensors_sha256(items)
    return prints


def scoring_fingerprints(eval_xy: tuple | None, keep_best: bool) -> dict[str, Any]:
    """``keep_best`` and ``eval_sha256`` (of the held-out ``(inputs, labels)``, None without
    them): a checkpoint is continued only with the same, or the epochs done before it would
    have been scored (and kept) on other data than the epochs after it."""
    if eval_xy is None:
        return {"keep_best": keep_best, "eval_sha256": None}
    x, y = eval_xy
    items = sorted(x.items()) if isinstance(x, dict) else [("x", x)]
    return {"keep_best": keep_best, "eval_sha256": tensors_sha256([*items, ("y", y)])}


def checkpoint_path(directory: str | os.PathLike) -> Path:
    return Path(directory) / CHECKPOINT


def checkpoint_position(directory: str | os.PathLike) -> dict[str, int] | None:
    """Where the checkpoint in ``directory`` stands: ``epoch`` (epochs done), ``batch``
    (batches done of the next one), ``epochs`` (the run's total); None when there is none,
    or it cannot be read (:func:`load_checkpoint` then says why). Its tensors are mapped,
    not read.

    Example:
        >>> checkpoint_position("ck")  # doctest: +SKIP
        {'epoch': 2, 'batch': 0, 'epochs': 2}
    """
    path = checkpoint_path(directory)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=True, mmap=True)
        return {
            "epoch": int(state["epoch"]),
            "batch": int(state["batch"]),
            "epochs": int(state["run"]["epochs"]),
        }
    except Exception:  # unreadable or not a checkpoint: load_checkpoint names the problem
        return None


def resume_line(directory: str | os.PathLike, position: dict[str, int]) -> str:
    """What a run resumed from ``position`` (:func:`checkpoint_position`) in ``directory``
    continued from.

    Example:
        >>> resume_line("ck", {"epoch": 2, "batch": 0, "epochs": 2})
        'resumed from ck: all 2 epochs were already done (nothing trained)'
        >>> resume_line("ck", {"epoch": 1, "batch": 5, "epochs": 3})
        'resumed from ck at epoch 2 of 3, after its batch 5'
    """
    epoch, batch, epochs = position["epoch"], position["batch"], position["epochs"]
    if epoch >= epochs:
        done = "its 1 epoch was" if epochs == 1 else f"all {epochs} epochs were"
        return f"resumed from {directory}: {done} already done (nothing trained)"
    after = f", after its batch {batch}" if batch else ""
    return f"resumed from {directory} at epoch {epoch + 1} of {epochs}{after}"


def check_checkpoint_dir(directory: str | os.PathLike, what: str = "checkpoint_dir") -> Path:
    """Refuse, before any training, a checkpoint directory :func:`save_checkpoint` could not
    write: an existing file (not a folder), a path under a file, a system folder, a folder
    (or, when it does not exist yet, the nearest existing folder above it) where no file can
    be created, or a ``qat-checkpoint.pt`` in it that is not a file. ``what`` is how the
    user named it (``"--checkpoint-dir"`` for the CLI). Nothing is created.

    Example:
        >>> check_checkpoint_dir("ck-new")
        PosixPath('ck-new')
    """
    path = Path(directory)
    fix = f"{what} DIR" if what.startswith("--") else f"{what}='DIR'"
    label = f"{what} {str(directory)!r}"
    if (system := system_folder(path)) is not None:  # /dev/shm is the user's
        raise CompactnnError(
            f"{label} lies under {system}, a system folder: pass {fix} naming a folder of your own."
        )
    existing = path
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"lies under the file {str(existing)!r}"
        raise CompactnnError(
            f"{label} {where}, not a folder: pass {fix} naming a folder (new or holding a "
            f"checkpoint), e.g. {fix.replace('DIR', 'ckpt')}."
        )
    if os.path.lexists(checkpoint_path(path)) and not checkpoint_path(path).is_file():
        raise CompactnnError(
            f"{label} holds {CHECKPOINT} that is not a file: remove it, or pass another {fix}."
        )
    try:  # a file that vanishes on closing: the only sure test (root, read-only mounts)
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as exc:
        which = "" if existing == path else f" (its nearest existing folder {str(existing)!r})"
        raise CompactnnError(
            f"{label} is not writable{which}: {exc.strerror or exc}; pass {fix} naming a "
            "folder you can write to."
        ) from None
    return path


def save_checkpoint(directory: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically to ``directory/qat-checkpoint.pt``."""
    path = checkpoint_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    return path


def load_checkpoint(directory: str | os.PathLike, run: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint in ``directory`` if there is one, after checking it belongs to ``run``.

    Raises:
        CompactnnError: the checkpoint was written by another recipe or another run
            configuration (its schedule would not continue this one), or is unreadable.
    """
    path = checkpoint_path(directory)
    if not path.is_file():
        return None
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols are not the user's
            warnings.simplefilter("ignore")
            state = torch.load(path, weights_only=True)
    except Exception as exc:  # torch's text advises weights_only=False: never echo it
        state = exc
    if not isinstance(state, dict) or not isinstance(state.get("run"), dict):
        raise CompactnnError(
            f"checkpoint {str(path)!r} is not a compactnn checkpoint or is corrupt (it was not "
            "read: compactnn loads only tensors and plain data from it): delete it, or pass "
            "resume=False (--no-resume) to start over."
        ) from (state if isinstance(state, Exception) else None)
    theirs = state["run"]
    _check_version(path, theirs)  # first: an older checkpoint may differ in anything else too
    if theirs.get("recipe_yaml") != run["recipe_yaml"]:
        raise CompactnnError(
            f"checkpoint {str(path)!r} was written by recipe {theirs.get('recipe')!r}, not "
            f"{run['recipe']!r}: its quantizers and weights do not fit this recipe. Use another "
            "checkpoint directory, or pass resume=False (--no-resume) to start over."
        )
    for key in ("epochs", "batch_size", "seed"):
        if theirs.get(key) != run[key]:
            raise CompactnnError(
                f"checkpoint {str(path)!r} was written with {key}={theirs.get(key)}, this run "
                f"has {key}={run[key]}: resuming would not continue the same schedule. Use the "
                "same settings, another checkpoint directory, or pass resume=False "
                "(--no-resume) to start over."
            )
    _check_scoring(path, theirs, run)
    for key, what in _PRINTS.items():
        if theirs[key] != run.get(key):
            raise CompactnnError(
                f"checkpoint {str(path)!r} belongs to another run: its {what} differs from "
                f"this run's (SHA-256 {theirs[key][:12]}... there, {str(run.get(key))[:12]}... "
                f"here), and continuing it would return the other run's weights. {_FRESH}."
            )
    return state


def _check_version(path: Path, theirs: dict[str, Any]) -> None:
    """Refuse a checkpoint of an older compactnn: it lacks the fingerprints of the starting
    float model and data (``run_fingerprints``), so nothing shows it continues this run (a
    reference model's weights may be the same in both versions: it still cannot be checked)."""
    if all(key in theirs for key in _PRINTS):
        return
    raise CompactnnError(
        f"checkpoint {str(path)!r} was written by an older compactnn, which did not record the "
        "float model and data its run started from, so this compactnn cannot check that it "
        "continues this run: finish it with the compactnn that wrote it, or start afresh. "
        f"{_FRESH}."
    )


def _check_scoring(path: Path, theirs: dict[str, Any], run: dict[str, Any]) -> None:
    """Refuse a checkpoint whose epochs were scored on other held-out data, or kept by
    another ``keep_best``, than this run's (a checkpoint of an older compactnn that did not
    record them is not checked)."""
    if "keep_best" in theirs and theirs["keep_best"] != run.get("keep_best"):
        if theirs["keep_best"]:  # its best epoch so far would be dropped for the last one
            why = "it kept its best epoch so far, which this run would drop for the last one"
        else:
            why = "it kept no state of its epochs, so those done before it could not be the best"
        raise CompactnnError(
            f"checkpoint {str(path)!r} was written with keep_best={theirs['keep_best']}, this "
            f"run has keep_best={run.get('keep_best')}: {why}. Pass the same keep_best "
            f"(--keep-best) as the run that wrote it. {_FRESH}."
        )
    if "eval_sha256" in theirs and theirs["eval_sha256"] != run.get("eval_sha256"):
        if theirs["eval_sha256"] is None:
            how = "without eval_data (--eval-data) and this run has some"
        elif run.get("eval_sha256") is None:
            how = "with eval_data (--eval-data) and this run has none"
        else:
            how = "with other eval_data (--eval-data) than this run's"
        raise CompactnnError(
            f"checkpoint {str(path)!r} was written {how}: its epochs would be scored on other "
            "held-out data than the rest. Pass the same eval_data as the run that wrote it. "
            f"{_FRESH}."
        )
