"""Reading a simulated model as a graph and deciding which integer form each value takes.

The simulated (fake-quantized) model quantizes the *input* of every quantized layer and keeps
everything else in float. An integer graph must hold a value either as float or as uint8
codes with one ``(scale, zero)``; it may only choose uint8 where that gives the same numbers
as the simulation. The rule used here: a value is produced as uint8 with qparams ``P`` when
every consumer would quantize it with ``P`` anyway (directly, or through ops that commute
with quantization: max-pool, concatenation, flatten, ReLU); otherwise it stays float and each
quantized consumer quantizes it itself, exactly as the simulation does.

The one optional exception is ``residual="fast"``: a residual add then accepts the uint8
form of an operand that other consumers already need in uint8, instead of its float value
(saves a float round trip; costs up to half a step of that operand's scale).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from compactnn.core.qlayers import ActQuantizer, QuantConv2d, QuantLinear, is_quant_layer
from compactnn.errors import CompactnnError

QParams = tuple[float, int]  # (scale, zero point) of a uint8 tensor
FLOAT = "float"
ANY = "any"  # fast residual mode: an add accepts whatever uint8 form the value has

ADD_TARGETS = (operator.add, operator.iadd, torch.add)
RELU_FUNCS = (torch.relu, nn.functional.relu, torch.nn.functional.relu)
DROP_MODULES = (nn.Identity, nn.Dropout)
TRANSPARENT_MODULES = (nn.MaxPool2d, nn.Flatten, nn.ReLU)
TRANSPARENT_FUNCS = (torch.flatten, nn.functional.max_pool2d, torch.relu, nn.functional.relu)
TRANSPARENT_METHODS = ("flatten", "view", "reshape", "relu", "contiguous")


class _Tracer(fx.Tracer):
    """Keeps quantized layers and activation quantizers as single graph nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (
            is_quant_layer(m) or isinstance(m, ActQuantizer) or super().is_leaf_module(m, qualname)
        )


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx`` graph of ``model`` with quantized layers as leaves and identities removed."""
    try:
        graph = _Tracer().trace(model)
    except Exception as e:
        raise CompactnnError(
            f"deploy traces the model with torch.fx and tracing failed ({type(e).__name__}: "
            f"{e}). Make the forward traceable (no data-dependent Python control flow)."
        ) from e
    gm = fx.GraphModule(model, graph)
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), DROP_MODULES):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.lint()
    return gm


def unsupported_reason(layer: nn.Module) -> str | None:
    """Why a quantized layer cannot run on int8 kernels, or None when it can."""
    if not isinstance(layer, (QuantConv2d, QuantLinear)):
        return f"{type(layer).__name__} has no int8 kernel here (Conv2d and Linear only)"
    aq = layer.input_quantizer
    if aq is None or not aq.enabled or not aq.calibrated:
        return "its input is not quantized (weight-only recipe): int8 kernels need w8a8"
    if aq.qtype.bits != 8:
        return f"its input is {aq.qtype.name}; int8 kernels need 8-bit activations"
    spec = layer.weight_spec
    if spec.granularity == "group":
        return "per-group weight scales; int8 kernels take per-channel scales"
    centred = layer.weight_codes.to(torch.int16) - _weight_zero(layer).to(torch.int16)
    if centred.min() < -128 or centred.max() > 127:
        return "its weight codes minus zero point do not fit int8"
    if isinstance(layer, QuantConv2d) and layer.padding_mode != "zeros":
        return f"padding_mode={layer.padding_mode!r}; int8 kernels pad with zeros"
    return None


def _weight_zero(layer: nn.Module) -> torch.Tensor:
    """Weight zero point broadcast to the weight's shape."""
    rows = layer.weight_zero.shape[0]
    z = layer.weight_zero.reshape(rows, 1).expand(layer.weight.shape[0], 1)
    return z.reshape((-1,) + (1,) * (layer.weight.dim() - 1)).round()


def int8_weight(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes - zero)`` as int8 and per-output-channel scales (float32, ``(out,)``).

    The dequantized weight ``(codes - zero) * scale`` is the simulation's weight bit for bit.
    """
    w = (layer.weight_codes.to(torch.int16) - _weight_zero(layer).to(torch.int16)).to(torch.int8)
    scale = layer.weight_scale.reshape(-1).float()
    if scale.numel() == 1:
        scale = scale.expand(w.shape[0]).contiguous()
    return w, scale


def input_qparams(layer: nn.Module) -> QParams:
    """uint8 ``(scale, zero)`` of a layer's input quantizer (signed grids shift by 128)."""
    return act_qparams(layer.input_quantizer)


def act_qparams(aq: ActQuantizer) -> QParams:
    """uint8 ``(scale, zero)`` of an 8-bit activation quantizer (signed grids shift by 128)."""
    zero = int(aq.zero.round().item()) + (128 if aq.qtype.signed else 0)
    return float(aq.scale.item()), zero


@dataclass
class Fused:
    """A quantized layer node with the elementwise ops folded into its kernel."""

    layer: fx.Node
    add: fx.Node | None = None  # residual add absorbed as a post-op sum
    accum: fx.Node | None = None  # the add's other operand
    unary: fx.Node | None = None  # ReLU / ReLU6 / Hardtanh after the layer (or after the add)

    @property
    def last(self) -> fx.Node:
        return self.unary or self.add or self.layer


@dataclass
class Plan:
    """What the lowering needs: fused groups, and the form of every value."""

    gm: fx.GraphModule
    lowered: dict[str, nn.Module]  # node name -> quantized layer run on int8 kernels
    kept: dict[str, str]  # module name -> why it stays float (simulated)
    groups: dict[fx.Node, Fused] = field(default_factory=dict)  # keyed by Fused.last
    absorbed: set[fx.Node] = field(default_factory=set)  # nodes emitted inside a group
    form: dict[fx.Node, QParams | str] = field(default_factory=dict)
    grids: dict[fx.Node, QParams] = field(default_factory=dict)  # standalone 8-bit quantizers


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def unary_attr(gm: fx.GraphModule, node: fx.Node) -> tuple[str, list[float]] | None:
    """oneDNN post-op name and scalars for a ReLU-like node, or None."""
    m = module_of(gm, node)
    if isinstance(m, nn.ReLU) or (node.op == "call_function" and node.target in RELU_FUNCS):
        return "relu", []
    if node.op == "call_method" and node.target == "relu":
        return "relu", []
    if isinstance(m, nn.Hardtanh):  # ReLU6 is a Hardtanh(0, 6)
        return "hardtanh", [float(m.min_val), float(m.max_val)]
    if node.op == "call_function" and node.target is nn.functional.relu6:
        return "hardtanh", [0.0, 6.0]
    return None


def is_add(node: fx.Node) -> bool:
    return (
        node.op == "call_function"
        and node.target in ADD_TARGETS
        and len(node.args) == 2
        and all(isinstance(a, fx.Node) for a in node.args)
        and not node.kwargs
    )


def is_transparent(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Ops that give the same codes applied before or after quantizing (same qparams)."""
    m = module_of(gm, node)
    if m is not None:
        if isinstance(m, nn.MaxPool2d):
            return not m.return_indices
        return isinstance(m, TRANSPARENT_MODULES)
    if node.op == "call_function":
        if node.target is torch.cat:
            return True
        if node.target is nn.functional.max_pool2d:
            return not node.kwargs.get("return_indices", False)
        return node.target in TRANSPARENT_FUNCS
    return node.op == "call_method" and node.target in TRANSPARENT_METHODS


def is_residual_quantizer(m: nn.Module) -> bool:
    """A standalone 8-bit :class:`ActQuantizer` the integer graph can hold as uint8 codes."""
    return (
        isinstance(m, ActQuantizer)
        and m.enabled
        and m.calibrated
        and m.observer is None
        and m.qtype.bits == 8
        and m.scale.numel() == 1
        and bool(torch.isfinite(m.scale))
    )
