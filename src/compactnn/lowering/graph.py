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

import math
import operator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
from torch import fx, nn

from compactnn.core.calib import unfilled_defaults
from compactnn.core.qlayers import ActQuantizer, QuantConv2d, QuantLinear, is_quant_layer
from compactnn.errors import CompactnnError

# The form of a uint8 value: ``(scale, zero)`` on the full 0..255 range, or
# ``(scale, zero, lo, hi)`` when its codes live on a narrower (low-bit) grid ``lo..hi``.
QParams = tuple[float, int] | tuple[float, int, int, int]
WeightTerm = tuple[torch.Tensor, torch.Tensor]  # int8 codes, per-output-channel float32 scale
FLOAT = "float"
ANY = "any"  # fast residual mode: an add accepts whatever uint8 form the value has

ADD_TARGETS = (operator.add, operator.iadd, torch.add)
RELU_FUNCS = (torch.relu, nn.functional.relu, torch.nn.functional.relu)
DROP_MODULES = (nn.Identity, nn.Dropout)
TRANSPARENT_MODULES = (nn.MaxPool2d, nn.Flatten, nn.ReLU)
TRANSPARENT_FUNCS = (torch.flatten, nn.functional.max_pool2d, torch.relu, nn.functional.relu)
TRANSPARENT_METHODS = ("flatten", "view", "reshape", "relu", "contiguous")


class _Tracer(fx.Tracer):
    """Keeps quantized layers, activation quantizers and modules whose class sets
    ``deploy_leaf = True`` (lowered blocks that run as float-in/float-out ops) as single
    graph nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (
            is_quant_layer(m)
            or isinstance(m, ActQuantizer)
            or getattr(type(m), "deploy_leaf", False) is True
            or super().is_leaf_module(m, qualname)
        )


def trace(model: nn.Module, example: Any = None) -> fx.GraphModule:
    """``torch.fx`` graph of ``model`` with quantized layers as leaves and identities removed.
    Parameters of ``forward`` with a default that ``example`` does not fill keep that default
    (``forward(x, scale=None)`` called with ``x``: the graph takes the ``None`` branch)."""
    try:
        graph = _Tracer().trace(model, concrete_args=unfilled_defaults(model, example))
    except Exception as e:
        raise CompactnnError(
            f"deploy traces the model with torch.fx and tracing failed ({type(e).__name__}: "
            f"{e}). Make the forward traceable (no data-dependent Python control flow)."
        ) from e
    clash = sorted(_reserved_names(graph))
    if clash:
        raise CompactnnError(
            f"deploy traces the model with torch.fx, whose GraphModule keeps its own "
            f"attribute{'s' if len(clash) > 1 else ''} {', '.join(map(repr, clash))}: the "
            f"model's top-level attribute of that name cannot be copied into it. Rename it "
            f"(e.g. self.{clash[0]}_ = ..., and in forward) and compress the model again."
        )
    gm = fx.GraphModule(model, graph)
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), DROP_MODULES):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.lint()
    return gm


# Names a GraphModule uses itself: a model attribute of one of these names (``self.meta =
# nn.Sequential(...)``) cannot be copied into the graph module (TypeError, or a forward that
# calls the GraphModule's own method).
_GRAPH_MODULE_NAMES = frozenset(
    {n for n in dir(fx.GraphModule) if not n.startswith("__") and not hasattr(nn.Module, n)}
    | {"meta", "shape_env", "_graph", "_code", "_lineno_map", "_prologue_start", "_tracer_cls"}
)


def _reserved_names(graph: fx.Graph) -> set[str]:
    """Top-level model attributes the traced ``graph`` reads that a GraphModule reserves.

    Example:
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.meta = nn.Linear(2, 2)
        ...     def forward(self, x):
        ...         return self.meta(x)
        >>> sorted(_reserved_names(fx.Tracer().trace(Net())))
        ['meta']
    """
    return {
        str(node.target).split(".")[0]
        for node in graph.nodes
        if node.op in ("call_module", "get_attr")
        and str(node.target).split(".")[0] in _GRAPH_MODULE_NAMES
    }


def unsupported_reason(layer: nn.Module) -> str | None:
    """Why a quantized layer cannot run on int8 kernels, or None when it can."""
    if not isinstance(layer, (QuantConv2d, QuantLinear)):
        return f"{type(layer).__name__} has no int8 kernel here (Conv2d and Linear only)"
    aq = layer.input_quantizer
    if aq is None or not aq.enabled or not aq.calibrated:
        return "its input is not quantized (weight-only recipe): int8 kernels need an a<=8 recipe"
    if getattr(aq, "is_per_token", False):  # DynamicActQuantizer: scale/zero are unused
        return (
            "its input grid is per token, set at run time (w8a8-smoothquant's dynamic "
            "activations): int8 kernels here take one calibrated scale and zero point"
        )
    if getattr(aq, "is_group", False):
        return (
            "its input grid is per token and group, set at run time (ONNX Runtime MatMulNBits' "
            "grid): int8 kernels here take one scale and zero point"
        )
    if getattr(aq, "is_dynamic", False):
        return (
            "its input range is taken from each tensor at run time (a8d): int8 kernels here "
            "take one calibrated scale and zero point (use a w8a8 recipe for deploy)"
        )
    if not getattr(aq, "is_uniform", True):
        return (
            "its input grid is non-uniform (learned levels, e.g. LQ-Nets): int8 kernels take one "
            "uniform scale and zero point"
        )
    if aq.scale.numel() != 1 or not bool(torch.isfinite(aq.scale)) or float(aq.scale) <= 0:
        return "its input quantizer has no single positive finite scale"
    if isinstance(layer, QuantConv2d) and layer.padding_mode != "zeros":
        return (
            f"padding_mode={layer.padding_mode!r}; oneDNN's int8 kernels pad with zeros "
            "(backend='onnxruntime' runs it with an explicit pad)"
        )
    if isinstance(layer, QuantConv2d) and isinstance(pads := conv_padding(layer), str):
        return pads
    terms = weight_terms(layer)
    return terms if isinstance(terms, str) else None


def conv_padding(layer: nn.Module) -> list[int] | str:
    """A convolution's padding as one symmetric integer per spatial dimension, or why not.

    ``padding="valid"`` is 0; ``padding="same"`` pads ``dilation * (kernel - 1)`` in all,
    half before and half after, and PyTorch puts the odd one after: exact as integers only
    when that total is even (odd kernels, or any kernel at an even dilation).

    Example:
        >>> conv_padding(nn.Conv2d(1, 1, 3, padding="same", dilation=2))
        [2, 2]
        >>> conv_padding(nn.Conv2d(1, 1, (1, 4), padding="same"))[:39]
        "padding='same' with kernel_size (1, 4) "
    """
    pairs = padding_pairs(layer)
    if any(before != after for before, after in pairs):
        return (
            f"padding='same' with kernel_size {tuple(layer.kernel_size)} and dilation "
            f"{tuple(layer.dilation)} pads one more row/column after than before, and int8 "
            "kernels pad symmetrically; use an odd kernel, or pad explicitly (nn.ZeroPad2d "
            "before a padding=0 convolution)"
        )
    return [before for before, _ in pairs]


def padding_pairs(layer: nn.Module) -> list[tuple[int, int]]:
    """``(before, after)`` padding per spatial dimension of a convolution: its integers, 0
    for ``"valid"``, and for ``"same"`` ``dilation * (kernel - 1)`` split with the odd one
    after (as PyTorch pads).

    Example:
        >>> padding_pairs(nn.Conv2d(1, 1, (3, 4), padding="same"))
        [(1, 1), (1, 2)]
    """
    pad, n = layer.padding, len(layer.kernel_size)
    if not isinstance(pad, str):
        return [(p, p) for p in pad]
    totals = [0] * n
    if pad == "same":
        totals = [d * (k - 1) for k, d in zip(layer.kernel_size, layer.dilation, strict=True)]
    return [(t // 2, t - t // 2) for t in totals]


def weight_terms(layer: nn.Module) -> list[WeightTerm] | str:
    """The layer's weight as int8 codes times per-output-channel scales, or why it is not.

    Uniform grids give one term, ``codes - zero`` with the layer's scale. A codebook
    (``weight_levels``) maps exactly when each channel's levels are integer multiples of one
    unit that fit int8 (ternary ``{-a, 0, a}``: codes -1/0/1 times ``a``; powers of two:
    multiples of the smallest power; a negative scale flips a channel whose multiples reach
    +128). Otherwise it gives two terms whose sum is the weight exactly: positive and negative
    levels each on their own unit (TTQ's ``{-a_n, 0, a_p}``), or a coarse grid plus an int8
    remainder on the levels' common unit (DoReFa's float16 levels). A layer with two terms
    runs as two int8 kernels on the same input whose outputs add.

    Returns:
        A list of one or two ``(int8 codes of the weight's shape, float32 scales (out,))``,
        or a string: the reason the weight has no such form.
    """
    spec = layer.weight_spec
    levels = getattr(layer, "weight_levels", None)
    if levels is None:
        if spec.granularity == "group":
            return "per-group weight scales; int8 kernels take per-channel scales"
        centred = layer.weight_codes.to(torch.int16) - _weight_zero(layer).to(torch.int16)
        if centred.min() < -128 or centred.max() > 127:
            return "its weight codes minus zero point do not fit int8"
        # a copy: a kernel's scale must never share memory with the simulated layer's
        scale = layer.weight_scale.reshape(-1).float().clone()
        if scale.numel() == 1:
            scale = scale.expand(centred.shape[0]).contiguous()
        return [(centred.to(torch.int8), scale)]
    if levels.shape[1] != 1:
        return "per-group codebook; int8 kernels take one scale per output channel"
    return _codebook_terms(layer, levels)


def _codebook_terms(layer: nn.Module, levels: torch.Tensor) -> list[WeightTerm] | str:
    """Codebook weights as int8 terms, channel by channel (see :func:`weight_terms`)."""
    out = layer.weight.shape[0]
    idx = layer.weight_codes.reshape(out, -1).long() - layer.weight_spec.qtype.qmin
    used = torch.zeros(out, levels.shape[-1], dtype=torch.bool).scatter_(1, idx, True)
    book = levels[:, 0, :]  # (rows, L): one row per channel, or one for the whole tensor
    memo: dict[tuple, tuple | None] = {}
    forms = []
    for c in range(out):
        r = c if book.shape[0] == out else 0
        key = (r, tuple(used[c].tolist()))
        if key not in memo:
            row = [Fraction(float(v)) for v in book[r].tolist()]
            memo[key] = _channel_form(row, key[1])
        if memo[key] is None:
            return (
                f"the codebook levels of output channel {c} are neither int8 multiples of one "
                "unit nor a sum of two such grids"
            )
        forms.append(memo[key])
    terms = []
    for t in range(max(len(scales) for _, scales in forms)):
        table = torch.zeros(out, levels.shape[-1], dtype=torch.int8)
        scale = torch.ones(out)
        for c, (rows, scales) in enumerate(forms):
            if t < len(scales):
                table[c] = torch.tensor([m[t] for m in rows], dtype=torch.int8)
                scale[c] = float(scales[t])
        terms.append((torch.gather(table, 1, idx).reshape(layer.weight.shape), scale))
    return terms


def _channel_form(row: list[Fraction], used: tuple[bool, ...]) -> tuple | None:
    """``(table, scales)`` with ``row[k] == sum(table[k][t] * scales[t])`` exactly and int8
    ``table`` entries for every used level ``k`` (unused ones map to 0); None if impossible."""
    vals = [v for v, u in zip(row, used, strict=True) if u]
    one = _one_unit(vals)
    if one is not None:
        return [(_mult(v, one),) for v in row], (one,)
    up = _one_unit([v for v in vals if v > 0])
    un = _one_unit([v for v in vals if v < 0])
    if up is not None and un is not None:  # e.g. TTQ {-a_n, 0, a_p}
        return [(_mult(v, up) if v > 0 else 0, _mult(v, un) if v < 0 else 0) for v in row], (
            up,
            un,
        )
    unit = _gcd(vals)
    if unit == 0 or Fraction(float(unit)) != unit:
        return None
    ints = [v / unit for v in row]  # exact integers for the used levels
    big = max(abs(int(i)) for i, u in zip(ints, used, strict=True) if u)
    for d in range(max(1, -(-big // 127)), 255):  # coarse grid d * unit, remainder on unit
        table = []
        for i, u in zip(ints, used, strict=True):
            if not u:
                table.append((0, 0))
                continue
            m = round(i / d)
            table.append((int(m), int(i - m * d)))
        if all(-128 <= a <= 127 and -128 <= b <= 127 for a, b in table):
            if Fraction(float(unit * d)) == unit * d:
                return table, (unit * d, unit)
    return None


def _one_unit(vals: list[Fraction]) -> Fraction | None:
    """A float32-exact scale ``s`` with every value an int8 multiple of it, or None.

    The scale is negative when only the flipped multiples fit (int8 holds -128, not +128).
    """
    unit = _gcd(vals)
    if unit == 0:
        return Fraction(1)
    if Fraction(float(unit)) != unit:
        return None
    ints = [v / unit for v in vals]
    if min(ints) >= -128 and max(ints) <= 127:
        return unit
    if min(ints) >= -127 and max(ints) <= 128:
        return -unit
    return None


def _gcd(vals: list[Fraction]) -> Fraction:
    """The largest ``g`` with every value an integer multiple of it (0 for none or zeros)."""
    if not vals:
        return Fraction(0)
    den = math.lcm(*(v.denominator for v in vals))
    return Fraction(math.gcd(*(int(v * den) for v in vals)), den)


def _mult(v: Fraction, unit: Fraction) -> int:
    """``v / unit`` as an int8 value (0 for an unused level off the grid)."""
    q = v / unit
    return int(q) if q.denominator == 1 and -128 <= q <= 127 else 0


def _weight_zero(layer: nn.Module) -> torch.Tensor:
    """Weight zero point broadcast to the weight's shape."""
    rows = layer.weight_zero.shape[0]
    z = layer.weight_zero.reshape(rows, 1).expand(layer.weight.shape[0], 1)
    return z.reshape((-1,) + (1,) * (layer.weight.dim() - 1)).round()


def int8_weight(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes - zero)`` as int8 and per-output-channel scales (float32, ``(out,)``).

    The dequantized weight ``codes * scale`` is the simulation's weight (for a codebook, its
    levels exactly; see :func:`weight_terms`). A layer whose weight needs two terms raises.
    """
    terms = weight_terms(layer)
    if isinstance(terms, str) or len(terms) != 1:
        raise CompactnnError(f"int8_weight: the weight has no single int8 form ({terms}).")
    return terms[0]


def input_qparams(layer: nn.Module) -> tuple[float, int]:
    """uint8 ``(scale, zero)`` of a layer's input quantizer, as the kernel reads it."""
    return act_qparams(layer.input_quantizer)


def act_qparams(aq: ActQuantizer) -> tuple[float, int]:
    """uint8 ``(scale, zero)`` of an activation quantizer of at most 8 bits.

    Signed grids shift by 128 (int8 code ``q`` is uint8 code ``q + 128``), at any width.
    """
    zero = int(aq.zero.round().item()) + (128 if aq.qtype.signed else 0)
    return float(aq.scale.item()), zero


def act_form(aq: ActQuantizer) -> QParams:
    """The form of the codes ``aq`` produces: ``(scale, zero)`` at 8 bits, else
    ``(scale, zero, lo, hi)`` with the grid's ``[qmin, qmax]`` shifted like the zero."""
    scale, zero = act_qparams(aq)
    if aq.qtype.bits == 8:
        return scale, zero
    shift = 128 if aq.qtype.signed else 0
    return scale, zero, aq.qtype.qmin + shift, aq.qtype.qmax + shift


def input_form(layer: nn.Module) -> QParams:
    """The form of a layer's input as uint8 codes (see :func:`act_form`)."""
    return act_form(layer.input_quantizer)


def code_range(form: QParams) -> tuple[int, int]:
    """``(lo, hi)``: the uint8 codes a form's grid holds (0..255 unless low-bit)."""
    return (form[2], form[3]) if len(form) == 4 else (0, 255)


def grid_codes(x: torch.Tensor, form: QParams) -> torch.Tensor:
    """The simulation's codes of ``x`` on ``form``, ``clamp(round(x / scale) + zero, lo, hi)``,
    as float values (compare them, or cast them to uint8).

    Example:
        >>> grid_codes(torch.tensor([-1.0, 0.504, 9.0]), (0.01, 3, 0, 15)).tolist()
        [0.0, 15.0, 15.0]
    """
    lo, hi = code_range(form)
    return (x.float() / form[0]).round().add(form[1]).clamp(lo, hi)


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
    grids: dict[fx.Node, QParams] = field(default_factory=dict)  # standalone quantizers
    terms: dict[str, list[WeightTerm]] = field(default_factory=dict)  # node -> int8 weights


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
    """A standalone :class:`ActQuantizer` (at most 8 bits) the integer graph can hold as
    uint8 codes."""
    return (
        isinstance(m, ActQuantizer)
        and m.enabled
        and m.calibrated
        and not m.runtime_range
        and not getattr(m, "is_per_token", False)
        and m.observer is None
        and m.scale.numel() == 1
        and bool(torch.isfinite(m.scale))
        and float(m.scale) > 0
    )
