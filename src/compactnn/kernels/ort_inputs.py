"""The keyword inputs of a model on ONNX Runtime (:mod:`compactnn.kernels.ort_nbits`).

An exported graph takes the inputs it was traced with, and only those its output uses (a
``labels`` key the traced logits ignore is not an input). ONNX Runtime refuses a missing input
or another dtype with its own error, and a caller's key the graph does not take would simply
not be fed: ``token_type_ids=1`` to a BERT traced without it would return the
``token_type_ids=0`` result. So every key is checked against the graph's inputs: an unknown
key or a missing input is refused by name, integer ids of another integer dtype (int32, bool
masks) are cast to int64 (exact), float ids are refused.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compactnn.errors import CompactnnError

# ONNX Runtime's input type names -> torch dtypes (those an exported transformer takes)
ORT_DTYPES = {
    "tensor(int64)": torch.int64,
    "tensor(int32)": torch.int32,
    "tensor(float)": torch.float32,
    "tensor(bool)": torch.bool,
}


def _takes(names: list[str]) -> str:
    return ", ".join(names) if names else "no inputs"


def graph_feed(
    kwargs: dict[str, Any], inputs: dict[str, str], who: str = "OrtNBitsModel"
) -> dict[str, Any]:
    """The ONNX Runtime feed of a keyword call: ``inputs`` ``{name: ORT type}`` in graph order.

    Raises:
        CompactnnError: a key the graph does not take, a missing graph input, or a value whose
            dtype cannot be cast exactly (float ids to an integer input)."""
    names = list(inputs)
    unknown = [k for k, v in kwargs.items() if k not in inputs and v is not None]
    if unknown:
        raise CompactnnError(
            f"{who}: input {', '.join(map(repr, unknown))} is not an input of this ONNX model "
            f"(it takes {_takes(names)}; it was exported without it): export it again with "
            "that key in example, or leave it out"
        )
    missing = [n for n in names if kwargs.get(n) is None]
    if missing:
        raise CompactnnError(
            f"{who}: missing input {', '.join(map(repr, missing))} (the model takes "
            f"{_takes(names)}): pass every one of them"
        )
    feed = {}
    for name, kind in inputs.items():
        value = torch.as_tensor(kwargs[name]).detach().cpu()
        want = ORT_DTYPES.get(kind)
        if want is None or value.dtype == want:
            feed[name] = value.numpy()
            continue
        if want.is_floating_point:  # float16 / bfloat16 widen exactly, float64 would round
            exact = value.dtype in (torch.float16, torch.bfloat16)
        else:
            exact = not (value.is_floating_point() or value.is_complex())
        if not exact:
            raise CompactnnError(
                f"{who}: input {name!r} is {value.dtype}, the model takes {kind[7:-1]}: pass "
                f"{'float32 values' if want.is_floating_point else 'integer ids'}"
            )
        feed[name] = value.to(want).numpy()
    return feed


def check_example_keys(
    model: nn.Module, example: dict[str, Any], who: str = "to_ort_nbits"
) -> None:
    """Refuse a key of ``example`` that ``model.forward`` cannot take (no ``**kwargs``);
    ``who`` starts the message (the caller's name)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = [k for k in example if k not in params]
    if unknown:
        raise CompactnnError(
            f"{who}: example key {', '.join(map(repr, unknown))} is not an argument of "
            f"{type(model).__name__}.forward ({_takes(list(params))}): leave it out of example"
        )


def check_graph_inputs(graph: Any, example: dict[str, Any], who: str = "to_ort_nbits") -> None:
    """Refuse a key of ``example`` the exported ``graph`` does not take (its output does not
    use it, e.g. ``labels``): the model would refuse it at every call. ``who`` starts the
    message."""
    inits = {i.name for i in graph.initializer}
    names = [i.name for i in graph.input if i.name not in inits]
    unused = [k for k in example if k not in names]
    if unused:
        raise CompactnnError(
            f"{who}: example key {', '.join(map(repr, unused))} is not used by the "
            f"traced output (the exported model takes {_takes(names)}): leave it out of example"
        )


def refuse_existing(path: str | os.PathLike, force: bool) -> None:
    """Refuse to replace an existing model file or its ``.data`` unless ``force``."""
    path = Path(path)
    if path.is_dir():
        raise CompactnnError(
            f"path {path} is a folder; give the model file's name, e.g. {path / 'model.onnx'}"
        )
    data = path.with_name(path.name + ".data")
    there = next((p for p in (path, data) if p.exists() or p.is_symlink()), None)
    if there is not None and not force:
        raise CompactnnError(
            f"to_ort_nbits: {there} already exists; pass force=True to replace it, or another path"
        )
