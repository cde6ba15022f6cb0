"""Training data for ``compactnn.train``: labelled batches, checked before any training.

Accepted forms: a pair ``(inputs, labels)`` of tensors (shuffled each epoch by a seeded
generator, so a resumed run sees the same batches), a dict with ``x_train``/``y_train`` (or
``x``/``y``) tensors, an object with ``x_train``/``y_train`` attributes (the
embedded data sets), or an iterable of ``(inputs, labels)`` batches such as a
``DataLoader`` (iterated as given; the global batches, never a ``DistributedSampler``'s
share: :func:`check_unsplit`). Floating-point inputs are cast to the model's floating-point
parameter dtype (e.g. float16 or numpy's float64 into a float32 model); integer inputs stay
as they are.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data.distributed import DistributedSampler

from compactnn.core.calib import check_finite, describe, expected_input_hint, main_output
from compactnn.core.model_input import working_copy
from compactnn.errors import CompactnnError, first_line

# Where a mapping keeps its inputs and labels, in the order they are looked for: training
# reads a training split first, evaluation a held-out one, so a file holding both
# (x_train/y_train and x_test/y_test) is never scored on what the model was trained on.
TRAIN_KEYS = (("x_train", "y_train"), ("x", "y"), ("inputs", "labels"))
EVAL_KEYS = (("x_test", "y_test"), ("x", "y"), ("inputs", "labels"))
# Labels kept beside named (keyword) inputs such as input_ids/attention_mask: the label key
# and the suffix the inputs of that split carry, in the order they are looked for.
KEYWORD_LABELS = {
    "train": (("y_train", "_train"), ("y", ""), ("labels", "")),
    "eval": (("y_test", "_test"), ("y", ""), ("labels", "")),
}
_SPLITS = ("_train", "_test")


def labelled_keys(keys: Iterable[str], role: str = "train") -> tuple[str, str] | None:
    """The ``(inputs, labels)`` key pair to read from a mapping with these ``keys``.

    ``role="train"`` prefers the training split (``x_train``/``y_train``), ``role="eval"``
    the held-out one (``x_test``/``y_test``); both fall back to ``x``/``y``, then
    ``inputs``/``labels``. None when no pair is complete.

    Example:
        >>> both = ["x_train", "y_train", "x_test", "y_test"]
        >>> labelled_keys(both, "train"), labelled_keys(both, "eval")
        (('x_train', 'y_train'), ('x_test', 'y_test'))
    """
    if role not in ("train", "eval"):
        raise ValueError(f"role must be 'train' or 'eval', got {role!r}")
    names = set(keys)
    order = EVAL_KEYS if role == "eval" else TRAIN_KEYS
    return next(((kx, ky) for kx, ky in order if kx in names and ky in names), None)


def keyword_split(data: Any, role: str = "train") -> tuple[dict[str, Any], Any] | None:
    """``(keyword inputs, labels)`` of a mapping that holds labels (``y``, ``labels``, or
    ``y_train``/``y_test`` for a split) beside named input tensors (``input_ids``,
    ``attention_mask``, ``pixel_values``...): the inputs are all the other tensors of that
    split (a split's ``_train``/``_test`` suffix dropped). None when the mapping has an
    x/y pair (:func:`labelled_keys`) or no such labels.

    Example:
        >>> ids, y = torch.ones(2, 3).long(), torch.tensor([0, 1])
        >>> inputs, labels = keyword_split({"input_ids": ids, "attention_mask": ids, "y": y})
        >>> sorted(inputs), labels.tolist()
        (['attention_mask', 'input_ids'], [0, 1])
    """
    if not isinstance(data, dict) or labelled_keys(data, role) is not None:
        return None
    names = [k for k, v in data.items() if isinstance(k, str) and isinstance(v, torch.Tensor)]
    for label, suffix in KEYWORD_LABELS[role]:
        if label not in names:
            continue
        if suffix:
            inputs = {k[: -len(suffix)]: data[k] for k in names if k.endswith(suffix)}
        else:
            inputs = {k: data[k] for k in names if not k.endswith(_SPLITS)}
        for name in ("y", "labels"):  # labels are never inputs
            inputs.pop(name, None)
        if inputs:
            return inputs, data[label]
    return None


def split_pair(data: Any) -> tuple[str, str, str, Any] | None:
    """``(training split, held-out split, training inputs' name, training inputs)`` of a
    mapping holding both (an x pair, or keyword inputs with ``y_train``/``y_test``); None
    otherwise (one split, or not a mapping).

    Example:
        >>> t = torch.zeros(2)
        >>> split_pair({"x_train": t, "y_train": t, "x_test": t, "y_test": t})[:3]
        ('x_train/y_train', 'x_test/y_test', 'x_train')
        >>> split_pair({"x": t, "y": t}) is None
        True
    """
    if not isinstance(data, dict):
        return None
    train, held = labelled_keys(data, "train"), labelled_keys(data, "eval")
    if train is not None and held is not None and train != held:
        return "/".join(train), "/".join(held), train[0], data[train[0]]
    kw_train, kw_held = keyword_split(data, "train"), keyword_split(data, "eval")
    if kw_train is not None and kw_held is not None and kw_train[1] is not kw_held[1]:
        return "the *_train tensors", "the *_test ones", "the *_train inputs", kw_train[0]
    return None


def rows(inputs: Any) -> int:
    """Samples in ``inputs``: a tensor's first dimension, or that of a dict's first tensor.

    Example:
        >>> rows({"input_ids": torch.zeros(3, 5), "attention_mask": torch.zeros(3, 5)})
        3
    """
    if isinstance(inputs, dict):
        return rows(next(iter(inputs.values())))
    return int(inputs.shape[0])


def split_note(keys: Iterable[str], used: tuple[str, str], what: str = "the data") -> str | None:
    """A line saying which labelled split was read, when ``keys`` hold more than one
    (e.g. ``x_train``/``y_train`` and ``x_test``/``y_test``); None when there was no choice.

    Example:
        >>> split_note(["x_train", "y_train", "x_test", "y_test"], ("x_test", "y_test"), "--data")
        '--data holds x_train/y_train and x_test/y_test: using x_test/y_test (the held-out split)'
    """
    names = set(keys)
    pairs = [p for p in dict.fromkeys(TRAIN_KEYS + EVAL_KEYS) if set(p) <= names]
    if len(pairs) < 2:
        return None
    which = {"x_test": " (the held-out split)", "x_train": " (the training split)"}
    held = " and ".join(f"{kx}/{ky}" for kx, ky in pairs)
    return f"{what} holds {held}: using {used[0]}/{used[1]}{which.get(used[0], '')}"


@dataclass
class TrainData:
    """Labelled training data: tensors ``x``/``y`` or an iterable of ``(x, y)`` batches.
    ``dtype``: the floating-point dtype a loader's floating-point inputs are cast to
    (tensor ``x`` is cast once, by :func:`as_train_data`). ``min_batch``: a batch of fewer
    samples is skipped (a batch norm in training mode needs two:
    :mod:`compactnn.training.batch_norm`)."""

    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    loader: Iterable | None = None
    dtype: torch.dtype | None = None
    min_batch: int = 1

    def batches(self, batch_size: int, epoch: int, seed: int) -> Iterator[tuple]:
        """The epoch's batches; tensor data is permuted by a generator seeded from
        ``(seed, epoch)``, so any epoch can be replayed exactly."""
        if self.loader is not None:
            for i, b in enumerate(self.loader):
                x, y = _as_pair(b, f"batch {i}")
                if rows(x) >= self.min_batch:
                    yield cast_inputs(x, self.dtype), y
            return
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(self.x.shape[0], generator=gen)
        for start in range(0, len(order) - self.min_batch + 1, batch_size):
            idx = order[start : start + batch_size]
            yield self.x[idx], self.y[idx]

    def steps(self, batch_size: int) -> int | None:
        """Batches per epoch (a loader's length, or None without one)."""
        if self.loader is not None:
            return len(self.loader) if hasattr(self.loader, "__len__") else None
        return len(range(0, self.x.shape[0] - self.min_batch + 1, batch_size))

    def calibration(self, n: int = 256, batch_size: int = 64) -> list[torch.Tensor]:
        """The first ``n`` inputs in stored order (for initialising quantizers)."""
        if self.loader is not None:
            out, seen = [], 0
            for b in self.loader:
                x = cast_inputs(_as_pair(b, "calibration batch")[0], self.dtype)
                out.append(x)
                seen += x.shape[0]
                if seen >= n:
                    break
            return out
        return list(torch.split(self.x[:n], batch_size))


def _as_pair(batch: Any, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict):
        keys = labelled_keys(batch, "train")
        if keys is not None:
            return batch[keys[0]], batch[keys[1]]
        raise CompactnnError(
            f"training {where} is a dict with keys {sorted(batch)}; it needs inputs and "
            "labels under x/y (or x_train/y_train)."
        )
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise CompactnnError(
        f"training {where} has no labels: pass (inputs, labels) pairs, e.g. "
        "train(model, recipe, (x_train, y_train)) or a DataLoader of (x, y) batches."
    )


def eval_pair(batch: Any, where: str) -> tuple[Any, Any]:
    """``(inputs, labels)`` of one evaluation batch: an ``(inputs, labels)`` pair (inputs a
    tensor or a dict of keyword tensors), or a dict with x/y or labels beside keyword inputs
    (:func:`keyword_split`); ``where`` names the batch in the error."""
    if isinstance(batch, dict):
        keys = labelled_keys(batch, "eval") or labelled_keys(batch, "train")
        if keys is not None:
            return batch[keys[0]], batch[keys[1]]
        found = keyword_split(batch, "eval") or keyword_split(batch, "train")
        if found is not None:
            return found
        raise CompactnnError(
            f"{where} is a dict with keys {sorted(map(str, batch))} but no labels: save them "
            "under y (or labels) beside the inputs (x, or named inputs such as input_ids)."
        )
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise CompactnnError(
        f"{where} has no labels: pass (inputs, labels) pairs, e.g. (x, y) tensors or a "
        "DataLoader of (x, y) batches."
    )


def float_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of ``model``'s first floating-point parameter (None when it has none).

    Example:
        >>> float_dtype(nn.Linear(2, 2).half())
        torch.float16
    """
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def cast_inputs(x: Any, dtype: torch.dtype | None) -> Any:
    """``x`` in ``dtype`` when both are floating point; anything else (integer token ids,
    no ``dtype``) as given.

    Example:
        >>> cast_inputs(torch.ones(2, dtype=torch.float16), torch.float32).dtype
        torch.float32
        >>> cast_inputs(torch.ones(2, dtype=torch.int64), torch.float32).dtype
        torch.int64
    """
    if (
        isinstance(x, torch.Tensor)
        and dtype is not None
        and dtype.is_floating_point
        and x.is_floating_point()
        and x.dtype != dtype
    ):
        return x.to(dtype)
    return x


def as_train_data(data: Any, dtype: torch.dtype | None = None) -> TrainData:
    """Normalise what the user passed (see the module docstring); floating-point inputs
    are cast to ``dtype`` (the model's: :func:`float_dtype`) when it is given."""
    if data is None:
        raise CompactnnError("train() needs labelled data: (inputs, labels) tensors or batches.")
    if isinstance(data, torch.Tensor):
        raise CompactnnError(
            "training data has no labels: a single tensor was given; pass (inputs, labels)."
        )
    if hasattr(data, "x_train") and hasattr(data, "y_train"):
        data = (data.x_train, data.y_train)
    if isinstance(data, dict) or (
        isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor)
    ):
        x, y = _as_pair(data, "data")
        if not isinstance(y, torch.Tensor):
            y = torch.as_tensor(y)
        if x.shape[0] != y.shape[0]:
            raise CompactnnError(
                f"training data: {x.shape[0]} inputs but {y.shape[0]} labels; they must match."
            )
        if x.shape[0] == 0:
            raise CompactnnError("training data is empty: it holds 0 samples.")
        return TrainData(x=cast_inputs(x, dtype), y=y)
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
        check_unsplit(data)
        if iter(data) is data:  # a one-shot iterator: keep its batches for every epoch
            data = list(data)
        return TrainData(loader=data, dtype=dtype)
    raise CompactnnError(f"training data of type {type(data).__name__} is not supported.")


def check_unsplit(loader: Any) -> None:
    """Refuse a loader whose ``DistributedSampler`` (its sampler, or its batch sampler's)
    gives each process its own part of the data: ``train`` splits every batch over the
    processes itself, so each would train on ``1/world_size`` of its part."""
    owners = (loader, getattr(loader, "batch_sampler", None))
    for sampler in (getattr(owner, "sampler", None) for owner in owners):
        replicas = getattr(sampler, "num_replicas", 1)
        if isinstance(sampler, DistributedSampler) and replicas > 1:
            raise CompactnnError(
                f"the training DataLoader's sampler is a DistributedSampler "
                f"(num_replicas={replicas}), which gives each process its own part of the "
                "data, and train() splits every batch over the processes itself: pass the "
                "global loader, the same on every process (e.g. DataLoader(dataset, "
                "batch_size=B, shuffle=True): train() seeds its shuffle alike on every rank)."
            )


def check_finite_inputs(data: TrainData, calib: list[Any]) -> None:
    """Refuse training inputs holding NaN or Inf, named as training data: every sample of
    tensor data (one sum when finite), the calibration batches of a loader (a later batch
    shows as a NaN loss, whose message names the data).

    Example:
        >>> x = torch.zeros(300, 2); x[280, 1] = float("nan")
        >>> check_finite_inputs(TrainData(x=x, y=torch.zeros(300).long()), [x[:256]])
        Traceback (most recent call last):
        ...
        compactnn.errors.CompactnnError: training data holds 1 NaN and 0 Inf value(s) \
(first at index (280, 1) of shape (300, 2)); clean the data (e.g. torch.nan_to_num) or drop \
those samples.
    """
    if data.loader is None:
        check_finite(data.x, "training data")
        return
    for i, x in enumerate(calib):
        check_finite(x, f"training batch {i}")


def check_labels(y: torch.Tensor, num_classes: int, where: str = "training data") -> None:
    """Labels must be integer class indices in ``[0, num_classes)``."""
    if y is None:
        raise CompactnnError(f"{where} has no labels.")
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.dim() != 1:
        raise CompactnnError(
            f"{where}: labels must be a 1-D integer tensor of class indices, got "
            f"{y.dtype} of shape {tuple(y.shape)}."
        )
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise CompactnnError(
            f"{where}: labels range over [{int(y.min())}, {int(y.max())}] but the model has "
            f"{num_classes} outputs; labels must lie in [0, {num_classes - 1}]."
        )


def as_eval_data(
    data: Any,
    example: torch.Tensor | None = None,
    what: str = "eval_data",
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, ...]:
    """Held-out ``(inputs, labels)`` tensors from what the user passed as ``eval_data``.

    Accepted: a pair of tensors, a dict with ``x_test``/``y_test`` (the held-out split of a
    file that also holds ``x_train``/``y_train``; else ``x``/``y`` or ``inputs``/``labels``)
    tensors, or an object with ``x_test``/``y_test`` attributes (an
    embedded data set). ``example`` (a training batch) checks the inputs' per-sample shape;
    ``what`` names the argument in error messages; floating-point inputs are cast to
    ``dtype`` when it is given (:func:`cast_inputs`).

    Example:
        >>> x, y = as_eval_data({"x": torch.zeros(3, 2), "y": torch.tensor([0, 1, 0])})
        >>> tuple(x.shape), y.tolist()
        ((3, 2), [0, 1, 0])
    """
    if hasattr(data, "x_test") and hasattr(data, "y_test"):
        data = (data.x_test, data.y_test)
    if isinstance(data, dict):
        keys = labelled_keys(data, "eval")
        found = (data[keys[0]], data[keys[1]]) if keys else keyword_split(data, "eval")
        if found is None:
            raise CompactnnError(
                f"{what} is a dict with keys {sorted(data)} but no labels: save inputs and labels "
                "under x/y (or x_test/y_test, inputs/labels), or labels under y beside named "
                "inputs (input_ids, attention_mask...)."
            )
        data = found
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        if hasattr(data, "__iter__") and not isinstance(data, (tuple, list, torch.Tensor)):
            raise CompactnnError(  # a DataLoader's batches may hold labels: it is the type
                f"{what} takes (inputs, labels) tensors, not a {type(data).__name__}: pass e.g. "
                f"{what}=(x_test, y_test) (torch.cat a loader's batches to make them)."
            )
        raise CompactnnError(
            f"{what} of type {type(data).__name__} has no labels: pass (inputs, labels) "
            f"tensors, e.g. {what}=(x_test, y_test)."
        )
    x, y = data
    if isinstance(x, dict) and x and all(isinstance(v, torch.Tensor) for v in x.values()):
        x = {k: cast_inputs(v, dtype) for k, v in x.items()}  # keyword inputs (input_ids...)
    elif not isinstance(x, torch.Tensor):
        raise CompactnnError(
            f"{what} inputs must be a tensor or a dict of tensors, got {type(x).__name__}."
        )
    y = y if isinstance(y, torch.Tensor) else torch.as_tensor(y)
    n = rows(x)
    if n != y.shape[0] or n == 0:
        raise CompactnnError(
            f"{what}: {n} inputs but {y.shape[0]} labels; give one label per input "
            "(and at least one input)."
        )
    if isinstance(x, dict):
        return x, y
    if example is not None and tuple(x.shape[1:]) != tuple(example.shape[1:]):
        raise CompactnnError(
            f"{what} inputs have per-sample shape {tuple(x.shape[1:])} but the training "
            f"inputs have {tuple(example.shape[1:])}; pass held-out data shaped like the "
            "training data."
        )
    return cast_inputs(x, dtype), y


def num_outputs(model: nn.Module, x: torch.Tensor) -> int:
    """The number of classes ``model`` outputs, from a copy of it run in eval mode on two
    samples: the input model is never run (a forward in train mode would overwrite its batch
    norms' running statistics, and the trained copy and the teacher would start from them).
    Inputs the model cannot run on are named by shape, or by dtype when that is the cause."""
    probe = working_copy(model).eval()  # legacy weight_norm too (core.model_input)
    try:
        with torch.no_grad():
            out = probe(x[:2])
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        raise CompactnnError(fit_error(model, x, first_line(exc))) from exc
    logits = _main_output_or_none(out)
    if logits is None or logits.dim() != 2:
        got = getattr(out, "shape", type(out).__name__)
        if logits is not None and not isinstance(out, torch.Tensor):
            got = f"{got} whose main output has shape {tuple(logits.shape)}"
        raise CompactnnError(
            "train() trains classifiers: the model must return logits of shape "
            f"(batch, classes) (a tensor, a dict's 'logits' or first value, or a tuple's first "
            f"item), got {got}."
        )
    return int(logits.shape[1])


def class_logits(out: Any) -> torch.Tensor:
    """The logits in a classifier's output, which training scores and distils: the output
    itself (a tensor), else its main output as compress, eval and deploy take it
    (:func:`compactnn.core.calib.main_output`: ``logits``, or the first value or item).

    Example:
        >>> class_logits({"logits": torch.ones(2, 3), "feat": torch.zeros(2, 8)}).shape
        torch.Size([2, 3])
        >>> class_logits((torch.ones(2, 3), torch.zeros(2, 8))).shape
        torch.Size([2, 3])
    """
    return out if isinstance(out, torch.Tensor) else main_output(out)


def _main_output_or_none(out: Any) -> torch.Tensor | None:
    try:
        return class_logits(out)
    except TypeError:  # no tensor in it
        return None


# Words of PyTorch's errors for an input whose dtype differs from the layer's weights
_DTYPE_WORDS = ("dtype", "scalar type", "input type", "c10::")


def fit_error(model: nn.Module, x: torch.Tensor, cause: str) -> str:
    """Why the training inputs ``x`` do not fit ``model`` (``cause``: PyTorch's first line):
    their dtype when the cause is a dtype mismatch, else their shape next to the input the
    first layer expects."""
    want = float_dtype(model)
    if any(w in cause.lower() for w in _DTYPE_WORDS):
        kind = "floating-point" if x.is_floating_point() else "integer (not cast)"
        return (
            f"the training data does not fit the model: it holds {kind} inputs of dtype "
            f"{x.dtype} ({describe(x)}), the model's parameters are {want} ({cause}). Pass "
            f"floating-point inputs (they are cast to {want})."
        )
    return (
        f"the training data does not fit the model: it holds {describe(x)}, the model "
        f"expects {expected_input_hint(model)} ({cause}). Pass inputs of that shape "
        "(e.g. a data set of the image size the model was built for)."
    )
