"""Weights made outside compactnn, brought into ``nn`` layers.

:func:`lift_weight_layers` turns the functional ``aten.linear`` / ``aten.conv*d`` calls of a
``torch.export`` graph back into ``nn.Linear`` / ``nn.Conv*d`` submodules (so quantization
can swap them like any layer); :func:`weights_misfit` and :func:`misfit_line` say in one line
how a file's tensors fail to fit a model's state dict.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def weights_misfit(
    expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], examples: int = 3
) -> str:
    """One short line on how ``given`` tensors differ from a model's state dict ("" if none).

    Counts the missing, unexpected and shape-mismatched keys and names at most ``examples``
    of each, so a wrong file gives a readable error rather than a dump of every key.

    Example:
        >>> weights_misfit({"w": torch.zeros(2), "b": torch.zeros(1)}, {"w": torch.zeros(3)})
        "1 missing (e.g. 'b'), 1 with another shape (e.g. 'w' file (3,) vs model (2,))"
    """
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [
        f"{k!r} file {tuple(given[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in given and tuple(given[k].shape) != tuple(v.shape)
    ]
    return misfit_line([repr(k) for k in missing], [repr(k) for k in unexpected], shapes, examples)


def misfit_line(
    missing: list[str], unexpected: list[str], shapes: list[str], examples: int = 3
) -> str:
    """Counts of missing, unexpected and reshaped keys, ``examples`` of each named."""
    parts = []
    for label, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("with another shape", shapes),
    ):
        if items:
            more = ", ..." if len(items) > examples else ""
            parts.append(f"{len(items)} {label} (e.g. {', '.join(items[:examples])}{more})")
    return ", ".join(parts)


_FX_LAYERS = {
    torch.ops.aten.linear.default: "linear",
    torch.ops.aten.conv1d.default: "conv1d",
    torch.ops.aten.conv2d.default: "conv2d",
}


def lift_weight_layers(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Turn the functional ``aten.linear``/``aten.conv*d`` calls of an exported graph back into
    ``nn.Linear``/``nn.Conv*d`` submodules, so quantization can swap them like any layer.

    Only calls whose weight (and bias) are constants of the graph are lifted; the new module
    takes the name of the module that owned the weight (``encoder.0.weight`` -> ``encoder.0``).
    """
    graph = gm.graph
    for node in list(graph.nodes):
        kind = _FX_LAYERS.get(node.target) if node.op == "call_function" else None
        if kind is None:
            continue
        args = list(node.args) + [None] * (3 - len(node.args))
        x, w_node, b_node, rest = args[0], args[1], args[2], args[3:]
        if getattr(w_node, "op", None) != "get_attr" or (
            b_node is not None and getattr(b_node, "op", None) != "get_attr"
        ):
            continue
        weight = _attr(gm, w_node.target)
        bias = _attr(gm, b_node.target) if b_node is not None else None
        layer = _layer_from(kind, weight, bias, rest)
        owner = w_node.target.rpartition(".")[0] or w_node.target
        name = owner.replace(".", "_") + "_lifted"
        gm.add_submodule(name, layer)
        with graph.inserting_before(node):
            new = graph.call_module(name, (x,))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    # A plain GraphModule: the one torch.export returns refuses .eval()/.train().
    plain = torch.fx.GraphModule(gm, graph)
    plain.delete_all_unused_submodules()
    plain.recompile()
    return plain


def _attr(gm: nn.Module, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _layer_from(
    kind: str, weight: torch.Tensor, bias: torch.Tensor | None, rest: list
) -> nn.Module:
    """An nn layer holding ``weight``/``bias`` with the conv geometry given in ``rest``."""
    has_bias = bias is not None
    if kind == "linear":
        layer: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias)
    else:
        stride, padding, dilation, groups = ([*rest, None, None, None, None])[:4]
        cls = nn.Conv2d if kind == "conv2d" else nn.Conv1d
        layer = cls(
            weight.shape[1] * (groups or 1),
            weight.shape[0],
            tuple(weight.shape[2:]),
            stride=stride or 1,
            padding=padding if padding is not None else 0,
            dilation=dilation or 1,
            groups=groups or 1,
            bias=has_bias,
        )
    with torch.no_grad():
        layer.weight.copy_(weight)
        if has_bias:
            layer.bias.copy_(bias)
    return layer
