"""What an artifact records of what made it: a digest of the float model compress was given
(``extra["float_model"]``) and a summary of its calibration data (``extra["calibration"]``).

A report compares compressions of one float model on equal terms: the float-model digest
lets it refuse an artifact made from other weights (from Python as from the command line,
where the weights file's SHA-256 is recorded too), and the calibration summary lets it say
when rows were calibrated on different data. Both are new optional keys: older artifacts
load as before and simply lack them.

Example:
    >>> m = torch.nn.Linear(2, 2)
    >>> float_record(m)["sha256"] == state_sha256(m)
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from compactnn.core.calib import batch_size_of, to_dtype
from compactnn.core.digest import tensors_sha256
from compactnn.core.qlayers import ActQuantizer

FLOAT_KEY = "float_model"  # extra: {"sha256", "tensors"} of the float model's state dict
CALIB_KEY = "calibration"  # extra: {"samples", "batches", "inputs_sha256"}; no thread count:
# two identical runs on machines of other core counts write the same bytes
# activation ranges (and statistics) from fewer inputs than one default batch miss the
# outliers later inputs hit; methods with needs of their own warn with their own number
MIN_CALIB_SAMPLES = 16  # images; a batch of token ids observes every token's activations


def state_sha256(model: nn.Module) -> str | None:
    """SHA-256 over the model's state dict: each name (sorted), then its tensor's shape,
    dtype and bytes; one pass over the weights. None when a tensor has no data (``meta``,
    e.g. a streamed skeleton) or cannot be read as bytes.

    Example:
        >>> a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        >>> b.load_state_dict(a.state_dict())
        <All keys matched successfully>
        >>> state_sha256(a) == state_sha256(b)
        True
    """
    state = model.state_dict()
    if any(isinstance(v, torch.Tensor) and v.is_meta for v in state.values()):
        return None
    try:
        return tensors_sha256(sorted(state.items(), key=lambda kv: kv[0]))
    except (RuntimeError, TypeError, ValueError):  # a tensor subclass with no plain bytes
        return None


def float_record(model: nn.Module) -> dict[str, Any] | None:
    """``extra["float_model"]``: the digest of ``model``'s state dict and its tensor count."""
    digest = state_sha256(model)
    return None if digest is None else {"sha256": digest, "tensors": len(model.state_dict())}


def _tensors(batch: Any, prefix: str) -> Iterable[tuple[str, Any]]:
    if isinstance(batch, torch.Tensor):
        yield prefix, batch
    elif isinstance(batch, dict):
        for key in sorted(batch, key=str):
            yield from _tensors(batch[key], f"{prefix}.{key}")
    elif isinstance(batch, (tuple, list)):
        for i, item in enumerate(batch):
            yield from _tensors(item, f"{prefix}.{i}")
    else:
        yield prefix, type(batch).__name__


def calibration_summary(batches: list[Any]) -> dict[str, Any]:
    """``extra["calibration"]``: samples, batches, a SHA-256 of the inputs.

    Example:
        >>> s = calibration_summary(list(torch.zeros(3, 2).split(2)))
        >>> s["samples"], s["batches"], len(s["inputs_sha256"])
        (3, 2, 64)
    """
    # by position, not by key: a tensor of ids and {"input_ids": ids} are the same inputs
    values = (v for i, b in enumerate(batches) for _, v in _tensors(b, str(i)))
    items = ((str(j), v) for j, v in enumerate(values))
    return {
        "samples": sum(batch_size_of(b) for b in batches),
        "batches": len(batches),
        "inputs_sha256": tensors_sha256(items),
    }


CALIB_BATCH = 32  # rows per batch as_batches splits a tensor (or keyword tensors) into


def _rows(inputs: Any) -> int | None:
    """Samples in a tensor, or in a dict of keyword tensors of one row count; else None."""
    values = list(inputs.values()) if isinstance(inputs, dict) else [inputs]
    if not values or not all(isinstance(v, torch.Tensor) and v.dim() for v in values):
        return None
    rows = {int(v.shape[0]) for v in values}
    return rows.pop() if len(rows) == 1 else None


def _split(inputs: Any, size: int) -> list[Any]:
    """``inputs`` in batches of ``size`` rows, as :func:`~compactnn.core.calib.as_batches`
    splits them (and as a loader without ``drop_last`` yields them)."""
    if isinstance(inputs, dict):
        n = _rows(inputs) or 0
        return [{k: v[i : i + size] for k, v in inputs.items()} for i in range(0, n, size)]
    return list(torch.split(inputs, size))


def _batch_sizes(n: int, batches: int) -> list[int]:
    """Batch sizes that split ``n`` rows into ``batches`` batches, likeliest first: the
    default (:data:`CALIB_BATCH`), an even split, the whole, then powers of two (a few: each
    is one more pass over the inputs)."""
    sizes = [CALIB_BATCH, -(-n // batches), n, *(2**i for i in range(n.bit_length()))]
    fits = [s for s in sizes if s > 0 and -(-n // s) == batches]
    return list(dict.fromkeys(fits))


def _batchings(inputs: Any, record: dict[str, Any]) -> Iterator[list[Any]]:
    """``inputs`` batched each way compress may have batched them, given the sample and
    batch counts ``record`` holds; none when the sample count differs (nothing hashed)."""
    batches = record.get("batches")
    if isinstance(inputs, list):  # batches already (a reference model's): as they are
        if inputs and sum(batch_size_of(b) for b in inputs) == record.get("samples"):
            yield inputs
        return
    n = _rows(inputs)
    if n is None or n != record.get("samples") or not isinstance(batches, int) or batches < 1:
        return
    for size in _batch_sizes(n, batches):
        yield _split(inputs, size)


def scored_on_calibration(record: Any, inputs: Any, dtype: torch.dtype | None = None) -> bool:
    """Whether ``inputs`` (every scored sample: a tensor, a dict of keyword tensors, or a
    list of batches) are the calibration inputs ``record`` (``extra["calibration"]``)
    digests: the same samples in the same order, batched as compress batched them (32 rows,
    or a loader's equal batches), floating-point values cast to ``dtype`` (the model's, as
    compress casts them). Calibration in batches of no one size is not recognised, nor a
    part of it (no per-sample digests are recorded). Hashes the inputs only when their
    sample count is the recorded one.

    Example:
        >>> x = torch.arange(70.0).reshape(70, 1)
        >>> record = calibration_summary(list(x.split(32)))
        >>> scored_on_calibration(record, x), scored_on_calibration(record, x.flip(0))
        (True, False)
    """
    if not isinstance(record, dict) or not isinstance(record.get("inputs_sha256"), str):
        return False
    for split in _batchings(inputs, record):
        if dtype is not None:
            split = [to_dtype(b, dtype) for b in split]
        if calibration_summary(split)["inputs_sha256"] == record["inputs_sha256"]:
            return True
    return False


DATA_KEY = "calibration_data"  # extra: how generated calibration inputs were made


def generated_record(calib_data: Any) -> dict[str, Any] | None:
    """``extra["calibration_data"]`` of data that says how it was made (the data-free
    ``GeneratedData.artifact_record``); None otherwise. Found by name: core imports nothing
    above it."""
    record = getattr(calib_data, "artifact_record", None)
    return record() if callable(record) else None


def record_provenance(
    model: nn.Module, extra: dict[str, Any], batches: list[Any], calib_data: Any = None
) -> None:
    """Record in ``extra`` the float model ``model`` is (kept from an earlier compress: an
    already compressed model is not the float model) and the calibration data, if any."""
    if batches:
        extra[CALIB_KEY] = calibration_summary(batches)
        if (made := generated_record(calib_data)) is not None:
            extra[DATA_KEY] = made
        else:  # a later compress on other data
            extra.pop(DATA_KEY, None)
    if FLOAT_KEY in extra or getattr(model, "_compactnn", None):  # a second compress
        return
    if (record := float_record(model)) is not None:
        extra[FLOAT_KEY] = record


def record_source(extra: dict[str, Any], source: dict[str, Any]) -> None:
    """Set ``extra["source"]`` (what the command line records of the MODEL argument). A
    Hugging Face directory's record names its weights files' SHA-256, which identifies the
    float model; its state digest is dropped, as a streamed run (whose skeleton holds no
    weights to hash) never has one, so both runs write the same bytes."""
    extra["source"] = source
    if source.get("kind") == "Hugging Face directory":
        extra.pop(FLOAT_KEY, None)


def _token_ids(batch: Any) -> bool:
    """Whether ``batch`` holds integer token ids (a tensor, or a dict's ``input_ids``)."""
    if isinstance(batch, dict):
        batch = batch.get("input_ids")
    elif isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    return isinstance(batch, torch.Tensor) and not batch.is_floating_point()


def warn_few_samples(qmodel: nn.Module, ctx: Any) -> None:
    """Warn once when activation ranges were observed on fewer than ``MIN_CALIB_SAMPLES``
    inputs (a method that warned of its own needs already said so)."""
    n = ctx.num_samples
    if not ctx.batches or n >= MIN_CALIB_SAMPLES:
        return
    if DATA_KEY in ctx.extra or _token_ids(ctx.batches[0]):  # generated images: the user
        return  # chose their count (--data-free-images); sequences: ranges over every token
    if any("calibration sample" in note for note in ctx.notes):
        return
    if not any(isinstance(m, ActQuantizer) for m in qmodel.modules()):
        return
    given = f"{n} calibration sample{'' if n == 1 else 's'} {'was' if n == 1 else 'were'}"
    ctx.warn(
        f"only {given} given: activation ranges observed on so few inputs miss the values "
        f"other inputs reach; pass {MIN_CALIB_SAMPLES} or more (a few hundred is typical)."
    )
