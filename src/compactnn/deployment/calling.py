"""How a deployed model is called and what it returns: the source's ``forward`` signature
(dict examples and keyword inputs bound to positions, the input shapes checked by position
and by name), ONNX Runtime's flat outputs rebuilt into the source's structure, and the
exporter's own warnings quieted."""

from __future__ import annotations

import contextlib
import inspect
import warnings
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from compactnn.core.calib import call_model
from compactnn.errors import CompactnnError


@contextlib.contextmanager
def quiet_shape_checks():
    """Silence the TracerWarnings raised inside ``torch.nn.functional`` and torch's recurrent
    layers while the ONNX exporter traces: their own shape checks (group_norm's batch-size
    check reads a size as a bool; LSTM/GRU read their batch sizes) say nothing about the model
    or the trace, nor does the exporter's note that an RNN traced at a batch other than 1 may
    not run at other batches (the file is verified; a GRU traced at batch 8 ran at batch 364,
    equal to the simulation). TracerWarnings
    from the model's own code still show."""
    with warnings.catch_warnings():
        for module in (r"torch\.nn\.functional", r"torch\.nn\.modules\.rnn"):
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=module)
        rnn_batch = "Exporting a model to ONNX with a batch_size other than 1"
        warnings.filterwarnings("ignore", rnn_batch)
        yield


def structured_outputs(run: Any, sim: nn.Module, example: Any) -> Any:
    """``run`` (an ONNX Runtime session: a tensor, or a tuple of its outputs in graph order)
    returning what ``sim`` returns on ``example``: a dict stays a dict with its keys, a
    nested structure its nesting. ONNX flattens outputs in the same (insertion) order."""
    with torch.no_grad():
        leaves, spec = pytree.tree_flatten(call_model(sim, example))
    if len(leaves) <= 1 or (spec.type is tuple and all(c.is_leaf() for c in spec.children())):
        return run  # one tensor or a flat tuple: what the session returns already

    def structured(*args: Any, **kwargs: Any) -> Any:
        return pytree.tree_unflatten(list(run(*args, **kwargs)), spec)

    return structured


def forward_signature(model: nn.Module) -> inspect.Signature | None:
    """The parameters of ``model.forward`` (None when Python cannot tell them)."""
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


def bind_inputs(signature: inspect.Signature, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``args`` and ``kwargs`` as ``forward`` takes them, keyword inputs moved to their
    positions (those after a missing one, and keyword-only ones, stay keywords)."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as e:
        raise CompactnnError(
            f"deployed model: {e}; it takes the inputs of its source's forward{signature}."
        ) from e
    return bound.args, bound.kwargs


def positional_example(signature: inspect.Signature | None, example: Any) -> Any:
    """A dict ``example`` as the tuple of forward's leading parameters it names (what ONNX
    Runtime, which feeds inputs by position, is exported from); any other example, or a
    dict that names others (after a missing one, keyword-only), as it is."""
    if not isinstance(example, dict) or signature is None:
        return example
    try:
        args, kwargs = bind_inputs(signature, (), example)
    except CompactnnError:
        return example
    return example if kwargs else args


def input_shapes(signature: inspect.Signature | None, example: Any) -> dict[Any, tuple]:
    """Shape of each tensor argument of ``example``, by position and by forward's name for
    it (a deployed model may be called either way)."""
    given = (example,) if isinstance(example, torch.Tensor) else example
    items = given.items() if isinstance(given, dict) else enumerate(given)
    shapes = {k: tuple(v.shape) for k, v in items if isinstance(v, torch.Tensor)}
    args = positional_example(signature, given)
    if signature is not None and isinstance(args, tuple):
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        names = [n for n, p in signature.parameters.items() if p.kind in kinds]
        for i, (name, v) in enumerate(zip(names, args, strict=False)):
            if isinstance(v, torch.Tensor):
                shapes[i] = shapes[name] = tuple(v.shape)
    return shapes
