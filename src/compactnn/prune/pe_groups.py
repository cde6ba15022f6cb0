"""PE-wise pruning's layer check: which layers the PE tile does not fit, named all at once.

A PE tile ``(G_o, G_i)`` must divide a pruned layer's output and input channels; a depthwise
convolution (one input channel per group) takes none wider than one input channel. The
engine builds one layer's wrapper at a time, so the first misfit cannot know the others:
each misfit's wrapper is a :class:`RefusedLayer` that records its layer in the run's list,
and the first use of any of them (the calibration pass, the first forward, ``start_epoch``
or freezing, whichever comes first: all wrappers exist by then) refuses them all in one
message, with the fix in the command line's, the Python API's and the recipe's words.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from compactnn.engines.qat import QATWrapper
from compactnn.errors import CompactnnError

_MISFITS = "_pe_group_misfits"  # attribute of the run's CompressContext: name -> weight shape


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


class _Refusal(nn.Module):
    """The weight quantizer of a :class:`RefusedLayer`: its epoch hook refuses too."""

    def __init__(self, owner: RefusedLayer) -> None:
        super().__init__()
        self._owner = [owner]  # not a submodule (no cycle in the module tree)

    def start_epoch(self, w: torch.Tensor, epoch: int, epochs: int) -> None:
        self._owner[0].refuse()


class RefusedLayer(QATWrapper):
    """The wrapper of a layer the PE group does not fit: any use refuses every such layer of
    the run (the names recorded so far: all of them once the model is wrapped)."""

    def __init__(self, name: str, layer: nn.Module, group: tuple[int, int], ctx) -> None:
        super().__init__()
        self.layer = layer
        self.group = tuple(group)
        self.misfits: dict[str, tuple[int, ...]] = vars(ctx).setdefault(_MISFITS, {})
        self.misfits[name] = tuple(layer.weight.shape)
        self.weight_quantizer = _Refusal(self)

    def refuse(self) -> None:
        raise CompactnnError(misfit_message(self.misfits, self.group))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.refuse()

    def freeze(self) -> nn.Module:
        self.refuse()


class GroupMisfit(nn.Module):
    """What the weight hook returns for a layer whose channels the PE group does not divide:
    the engine's ``wrapper`` call (which passes the layer's name) makes it a
    :class:`RefusedLayer`."""

    def __init__(self, group: tuple[int, int]) -> None:
        super().__init__()
        self.group = group

    def wrapper(self, name: str, layer: nn.Module, act_quantizer, ctx) -> nn.Module:
        return RefusedLayer(name, layer, self.group, ctx)
