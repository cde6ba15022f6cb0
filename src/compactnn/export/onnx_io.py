"""Inputs and outputs of a QDQ ONNX export (:func:`compactnn.export.onnx.to_onnx_bytes`).

Inputs: a tensor example is one input named ``input``; a tuple's are named after the
``forward`` parameters they fill (``input_0``, ``input_1``, ... where ``forward`` takes
``*args``); a dict's are its keys, in ``forward``'s parameter order (keys it does not name
after them), passed to the model as keywords (the TorchScript exporter traces positional
inputs only: torch 2.14's ``kwargs=`` appends the dict to the arguments, which a
``forward(*args, **kwargs)`` wrapper then loses). Outputs: one tensor is ``output``, a
dict's tensors are named by their keys (nested: ``feats.0``), a tuple's ``output_0``,
``output_1``, .... Axis 0 of every input, and of every output whose first axis is the
example's batch, is the dynamic axis ``batch``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from compactnn.core.calib import call_model

POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


@dataclass(frozen=True)
class OnnxIO:
    """How one model is exported: its positional arguments and its ONNX names."""

    args: tuple  # the tensors the exported module is traced on, in input order
    inputs: list[str]
    outputs: list[str] | None  # None: torch's own names (an output that is not a tensor)
    axes: dict[str, dict[int, str]]  # dynamic_axes of torch.onnx.export
    keywords: bool  # the model takes the inputs by name (a dict example)


class Keywords(nn.Module):
    """Calls ``model`` with its positional inputs passed by the names ``names``."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.inner, self.names = model, names

    def forward(self, *args: torch.Tensor) -> Any:
        return self.inner(**dict(zip(self.names, args, strict=True)))


def _parameters(model: nn.Module) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # a forward Python cannot describe
        return []


def input_names(model: nn.Module, example: Any) -> tuple[tuple, list[str], bool]:
    """``(args, names, keywords)`` of ``example`` for ``model`` (see the module docstring).

    Example:
        >>> class Two(nn.Module):
        ...     def forward(self, img, aux): return img + aux
        >>> x = torch.zeros(1)
        >>> input_names(Two(), (x, x))[1], input_names(Two(), {"aux": x, "img": x})[1:]
        (['img', 'aux'], (['img', 'aux'], True))
    """
    if isinstance(example, torch.Tensor):
        return (example,), ["input"], False
    params = _parameters(model)
    if isinstance(example, dict):
        named = [p.name for p in params if p.name in example]
        order = named + [k for k in example if k not in named]
        return tuple(example[k] for k in order), order, True
    args = tuple(example)
    leading = []
    for p in params:
        if p.kind not in POSITIONAL:
            break
        leading.append(p.name)
    if len(leading) >= len(args):
        return args, leading[: len(args)], False
    return args, [f"input_{i}" for i in range(len(args))], False


def _key(entry: Any) -> str:
    for attr in ("key", "idx", "name"):  # MappingKey, SequenceKey, GetAttrKey
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def output_names(output: Any, taken: list[str]) -> list[str] | None:
    """Names of the tensors of ``output`` in the order ONNX flattens them; None when a leaf
    is not a tensor, or a name would repeat or take an input's (``taken``).

    Example:
        >>> t = torch.zeros(1)
        >>> output_names(t, []), output_names((t, t), []), output_names({"logits": t}, [])
        (['output'], ['output_0', 'output_1'], ['logits'])
    """
    if isinstance(output, torch.Tensor):
        return ["output"]
    paths, _ = pytree.tree_flatten_with_path(output)
    names = []
    for path, leaf in paths:
        if not isinstance(leaf, torch.Tensor) or not path:
            return None
        parts = [_key(k) for k in path]
        if isinstance(path[0], pytree.SequenceKey):
            parts[0] = f"output_{parts[0]}"
        names.append(".".join(parts))
    if len(set(names)) < len(names) or set(names) & set(taken):
        return [f"output_{i}" for i in range(len(names))]
    return names


def onnx_io(model: nn.Module, example: Any, source: nn.Module) -> OnnxIO:
    """Arguments and ONNX names to export ``model`` (the QDQ form of ``source``, whose
    ``forward`` names the inputs) traced on ``example``; runs ``model`` once."""
    args, inputs, keywords = input_names(source, example)
    with torch.no_grad():
        output = call_model(model, example)
    outputs = output_names(output, inputs)
    axes = {n: {0: "batch"} for n, a in zip(inputs, args, strict=True) if _batched(a)}
    batch = next((a.shape[0] for a in args if _batched(a)), None)
    if outputs is not None and batch is not None:
        leaves = pytree.tree_leaves(output)
        for name, leaf in zip(outputs, leaves, strict=True):
            if leaf.dim() >= 1 and leaf.shape[0] == batch:
                axes[name] = {0: "batch"}
    return OnnxIO(args, inputs, outputs, axes, keywords)


def _batched(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() >= 1
