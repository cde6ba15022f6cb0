"""What ``compactnn eval`` reads from ``--data``: a file, a data set name (``mnist``,
``digits``, as ``train`` and ``report`` take them) or a reference model's name; and which
part of it ``--recipe`` calibrates on (the training split when the data holds one beside
the held-out split it scores: calibrating on the scored data would flatter the score)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from compactnn.errors import CompactnnError
from compactnn.model_io import LoadedModel, reference_names, resolve_data
from compactnn.training.data import labelled_keys, split_pair

# a data set name, or a reference model's name with a labelled data set -> that data set:
# eval scores its held-out split (x_test/y_test), as train and report do
EVAL_DATA_SETS = {"mnist": "mnist", "digits": "digits", "mnist-cnn": "mnist",
                  "digits-resnet": "digits"}  # fmt: skip
SPLIT_KEYS = ("x_train", "y_train", "x_test", "y_test")
# what resolve_data reads, or refuses with its own message (a pickle)
READ_SUFFIXES = (".safetensors", ".npy", ".pt", ".pth", ".pkl", ".pickle")


def read_data(spec: str, loaded: LoadedModel) -> Any:
    """``--data`` as read: a labelled data set (:data:`EVAL_DATA_SETS`) as its four split
    tensors (``x_train``... ``y_test``; scored on the held-out split); another reference
    model's name as its calibration batches (training data, said on stderr); a file as
    :func:`~compactnn.model_io.resolve_data` reads it."""
    if spec in EVAL_DATA_SETS and not Path(spec).exists():
        from compactnn.commands.train import labelled_data

        split = labelled_data(EVAL_DATA_SETS[spec])
        return {k: getattr(split, k) for k in SPLIT_KEYS}
    suffix = Path(spec).suffix
    if suffix not in READ_SUFFIXES and spec not in reference_names():
        names = ", ".join(sorted(reference_names()))
        raise CompactnnError(
            f"unknown data {spec!r}: pass a .safetensors or .npy file of inputs, a data set "
            f"name ({', '.join(sorted(set(EVAL_DATA_SETS.values())))}) or a reference model's "
            f"name ({names})."
        )
    if spec in reference_names() and not Path(spec).exists():
        print(
            f"note: --data {spec} gives the reference's calibration batches (its training "
            "data, not held out), scored as inputs alone; pass a held-out file for a fairer "
            "score.",
            file=sys.stderr,
        )
    return resolve_data(spec, loaded)


def check_data_size(spec: str, loaded: LoadedModel, data: Any) -> None:
    """Refuse ``--data`` (as read, or its inputs: a tensor, a labelled mapping, calibration
    batches) whose images are of another size than the reference model takes, in the line
    ``compactnn report`` gives, before any note or run: a model with global pooling runs on
    any size, at chance accuracy. The images checked are those scored (the held-out split
    of a mapping that holds two), or the first batch."""
    # imported here: report imports this module

    if isinstance(data, dict):
        keys = labelled_keys([k for k in data if isinstance(k, str)], "eval")
        data = data[keys[0]] if keys is not None else None
    elif isinstance(data, list):
        data = data[0] if data else None
    check_input_size(spec, loaded, data)


def calibration_inputs(raw: Any, scored: Any) -> Any:
    """The inputs ``eval --recipe`` calibrates on: the training split of ``--data`` (``raw``,
    as read) when it holds one beside the held-out split it scores (``scored``); else
    ``scored`` itself, with a note on stderr that calibration and scoring share data.

    Example:
        >>> import torch
        >>> data = {"x_train": torch.zeros(2, 3), "y_train": torch.zeros(2).long(),
        ...         "x_test": torch.ones(2, 3), "y_test": torch.ones(2).long()}
        >>> calibration_inputs(data, data["x_test"]).sum().item()
        0.0
    """
    pair = split_pair(raw)
    if pair is not None:
        train, held, calib, inputs = pair
        print(
            f"note: --data holds {train} and {held}: --recipe calibrates on {calib}, "
            f"scoring on {held} (the held-out split)",
            file=sys.stderr,
        )
        return inputs
    print(ONE_SPLIT_NOTE, file=sys.stderr)
    return scored


ONE_SPLIT_NOTE = (
    "note: --data holds one split: --recipe calibrates on the data it scores, which can "
    "flatter the score; pass a .safetensors with x_train/y_train and x_test/y_test (or "
    "--data mnist|digits) to calibrate on one split and score the other"
)


def drop_lm_labels(model: Any, inputs: Any, labels: Any, spec: str) -> Any:
    """``labels``, or None (said on stderr) when they are a causal LM's token-id targets,
    shaped as ``input_ids`` (Hugging Face's convention): no classes to score top-1 on, so
    ``eval`` scores next-token perplexity instead."""
    from compactnn.measure.perplexity import is_causal_lm

    ids = inputs.get("input_ids") if isinstance(inputs, dict) else None
    if ids is None or labels is None or labels.shape != ids.shape or not is_causal_lm(model):
        return labels
    print(
        f"note: --data {spec}: a causal LM's labels (token ids shaped as input_ids) are not "
        "classes; scoring next-token perplexity of input_ids",
        file=sys.stderr,
    )
    return None


def check_split_labelled(raw: Any, spec: str) -> None:
    """Refuse ``--data`` whose tensors are all named as a split (``input_ids_train``,
    ``x_test``...) but hold no labels: a split is read only with its labels, and an
    unlabelled file holds the model's inputs under their own names.

    Raises:
        CompactnnError: naming the keys found, the keys an unlabelled file needs and those
            of a labelled split.
    """
    if not isinstance(raw, dict) or not raw:
        return
    keys = sorted(k for k in raw if isinstance(k, str))
    if len(keys) != len(raw) or not all(k.endswith(("_train", "_test")) for k in keys):
        return
    if any(k in ("y_train", "y_test", "labels_train", "labels_test") for k in keys):
        return  # labelled: read as a split
    names = sorted({k.removesuffix("_train").removesuffix("_test") for k in keys})
    shown = ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
    raise CompactnnError(
        f"--data {spec} holds {shown}: a split (_train/_test keys) without labels. An "
        f"unlabelled file holds the inputs under the names the model takes "
        f"({', '.join(names)}, without _train/_test), and a "
        f"split needs labels beside them ({names[0]}_train/y_train and {names[0]}_test/y_test; "
        "the _test part is scored): save one of these forms."
    )


def check_input_size(spec: str, loaded, data) -> None:
    """Refuse inputs whose spatial size is not the one a reference model records (its
    example batch): a model with global pooling runs on any size, at chance accuracy.

    Raises:
        CompactnnError: ``--data digits holds 8x8 inputs, but mnist-cnn takes 28x28 ...``
    """
    import torch

    x = data[0] if isinstance(data, tuple) else data
    want = loaded.example if loaded.reference is not None else None
    tensors = all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in (x, want))
    if not tensors or x.dim() != want.dim() or x.dim() < 3:
        return
    given, expected = tuple(x.shape[2:]), tuple(want.shape[2:])
    if given != expected:

        def size(shape):
            return "x".join(map(str, shape))

        raise CompactnnError(
            f"--data {spec} holds {size(given)} inputs, but {loaded.source} takes "
            f"{size(expected)} ones ({size(given)} given, {size(expected)} expected): pass "
            f"{size(expected)} inputs (its own data: --data {loaded.source})."
        )
