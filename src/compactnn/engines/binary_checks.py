"""Which layers a binary block (1-bit activations) cannot wrap, named all at once.

Kept apart from :mod:`compactnn.engines.binary` (which imports the QAT engine) so that the
engine's ``wrap_layers`` can check every 1-bit-activation target before wrapping any: a model
with several unsupported layers gets one message naming them all, not one per attempt.
"""

from __future__ import annotations

from torch import nn

from compactnn.errors import CompactnnError


def binary_layer_problem(name: str, layer: nn.Module) -> tuple[str, str] | None:
    """Why ``layer`` cannot take 1-bit activations, as ``(what, why)``: ``what`` names it,
    layers of one ``why`` share it in a message. None when a binary block wraps it."""
    if isinstance(layer, nn.Conv2d):
        if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
            padding = f"({layer.padding!r}, {layer.padding_mode})"
            return f"{name!r} (padding {padding})", "the padding must be explicit zeros"
        return None
    if type(layer) is not nn.Linear:
        return f"{name!r} ({type(layer).__name__})", "binary blocks wrap Conv2d and Linear layers"
    return None


def check_binary_layers(layers: dict[str, nn.Module]) -> None:
    """Refuse, in one message, every layer of ``layers`` (name -> layer) that a binary block
    cannot wrap, with why, and how to leave them all in float.

    Example:
        >>> check_binary_layers({"c1": nn.Conv2d(1, 2, 3), "fc": nn.Linear(2, 2)})  # fine
    """
    groups: dict[str, list[str]] = {}
    names = []
    for name, layer in layers.items():
        if (problem := binary_layer_problem(name, layer)) is not None:
            groups.setdefault(problem[1], []).append(problem[0])
            names.append(name)
    if not names:
        return
    one = len(names) == 1
    if one:  # "layer 'c2' (Conv1d) cannot take 1-bit activations: binary blocks wrap ..."
        why, (what,) = next(iter(groups.items()))
        head = f"layer {what} cannot take 1-bit activations: {why}"
    else:
        whats = "; ".join(f"{', '.join(w)}: {why}" for why, w in groups.items())
        head = f"{len(names)} layers cannot take 1-bit activations: {whats}"
    them, their = ("it", "its") if one else ("them", "their")
    # `compactnn train` rewrites "ignore=[...] (compress/train)" as its --ignore NAME flags
    raise CompactnnError(
        f"{head}. Leave {them} in float: ignore={names!r} (compress/train) or the step's "
        f"targets.ignore; or keep {their} activations at 8 bits."
    )
