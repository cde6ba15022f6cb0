"""Quantized layers the deploy trace runs through instead of calling: they run as float ops.

``lowering.graph.trace`` keeps a quantized layer as one node when the model *calls* it. A
module that instead reads a quantized layer's weight and does its own op (a frozen
``BAPLayer``: ``conv2d(q(x), alpha * B + S)``) is traced through: the lowered graph runs that
op in float on the dequantized weight. Those layers are simulated quantization in float,
exactly like the ones ``plan.kept`` lists, and ``deploy`` must name them (``kept_float``).
"""

from __future__ import annotations

from torch import fx, nn

from compactnn.core.qlayers import is_quant_layer
from compactnn.quant.bap import BAPLayer

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
BAP_REASON = (
    "binary augmented layer: runs as a float convolution of alpha*B + S (no integer kernel "
    "for the binary-plus-sparse sum yet)"
)


def traced_through(model: nn.Module, gm: fx.GraphModule) -> dict[str, str]:
    """``{name: reason}`` of the quantized layers of ``model`` that its trace ``gm`` reads
    (their weights, their input quantizers) without calling them as a node.

    A layer inside a called module (a binary block lowered to its own kernel) is not listed,
    nor is one the forward never uses. The name is the module that runs the float op when it
    is not a plain container (``features.3`` for the ``BAPLayer`` holding ``features.3.binary``).
    """
    called = [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    read = [str(n.target) for n in gm.graph.nodes if n.op in ("call_module", "get_attr")]
    out: dict[str, str] = {}
    for name, layer in model.named_modules():
        if not name or not is_quant_layer(layer) or name in called:
            continue
        if any(name.startswith(c + ".") for c in called):  # inside a leaf: its own kernel
            continue
        if not any(r.startswith(name + ".") for r in read):  # not in the forward
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, BAPLayer):
            out[parent_name] = BAP_REASON
        elif parent_name and not isinstance(parent, CONTAINERS):
            out[parent_name] = (
                f"{type(parent).__name__} uses its quantized layer {child!r} without calling "
                "it: runs as a float op of the dequantized weight"
            )
        else:
            out[name] = (
                "the model uses its weight without calling the layer: runs as a float op of "
                "the dequantized weight"
            )
    return out
