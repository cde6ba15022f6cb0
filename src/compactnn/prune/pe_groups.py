"""PE-wise pruning's layer check: which layers the PE tile does not fit, named all at once.

A PE tile ``(G_o, G_i)`` must divide a pruned layer's output and input channels; a depthwise
convolution (one input channel per group) takes none wider than one input channel. The
engine calls :func:`check_pe_layers` with every layer before it wraps any, so all misfits
are refused in one message, with the fix in the command line's, the Python API's and the
recipe's words.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from compactnn.errors import CompactnnError


def group_fits(weight: torch.Tensor, group: tuple[int, int]) -> bool:
    """Whether the PE tile ``group`` divides ``weight``'s output and input channels."""
    return weight.shape[0] % group[0] == 0 and weight.shape[1] % group[1] == 0


def _shape_words(shape: tuple[int, ...]) -> str:
    return f"weight shape {shape} has {shape[0]} output and {shape[1]} input channels"


def _fix(names: list[str]) -> str:
    """Leave ``names`` in float: CLI flags, ``ignore=[...]``, or the step's targets."""
    flags = " ".join(f"--ignore {n}" for n in names)
    listed = ", ".join(json.dumps(n) for n in names)
    return (
        f"{flags} (compactnn compress/train), ignore={names!r} (compress/train in Python) "
        f"or the step's targets: {{ignore: [{listed}]}}"
    )


def misfit_message(shapes: dict[str, tuple[int, ...]], group: tuple[int, int]) -> str:
    """The refusal of every layer in ``shapes`` (name -> weight shape) that ``group`` does
    not fit, with both fixes.

    Example:
        >>> misfit_message({"dw": (16, 1, 3, 3)}, (1, 8))[:60]
        "layer 'dw' with weight shape (16, 1, 3, 3) has 16 output and"
    """
    names = list(shapes)
    if len(names) == 1:
        (name, shape), them = next(iter(shapes.items())), "it"
        head = f"layer {name!r} with {_shape_words(shape)}; the PE group {group} must divide both"
    else:
        them = "them"
        each = "; ".join(f"{n!r}: {_shape_words(s)}" for n, s in shapes.items())
        head = (
            f"{len(names)} layers have channels the PE group {group} does not divide (it must "
            f"divide the output and input channels of each): {each}"
        )
    return f"{head}. Pick a group that divides {them}, or leave {them} in float: {_fix(names)}."


def check_group(weight: torch.Tensor, group: tuple[int, int], name: str | None = None) -> None:
    """Raise ``CompactnnError`` unless the PE tile ``group`` divides ``weight``'s channels;
    the message names the layer ``name`` when given."""
    if group_fits(weight, group):
        return
    shape = tuple(weight.shape)
    if name is not None:
        raise CompactnnError(misfit_message({name: shape}, tuple(group)))
    raise CompactnnError(
        f"a layer with {_shape_words(shape)}; the PE group {tuple(group)} must divide both. "
        "Pick a group that does, or leave that layer in float (--ignore NAME, "
        "compress(ignore=[...]) or the step's targets.ignore)."
    )


def check_pe_layers(layers: dict[str, nn.Module], config) -> None:
    """The engine's ``check_layers`` hook: refuse every layer of ``layers`` whose channels
    ``config.group`` does not divide, in one message (:func:`misfit_message`)."""
    group = tuple(config.group)
    misfits = {
        n: tuple(m.weight.shape) for n, m in layers.items() if not group_fits(m.weight, group)
    }
    if misfits:
        raise CompactnnError(misfit_message(misfits, group))
