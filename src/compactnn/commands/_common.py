"""Arguments and helpers shared by several subcommands."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch

from compactnn.commands._path_args import shown_path
from compactnn.commands._paths import (  # noqa: F401 - the commands import them from here
    check_apart_from_inputs,
    check_not_an_input,
    input_overlaps,
    path_relation,
)
from compactnn.commands._units import human_bytes  # noqa: F401  (re-exported: commands use it)
from compactnn.core.fields import short_repr
from compactnn.errors import CompactnnError
from compactnn.export.artifact import check_writable
from compactnn.model_io import (
    LoadedModel,
    check_model_exists,
    file_sha256,
    hf_weights_file,
    reference_names,
    resolve_data,
    resolve_model,
)
from compactnn.training.data import keyword_split, labelled_keys, split_note


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """``--weights`` and ``--trust-pickle``: how a MODEL argument is loaded."""
    parser.add_argument(
        "--weights",
        metavar="FILE",
        help="weights (.safetensors) for a package.module:factory MODEL",
    )
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="trust the MODEL file's author: allow a pickled .pt/.pth, a .pt2 whose archive "
        "needs unpickling (or native code), an HF directory with only pytorch_model.bin "
        "(loading those runs code from the file)",
    )


def add_ignore_arg(parser: argparse.ArgumentParser) -> None:
    """``--ignore NAME`` (repeatable), as compress and train take it."""
    parser.add_argument(
        "--ignore",
        metavar="NAME",
        action="append",
        default=[],
        help="leave this layer (module name or fnmatch pattern, e.g. conv1 or 'head.*') "
        "untouched by every step; repeat for more",
    )


def given_path(text: str | None, flag: str) -> Path | None:
    """The path a ``flag`` option names, None when it is not given; an empty one (``--out ""``,
    which would be the current folder) is a CompactnnError."""
    if text is None:
        return None
    if not text.strip():
        raise CompactnnError(
            f"{flag} {text!r} is an empty path: name a folder (e.g. {flag} out/model-w8), "
            f"or drop {flag} for the default folder."
        )
    return Path(text)


def check_out(out: Path, model_spec: str, force: bool) -> None:
    """Refuse, before any work, an artifact folder that ``save`` could not use or that is
    the input model's own folder (its weights would be replaced)."""
    model_dir = Path(model_spec)
    if model_dir.is_dir() and out.resolve() == model_dir.resolve():
        raise CompactnnError(
            f"--out {str(out)!r} is the input model's own folder: the artifact would replace "
            "its files. Choose an empty or new folder, e.g. --out out/model-compressed."
        )
    check_writable(out, force, what="--out")


def check_data_given(recipe, data: str | None, model_spec: str) -> None:
    """Refuse, before the model is loaded, a recipe that reads calibration data when
    ``--data`` is missing and MODEL brings none (only reference models do); a MODEL that
    names nothing is named first (:func:`~compactnn.model_io.check_model_exists`)."""
    check_model_exists(model_spec)
    if data is not None or model_spec in reference_names():
        return
    needy = [
        f"{step.method} with quantized activations"
        if getattr(step.config, "act", None) is not None
        else step.method
        for step in recipe.steps
        if step.config.needs_data()
    ]
    if not needy:
        return
    inputs = ".safetensors or .npy model inputs, e.g. token ids for a language model"
    if folder_takes_token_ids(model_spec):
        inputs = (
            "a .safetensors file of input_ids, and attention_mask when padded, from the "
            "model's own tokenizer"
        )
    raise CompactnnError(
        f"recipe {short_repr(recipe.name)} calibrates on data ({', '.join(dict.fromkeys(needy))}) "
        f"and MODEL brings none: pass --data FILE ({inputs}), or "
        f"{_without_data(recipe, model_spec)}."
    )


def _without_data(recipe, model_spec: str = "") -> str:
    """What to run instead of ``recipe`` without data: for a pruning recipe, magnitude
    pruning (needs none) or, for a model that does not read token ids, generated inputs;
    else a weight-only quantization recipe."""
    pruning = [s for s in recipe.steps if type(s.config).__module__.startswith("compactnn.prune")]
    if not pruning:
        return "use a weight-only recipe such as w8 or w4-g32"
    sparsity = getattr(pruning[0].config, "sparsity", None)
    p = round(100 * sparsity) if isinstance(sparsity, float) and 0 < sparsity < 1 else 50
    magnitude = f"prune without data: sp{p} (magnitude pruning, no calibration"
    if folder_takes_token_ids(model_spec):  # generated images mean nothing to a language model
        return f"{magnitude}; --data data-free generates images, not token ids)"
    return (
        f"{magnitude}), or --data data-free (for an image model with batch norm: inputs "
        "generated from its batch-norm statistics)"
    )


def folder_takes_token_ids(model_spec: str) -> bool:
    """Whether MODEL is a Hugging Face folder whose ``config.json`` has a vocabulary (a
    language model or another text transformer: its inputs are token ids); read as data,
    before the model is loaded."""
    import json

    config = Path(model_spec) / "config.json" if model_spec else None
    try:
        values = json.loads(config.read_text()) if config and config.is_file() else {}
    except (OSError, ValueError):
        return False
    if not isinstance(values, dict):
        return False
    text = values.get("text_config")
    return "vocab_size" in values or (isinstance(text, dict) and "vocab_size" in text)


def cli_words(exc: CompactnnError, data: str | None) -> CompactnnError:
    """A library message that asks for ``calib_data=``, in the command line's words."""
    text = str(exc)
    if data is None and "calib_data=" in text:
        return CompactnnError(text.replace("calib_data=", "--data FILE"))
    return exc


def model_words(args: argparse.Namespace, loaded: LoadedModel) -> list[str]:
    """The ``--weights``/``--trust-pickle``/``--data`` words a later command needs to load
    the same MODEL with the same data (a reference model brings its own)."""
    words = []
    if loaded.reference is None:
        words += ["--weights", shown_path(args.weights)] if args.weights else []
        words += ["--trust-pickle"] if args.trust_pickle else []
    if args.data and args.data != "data-free":
        words += ["--data", shown_path(args.data)]
    return words


def split_labels(
    data: Any,
    role: str = "eval",
    what: str = "--data",
    note: bool = True,
    model: torch.nn.Module | None = None,
) -> tuple[Any, torch.Tensor | None]:
    """``(inputs, labels)`` of ``--data``: a mapping with x/y tensors has labels, and so has
    one with ``y`` (or ``labels``) beside named inputs (``input_ids``, ``attention_mask``...:
    the inputs are then the dict of those, :func:`~compactnn.training.data.keyword_split`);
    anything else (a tensor, keyword inputs alone, a reference data set's batches) is inputs
    only.

    ``role="eval"`` (the default: scoring) reads the held-out split ``x_test``/``y_test`` of a
    file that also holds ``x_train``/``y_train``; ``role="train"`` (calibration) reads the
    training split (:func:`compactnn.training.data.labelled_keys`). When the file holds
    more than one labelled split, a note on stderr names the one used, and calibration
    (``role="train"``) always names the inputs it reads (``note=False``: the caller says
    it). A file whose only labelled split is the other role's
    (``x_test``/``y_test`` alone for calibration, ``x_train``/``y_train`` alone for scoring)
    serves both roles, with a note.

    ``model``: a ``y`` that ``model.forward`` takes as a parameter (required, or optional
    and not class labels: floating point, or more than one value per example) is one of
    its inputs, not labels: the x/y pair is then the keyword inputs, with a note.

    Example:
        >>> split_labels({"x": torch.ones(2, 3), "y": torch.tensor([0, 1])})[1]
        tensor([0, 1])
    """
    if isinstance(data, dict):
        tensors = [k for k, v in data.items() if isinstance(v, torch.Tensor)]
        keys = labelled_keys(tensors, role)
        if keys is not None and (inputs := _pair_as_inputs(model, data, keys)) is not None:
            print(
                f"note: {what} holds {keys[0]} and {keys[1]}, and {type(model).__name__}"
                f".forward takes both: they are its inputs ({keys[1]} is not read as labels)",
                file=sys.stderr,
            )
            return inputs, None
        if keys is not None:
            said = split_note(tensors, keys, what) if note else None
            if said is None and note and role == "train":  # what calibration reads, always
                rows = data[keys[0]].shape[0] if data[keys[0]].dim() else 1
                said = (
                    f"{what} holds {keys[0]}/{keys[1]}: calibrating on {keys[0]} ({rows} "
                    f"examples; the labels {keys[1]} are not used)"
                )
            if said:
                print(f"note: {said}", file=sys.stderr)
            return data[keys[0]], data[keys[1]]
        other = labelled_keys(tensors, "eval" if role == "train" else "train")
        if other is not None:  # the file's only split serves both roles: say so
            use = "calibrating on" if role == "train" else "scoring"
            print(f"note: {what} holds only {other[0]}/{other[1]}: {use} it", file=sys.stderr)
            return data[other[0]], data[other[1]]
        found = keyword_split(data, role) or keyword_split(data, _other_role(role))
        if found is not None:  # labels (y) beside named inputs: input_ids, attention_mask...
            return found
    return data, None


def _pair_as_inputs(
    model: torch.nn.Module | None, data: dict, keys: tuple[str, str]
) -> dict[str, Any] | None:
    """The x/y pair ``keys`` of ``data`` as keyword inputs (split suffix dropped), when
    ``model.forward`` takes both names and the labels key is one of its inputs: a required
    parameter, or an optional one fed values that are no class labels (floating point, or
    more than one per example). Else None: ``y`` stays labels."""
    import inspect

    forward = getattr(model, "forward", None)
    try:
        params = inspect.signature(forward).parameters if forward is not None else {}
    except (TypeError, ValueError):
        return None
    names = [k.removesuffix("_train").removesuffix("_test") for k in keys]
    if not all(n in params for n in names) or any(n in ("labels", "label") for n in names):
        return None
    label, y = params[names[1]], data[keys[1]]
    required = label.default is inspect.Parameter.empty
    if not (required or y.is_floating_point() or y.dim() > 1):
        return None
    return {names[0]: data[keys[0]], names[1]: y}


def _other_role(role: str) -> str:
    return "eval" if role == "train" else "train"


def calib_inputs(spec: str | None, loaded: LoadedModel | None = None) -> Any:
    """The calibration inputs ``--data`` names: ``x`` of a labelled file (x and y; the
    training split ``x_train`` of a file that also holds ``x_test``), as docs/cli.md says;
    everything else as :func:`~compactnn.model_io.resolve_data` gives it."""
    model = loaded.model if loaded is not None else None
    return split_labels(resolve_data(spec, loaded), role="train", model=model)[0]


def positive_int(text: str) -> int:
    """An argparse ``type=``: a whole number of 1 or more (``--threads``, ``--runs``).

    Example:
        >>> positive_int("4")
        4
    """
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 1 or more, e.g. 2")
    return value


def thread_cap() -> int:
    """The most ``--threads`` a command takes: 4 per CPU, at least 64. Far more threads than
    CPUs only slow torch down, and torch itself crashes (``set_num_threads(100000)``: a
    segmentation fault) or stalls for minutes at a few thousand."""
    return max(64, 4 * (os.cpu_count() or 1))


def thread_count(text: str) -> int:
    """An argparse ``type=`` for ``--threads``: a whole number from 1 to :func:`thread_cap`.

    Example:
        >>> thread_count("2")
        2
    """
    value = positive_int(text)
    if value > (cap := thread_cap()):
        cpus = os.cpu_count() or 1
        raise argparse.ArgumentTypeError(
            f"{text!r} threads is more than {cap} (4 per CPU, at least 64; this machine has "
            f"{cpus} CPUs): torch crashes or stalls with that many threads; pass a number up "
            f"to the CPU count ({cpus}), e.g. 2 (the default)"
        )
    return value


def tolerance_steps(text: str) -> float:
    """An argparse ``type=`` for ``--tolerance``: a finite number of 0 or more, in steps of
    the output scale.

    Example:
        >>> tolerance_steps("0.5")
        0.5
    """
    value = _finite(text)
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a finite number of 0 or more, e.g. 2 (the default, in steps of "
            "the output scale)"
        )
    return value


def non_negative_float(text: str) -> float:
    """An argparse ``type=``: a finite number of 0 or more (a tolerance).

    Example:
        >>> non_negative_float("0.5")
        0.5
    """
    value = _finite(text)
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number of 0 or more, e.g. 2")
    return value


def positive_float(text: str) -> float:
    """An argparse ``type=``: a finite number above 0.

    Example:
        >>> positive_float("1e-3")
        0.001
    """
    value = _finite(text)
    if value is None or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number above 0, e.g. 1")
    return value


def _finite(text: str) -> float | None:
    """``text`` as a finite float; None for nan, inf or no number at all."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def load_model(spec: str, args: argparse.Namespace) -> LoadedModel:
    if not spec.strip():  # Path("") is the current folder: say what is wrong instead
        raise CompactnnError(
            f"MODEL {spec!r} is empty: pass a reference model name, a Hugging Face model "
            "folder, a .pt2 file, or package.module:factory with --weights FILE."
        )
    loaded = resolve_model(spec, weights=args.weights, trust_pickle=args.trust_pickle)
    from compactnn.commands.hf_checkpoint import upcast_note

    if (note := upcast_note(spec)) is not None:  # a bfloat16/float16 folder, computed in float32
        print(note, file=sys.stderr)
    return loaded


def hide_hf_progress() -> None:
    """``--no-progress`` hides Hugging Face's own bars too (transformers' "Loading weights",
    for a model directory or a reference model such as ``minilm``). Nothing is imported when
    ``huggingface_hub`` is not installed."""
    import importlib.util

    if importlib.util.find_spec("huggingface_hub") is None:
        return
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # transformers reads this when it is imported
    if "transformers" in sys.modules:  # imported already: its own switch
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def source_record(loaded: LoadedModel) -> dict[str, str]:
    """What an artifact records about its float model: data for people, never code to run.

    A reference model is recorded by name (``eval`` rebuilds it). Anything else (a factory
    spec, a ``.pt2``/``.pt`` file, a Hugging Face directory) is recorded with the SHA-256 of
    its weights as information only; ``eval``/``deploy`` ask the user for it again.
    """
    if loaded.reference is not None:
        return {"kind": "reference", "model": loaded.source}
    if loaded.weights:  # package.module:factory with --weights
        weights = Path(loaded.weights)
        return {
            "kind": "factory",
            "model": loaded.source,
            "weights": str(weights.resolve()),
            "weights_sha256": file_sha256(weights),
        }
    path = Path(loaded.source)
    record = {"kind": _file_kind(path), "model": str(path.resolve())}
    weights_file = hf_weights_file(path) if path.is_dir() else path
    if weights_file is not None and weights_file.is_file():
        record["weights_sha256"] = file_sha256(weights_file)
    return record


def _file_kind(path: Path) -> str:
    if path.is_dir():
        return "Hugging Face directory"
    return {".pt2": "torch.export archive"}.get(path.suffix, "pickled module")


def close_progress_bars() -> None:
    """Close the tqdm bars an interrupted step left open, innermost first.

    A bar whose loop was interrupted stays open (the traceback keeps it alive) with the
    cursor after its text; closing it clears its line (``leave=False``) or ends it with a
    newline, so what is printed next starts a line of its own.
    """
    from tqdm import tqdm

    bars = sorted(getattr(tqdm, "_instances", ()), key=lambda bar: -abs(getattr(bar, "pos", 0)))
    for bar in bars:
        try:
            bar.close()
        except (OSError, ValueError):  # its stream is gone: nothing left to tidy
            pass
