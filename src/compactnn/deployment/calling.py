"""How a deployed model is called and what it returns: the source's ``forward`` signature
(dict examples and keyword inputs bound to positions, the input shapes checked by position
and by name, the float dtypes too), ONNX Runtime's flat outputs rebuilt into the source's
structure, the exporter's own warnings quieted, and whether the model runs input sizes other
than its example's (ONNX Runtime runs that size only)."""

from __future__ import annotations

import contextlib
import inspect
import warnings
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from compactnn.core.calib import call_model, unfilled_defaults
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
    bound = _bound(signature, args, kwargs)
    return bound.args, bound.kwargs


def _bound(signature: inspect.Signature, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    try:
        return signature.bind(*args, **kwargs)
    except TypeError as e:
        raise CompactnnError(
            f"deployed model: {e}; it takes the inputs of its source's forward{signature}."
        ) from e


def fixed_defaults(model: nn.Module, example: Any) -> dict[str, Any]:
    """``{name: default}`` of ``model.forward``'s parameters that ``example`` leaves unset:
    deploy traces (oneDNN) and exports (ONNX) them at that default, so the deployed model
    cannot take another value for them (:func:`drop_fixed` refuses one)."""
    return unfilled_defaults(model, example) or {}


def drop_fixed(
    signature: inspect.Signature, fixed: dict[str, Any], args: tuple, kwargs: dict
) -> tuple[tuple, dict]:
    """``args`` and ``kwargs`` bound to ``forward`` as :func:`bind_inputs` does, without the
    parameters deploy fixed at their default (``fixed``); passing one with a value other
    than that default raises, naming it (the deployed model would ignore the value, or
    fail inside the traced graph)."""
    bound = _bound(signature, args, kwargs)
    given = {n: v for n, v in bound.arguments.items() if n in fixed}
    bad = [n for n, v in given.items() if not _is_default(v, fixed[n])]
    if bad:
        got = ", ".join(f"{n}={given[n]!r:.40}" for n in bad)
        was = ", ".join(f"{n}={fixed[n]!r:.40}" for n in bad)
        names, them = ", ".join(bad), "them" if len(bad) > 1 else "it"
        raise CompactnnError(
            f"deployed model: got {got}, but deploy fixed {was} (the default: example= left "
            f"{them} unset): deploy again with {names} in example= (a tuple in forward's "
            f"order, or a dict naming {them})."
        )
    for n in given:
        del bound.arguments[n]
    return bound.args, bound.kwargs


def _is_default(value: Any, default: Any) -> bool:
    """Whether ``value`` is the same as a parameter's ``default`` (an equal plain value)."""
    if value is default:
        return True
    if isinstance(value, torch.Tensor) or isinstance(default, torch.Tensor):
        return False
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (value, default))
    if not numbers and type(value) is not type(default):
        return False
    try:
        return bool(value == default)
    except Exception:  # a value whose == is not a bool: not the default
        return False


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
    return _by_argument(signature, example, lambda v: tuple(v.shape))


def input_dtypes(signature: inspect.Signature | None, example: Any) -> dict[Any, torch.dtype]:
    """dtype of each floating-point tensor argument of ``example``, keyed as
    :func:`input_shapes` (integer inputs, token ids, are not checked: any width runs)."""
    found = _by_argument(signature, example, lambda v: v.dtype)
    return {k: d for k, d in found.items() if d.is_floating_point}


def _by_argument(signature: inspect.Signature | None, example: Any, read: Any) -> dict:
    """``read(tensor)`` of each tensor argument of ``example``, by position and by name."""
    given = (example,) if isinstance(example, torch.Tensor) else example
    items = given.items() if isinstance(given, dict) else enumerate(given)
    found = {k: read(v) for k, v in items if isinstance(v, torch.Tensor)}
    args = positional_example(signature, given)
    if signature is not None and isinstance(args, tuple):
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        names = [n for n, p in signature.parameters.items() if p.kind in kinds]
        for i, (name, v) in enumerate(zip(names, args, strict=False)):
            if isinstance(v, torch.Tensor):
                found[i] = found[name] = read(v)
    return found


def other_size(example: Any) -> Any:
    """The first sample of ``example`` with every size after (N, C) doubled (tiled), for
    each floating-point input of rank 3 or more; None when it has none (nothing whose size
    could change). Doubled, not grown by a few: strided layers and skip concatenations
    (a U-Net) take multiples of their total stride."""

    def grown(v: Any) -> Any:
        if not isinstance(v, torch.Tensor) or not v.is_floating_point() or v.dim() < 3:
            return v[:1] if isinstance(v, torch.Tensor) else v
        return v[:1].repeat(1, 1, *[2] * (v.dim() - 2))

    if isinstance(example, torch.Tensor):
        probe = grown(example)
    elif isinstance(example, dict):
        probe = {k: grown(v) for k, v in example.items()}
    else:
        probe = tuple(grown(v) for v in example)
    pairs = zip(pytree.tree_leaves(example), pytree.tree_leaves(probe), strict=False)
    grew = any(isinstance(a, torch.Tensor) and a.shape[2:] != b.shape[2:] for a, b in pairs)
    return probe if grew else None


def runs_other_sizes(sim: nn.Module, example: Any) -> tuple[tuple, tuple] | None:
    """The shapes of the first grown input of :func:`other_size` in ``example`` and in the
    probe when ``sim`` runs the probe (the model is not tied to its example's size: fully
    convolutional, adaptive pooling), else None. One sample, so about 2**k times one
    sample's work for k sizes doubled."""
    probe = other_size(example)
    if probe is None:
        return None
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call_model(sim, probe)
    except Exception:  # tied to its size (a flatten into a Linear layer): nothing to say
        return None
    pairs = zip(pytree.tree_leaves(example), pytree.tree_leaves(probe), strict=False)
    return next(
        (tuple(a.shape), tuple(b.shape))
        for a, b in pairs
        if isinstance(a, torch.Tensor) and a.shape[2:] != b.shape[2:]
    )


def fixed_size_note(backend: str, example_shape: tuple, ran: tuple) -> str:
    """The warning when the chosen form runs its example's size only, and the model others."""
    size = str(("N", *example_shape[1:])).replace("'", "")
    return (
        f"deploy[{backend}]: this form runs inputs of shape {size} only (the size of "
        f"example=), while the simulated model runs other sizes too (it ran {ran}): for any size, "
        "deploy with backend='onednn', or deploy once per input size."
    )
