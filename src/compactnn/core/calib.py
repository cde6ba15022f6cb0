"""Calibration data: normalise what the user passes, and run it through a model."""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from compactnn.core.input_dtypes import (
    IntegerInput,
    integer_hooks,
    integer_input_refusal,
    integer_message,
    label_key_hint,
)
from compactnn.core.input_size import size_hint
from compactnn.core.tokens import check_masked_out, check_positions, check_token_ids
from compactnn.errors import CompactnnError

Batch = torch.Tensor | tuple | dict


def _split_keywords(data: dict[str, Any], batch_size: int) -> list[Batch]:
    """Keyword inputs in chunks of ``batch_size`` rows when every value is a tensor with the
    same number of rows (a file of 1,000 tokenized sentences is not one forward pass), else
    the dict as one batch."""
    rows = {v.shape[0] if isinstance(v, torch.Tensor) and v.dim() else None for v in data.values()}
    if len(rows) != 1 or None in rows or next(iter(rows)) <= batch_size:
        return [data]
    n = next(iter(rows))
    return [{k: v[i : i + batch_size] for k, v in data.items()} for i in range(0, n, batch_size)]


def as_batches(data: Any, batch_size: int = 32, what: str = "calib_data") -> list[Batch]:
    """Normalise calibration data into a list of batches.

    Accepts a tensor of inputs (split along dim 0 into ``batch_size`` chunks), a dict of
    tensors (keyword inputs, e.g. a tokenizer's output: split the same way when every value
    is a tensor with the same number of rows, else one batch), or an iterable of tensors,
    tuples or dicts (taken as they are). Every floating-point tensor is checked once for NaN
    and Inf (see :func:`check_finite`), and every ``attention_mask`` for one with no token
    unmasked (:func:`~compactnn.core.tokens.check_masked_out`). ``what`` names the data in
    messages by its role (``"--data eval.npy"``; calibration data by default).

    Example:
        >>> ids = {"input_ids": torch.zeros(70, 5, dtype=torch.long),
        ...        "attention_mask": torch.ones(70, 5, dtype=torch.long)}
        >>> [b["input_ids"].shape[0] for b in as_batches(ids)]
        [32, 32, 6]
    """
    if data is None:
        return []
    if isinstance(data, torch.Tensor):
        if data.dim() == 0:
            raise CompactnnError(
                f"{what} is a scalar (a 0-d tensor), not a batch of inputs: pass inputs with "
                "the batch dimension first, shape (N, ...), e.g. x.reshape(1, -1) for one."
            )
        if data.shape[0] == 0:
            raise CompactnnError(
                f"{what} is empty (a tensor of shape {tuple(data.shape)}): pass at least one input."
            )
        batches: list[Batch] = list(torch.split(data, batch_size))
    elif isinstance(data, Mapping):
        batches = _split_keywords(dict(data), batch_size)
    elif isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise CompactnnError(
            f"calib_data must be a tensor or an iterable of tensors, tuples or dicts; "
            f"got {type(data).__name__}."
        )
    elif _is_numpy(data):
        raise CompactnnError(
            f"calib_data is a numpy {type(data).__name__}; pass a tensor: "
            "calib_data=torch.from_numpy(array)."
        )
    else:
        batches = [_one_batch(i, b) for i, b in enumerate(data)]
    if not batches:
        raise CompactnnError("calib_data is empty: pass at least one batch.")
    kind = "calibration batch" if what == "calib_data" else "batch"
    for i, b in enumerate(batches):
        rows = "" if what == "calib_data" else f" of {what}"
        if isinstance(data, torch.Tensor):  # name the rows of the user's tensor too
            rows = f" (rows {i * batch_size}..{i * batch_size + len(b) - 1} of {what})"
        check_finite(b, f"{kind} {i}{rows}")
    check_masked_out(batches, kind, "" if what == "calib_data" else f" of {what}")
    return batches


def _one_batch(i: int, b: Any) -> Batch:
    if isinstance(b, list):
        b = tuple(b)
    if _is_numpy(b):
        raise CompactnnError(
            f"calibration batch {i} is a numpy {type(b).__name__}; expected a tensor: "
            "convert each batch with torch.from_numpy(array) (numpy's float64 is cast to "
            "the model's dtype)."
        )
    if not isinstance(b, (torch.Tensor, tuple, Mapping)):
        raise CompactnnError(
            f"calibration batch {i} is a {type(b).__name__}; expected a tensor, a tuple "
            "or a dict of tensors."
        )
    return dict(b) if isinstance(b, Mapping) else b


def _is_numpy(value: Any) -> bool:
    """Whether ``value`` is a numpy array (without importing numpy)."""
    return type(value).__module__ == "numpy" and hasattr(value, "dtype")


def _tensors_of(batch: Batch) -> list[tuple[str, torch.Tensor]]:
    """``(label, tensor)`` of every tensor in a batch, nested ones too: ``""``, ``"[1]"``,
    ``"['ids']"`` or ``"[0]['image']"`` (a dict passed as one positional argument)."""
    if isinstance(batch, torch.Tensor):
        return [("", batch)]
    if not isinstance(batch, (dict, tuple, list)):
        return []
    items = batch.items() if isinstance(batch, dict) else enumerate(batch)
    return [(f"[{k!r}]{label}", t) for k, v in items for label, t in _tensors_of(v)]


def to_dtype(batch: Batch, dtype: torch.dtype) -> Batch:
    """``batch`` with its floating-point tensors (nested ones too) cast to ``dtype``; integer
    tensors (token ids, labels) and everything else unchanged.

    Example:
        >>> to_dtype({"x": torch.ones(2, dtype=torch.float64)}, torch.float32)["x"].dtype
        torch.float32
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if batch.is_floating_point() and batch.dtype != dtype else batch
    if isinstance(batch, dict):
        return {k: to_dtype(v, dtype) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_dtype(v, dtype) for v in batch)
    return batch


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter (None when it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of the floating-point tensor ``t`` is finite (no NaN, no Inf).

    Exact, and about 10x cheaper than ``torch.isfinite(t).all()`` on the common path: any
    NaN or Inf makes the sum NaN or Inf, so a finite sum proves the tensor finite; only a
    non-finite sum (a real NaN/Inf, or large finite values whose sum overflows) pays for the
    element-wise check. The deployed model runs it on every input (29 -> 2.5 us for a
    16x1x28x28 batch, 28 -> 0.5 ms for 64x3x224x224, 2 threads).

    Example:
        >>> all_finite(torch.tensor([3e38, 3e38]))  # the sum overflows; still finite
        True
    """
    if math.isfinite(t.sum().item()):
        return True
    return bool(torch.isfinite(t).all())


def check_finite(batch: Batch, what: str) -> None:
    """Raise when a floating-point tensor of ``batch`` holds NaN or Inf.

    One NaN in calibration data spreads through every range it touches and silently gives
    an all-NaN model, so it is refused where it enters. Costs one sum per tensor
    (:func:`all_finite`).

    Example:
        >>> check_finite(torch.ones(2, 3), "calibration batch 0")  # finite: returns None
    """
    for label, t in _tensors_of(batch):
        if not t.is_floating_point() or all_finite(t):
            continue
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        first = tuple(int(i) for i in (~torch.isfinite(t)).nonzero()[0])
        raise CompactnnError(
            f"{what}{label} holds {nan} NaN and {inf} Inf value(s) (first at index {first} "
            f"of shape {tuple(t.shape)}); clean the data (e.g. torch.nan_to_num) or drop "
            "those samples."
        )


def check_example(example: Any, what: str = "example") -> None:
    """Raise unless ``example`` is a non-empty, finite batch (tensor, tuple or dict).

    A list is refused, not read as a tuple: ``example=[x]`` reached forward as one list
    argument and failed inside the model ("unsupported operand type(s) for /: 'list'").
    """
    if isinstance(example, list):
        raise CompactnnError(
            f"{what}= is {input_spec(example)}: pass a tensor, a tuple of tensors "
            f"(forward's positional inputs, e.g. tuple({what})) or a dict of named tensors "
            f"(its keyword inputs); a forward that takes a list gets it as ({what},)."
        )
    if not isinstance(example, (torch.Tensor, tuple, dict)):
        raise CompactnnError(
            f"{what}= must be a tensor, a tuple or a dict of tensors, got {type(example).__name__}."
        )
    tensors = _tensors_of(example)
    if not tensors or any(t.dim() == 0 or t.shape[0] == 0 for _, t in tensors):
        raise CompactnnError(
            f"{what}= is empty ({describe(example)}): pass a sample batch of at least one "
            "input the model takes (e.g. a few calibration inputs)."
        )
    check_finite(example, f"{what}=")


def all_zero(batches: list[Batch]) -> bool:
    """Whether every floating-point value of every batch is zero (and there is one)."""
    floats = [t for b in batches for _, t in _tensors_of(b) if t.is_floating_point()]
    return bool(floats) and all(not bool(t.any()) for t in floats)


def batch_size_of(batch: Batch) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch[0]
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1


def call_model(model: nn.Module, batch: Batch, mode: str = "auto") -> Any:
    """Run ``model`` on ``batch``: a tensor positionally, a dict as keywords, a tuple as
    positional arguments (``mode="first"`` passes only its first element: ``(x, y)`` pairs)."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, tuple):
        return model(batch[0]) if mode == "first" else model(*batch)
    return model(batch)


def detect_call_mode(model: nn.Module, batch: Batch) -> str:
    """``"first"`` when a tuple batch is an ``(inputs, labels)`` pair the model cannot take."""
    if not isinstance(batch, tuple) or len(batch) < 2:
        return "auto"
    try:
        with torch.no_grad():
            model(*batch)
        return "auto"
    except TypeError:
        return "first"
    except RuntimeError:
        return "first"


def expected_input_hint(model: nn.Module) -> str:
    """A human description of the input the first weight layer expects."""
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            dims = "(N, C, L)" if isinstance(m, nn.Conv1d) else "(N, C, H, W)"
            return f"{dims} with C={m.in_channels} (first layer {name!r})"
        if isinstance(m, nn.Linear):
            return f"(..., {m.in_features}) (first layer {name!r})"
        if isinstance(m, nn.Embedding):
            return f"integer token ids < {m.num_embeddings} (first layer {name!r})"
    return "whatever the model's forward takes"


def describe(batch: Batch) -> str:
    """A short description of a batch: its kind and tensor shapes."""
    if isinstance(batch, torch.Tensor):
        return f"a tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, dict):
        return "a dict with " + ", ".join(
            f"{k}: {tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}"
            for k, v in batch.items()
        )
    return "a tuple of " + ", ".join(
        str(tuple(v.shape))
        if isinstance(v, torch.Tensor)
        else f"({describe(v)})"
        if isinstance(v, (dict, tuple))
        else type(v).__name__
        for v in batch
    )


def check_batch(model: nn.Module, batch: Batch, mode: str) -> None:
    """Run one batch; turn a shape/type failure into an error that names the expected input
    (for a Hugging Face language model, token ids out of its vocabulary or sequences longer
    than it takes are named as such, and so are sequences longer than its position table
    even where it runs on them: :func:`check_positions`)."""
    check_positions(model, batch)
    tensors = _inputs_of(batch, mode)  # uint8 pixels reaching a conv: named with the cast
    try:
        with torch.no_grad(), integer_hooks(model, tensors):
            call_model(model, batch, mode)
    except IntegerInput as stop:
        raise CompactnnError(integer_message(model, tensors, stop, "calibration batch 0")) from None
    except Exception as exc:
        check_token_ids(model, batch, "calib_data", resave=False)  # the exact cause, if it is
        if (mismatch := missing_main_input(model, batch)) is not None:
            raise CompactnnError(
                f"the calibration data does not fit the model: {mismatch}"
            ) from exc
        raise CompactnnError(
            f"the model could not run on the calibration data ({describe(batch)}): {exc}. "
            f"{batch_hint(model, batch)}"
        ) from exc


def refuse_integer_inputs(model: nn.Module, batch: Batch, what: str, mode: str = "auto") -> None:
    """Raise when integer values of ``batch`` (``uint8`` pixels, ``int64`` values) reach a
    linear or convolution layer of ``model`` as they are, naming the cast
    (:func:`~compactnn.core.input_dtypes.integer_input_refusal`; one forward, only for a
    batch that holds an integer tensor). Labels left out by ``mode="first"`` pass."""
    tensors = _inputs_of(batch, mode)
    if why := integer_input_refusal(model, tensors, lambda: call_model(model, batch, mode), what):
        raise CompactnnError(why)


def _inputs_of(batch: Batch, mode: str) -> list[tuple[str, torch.Tensor]]:
    """The tensors of ``batch`` the model gets (not the labels ``mode="first"`` leaves out)."""
    return _tensors_of(batch[0] if mode == "first" and isinstance(batch, tuple) else batch)


def missing_main_input(model: nn.Module, batch: Batch) -> str | None:
    """Why a dict ``batch`` cannot feed a Hugging Face model: it lacks the model's main input
    (``main_input_name``: ``pixel_values`` for a ViT, ``input_ids`` for BERT). None otherwise.

    Example:
        >>> vit = type("ViT", (nn.Module,), {"main_input_name": "pixel_values"})()
        >>> missing_main_input(vit, {"input_ids": torch.zeros(1, 3)})[:43]
        "it holds input_ids but ViT's main input is "
    """
    name = getattr(model, "main_input_name", None)
    if not isinstance(batch, dict) or not isinstance(name, str) or name in batch:
        return None
    held = ", ".join(sorted(map(str, batch))) or "no tensors"
    return (
        f"it holds {held} but {type(model).__name__}'s main input is {name!r}: save the "
        f"inputs under {name} (or as the file's only tensor), made for this model."
    )


def batch_hint(model: nn.Module, batch: Batch) -> str:
    """What the model expects (with the image size it takes, when the batch's size is the
    fault: :func:`size_hint`), and for a dict batch how it was passed (as keywords)."""
    if isinstance(batch, dict) and (labels := label_key_hint(model, batch)) is not None:
        return labels
    if isinstance(batch, dict):
        return (
            "A dict batch is passed as keyword arguments (forward(**batch)); if forward takes "
            "the dict as one argument, wrap each batch as a 1-tuple: calib_data=[(batch,)] "
            "(and example=(batch,) for deploy)."
        )
    if (size := size_hint(model, batch)) is not None:
        return f"Expected input: {size}."
    return f"Expected input: {expected_input_hint(model)}."


def main_output(out: Any) -> torch.Tensor:
    """The tensor to compare in a model's output: logits, last hidden state, or the first.

    ``logits`` / ``last_hidden_state`` are found as attributes (a Hugging Face output) or as
    keys of a plain dict, whatever the dict's order.

    Example:
        >>> main_output({"feat": torch.zeros(1), "logits": torch.ones(1)}).tolist()
        [1.0]
    """
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if value is None and isinstance(out, Mapping):
            value = out.get(key)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (list, tuple)) and out:
        return main_output(out[0])
    raise TypeError(f"cannot find a tensor in a model output of type {type(out).__name__}")


def expected_inputs(model: nn.Module, example: Any, batch: Any = None) -> str:
    """What ``model`` takes: its example input with any number of rows, else its parameters'
    dtype and what its first weight layer takes (:func:`expected_input_hint`), with the image
    size when ``batch`` (the inputs it refused) has the wrong one (:func:`size_hint`)."""
    if isinstance(example, torch.Tensor):
        return f"{input_spec(example, rows=True)}, like its example input {tuple(example.shape)}"
    if example is not None:
        return f"{input_spec(example, rows=True)}, like its example input"
    hint = expected_input_hint(model)
    if batch is not None and (size := size_hint(model, batch)) is not None:
        hint = size
    if not hint.startswith("("):  # token ids, or a model without weight layers
        return hint
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    dtype = str(dtype).removeprefix("torch.")
    return f"{dtype} values of shape {hint}"


def input_spec(batch: Any, rows: bool = False) -> str:
    """The dtypes and shapes of a batch; ``rows``: any number N of rows (and L of token ids).

    Example:
        >>> input_spec(torch.zeros(64, 1, 28, 28), rows=True)
        'float32 values of shape (N, 1, 28, 28)'
    """
    if isinstance(batch, dict):
        return "keywords " + ", ".join(f"{k}={input_spec(v, rows)}" for k, v in batch.items())
    if isinstance(batch, (tuple, list)):
        kind, ends = ("a tuple", "()") if isinstance(batch, tuple) else ("a list", "[]")
        return f"{kind} {ends[0]}" + ", ".join(input_spec(v, rows) for v in batch) + ends[1]
    if not isinstance(batch, torch.Tensor):
        return type(batch).__name__
    dims = [str(d) for d in batch.shape]
    if rows and dims:
        dims[0] = "N"
        if len(dims) > 1 and not batch.is_floating_point():
            dims[1] = "L"  # token ids: any sequence length
    shape = f"({dims[0]},)" if len(dims) == 1 else f"({', '.join(dims)})"
    return f"{str(batch.dtype).removeprefix('torch.')} values of shape {shape}"


def unfilled_defaults(model: nn.Module, example: Any) -> dict[str, Any] | None:
    """``{name: default}`` of ``model.forward``'s parameters that have a default and that
    ``example`` (a tensor, a tuple of positional inputs or a dict of keyword inputs) leaves
    unset; None without an example.

    Example:
        >>> class Net(nn.Module):
        ...     def forward(self, x, scale=None, mode="a"): return x
        >>> unfilled_defaults(Net(), torch.zeros(1)), unfilled_defaults(Net(), {"mode": 1})
        ({'scale': None, 'mode': 'a'}, {'scale': None})
    """
    if example is None:
        return None
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # a forward Python cannot describe
        return None
    if isinstance(example, dict):
        given = set(example)
    else:
        given = {p.name for p in params[: 1 if isinstance(example, torch.Tensor) else len(example)]}
    return {
        p.name: p.default
        for p in params
        if p.default is not inspect.Parameter.empty
        and p.name not in given
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    } or None
