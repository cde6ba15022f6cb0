"""An execution plan for a lowered int8 graph: the same kernels, less Python per call.

A lowered model (:func:`compactnn.deployment.lower.lower`) is an ``fx.GraphModule`` whose
generated ``forward`` calls each submodule through ``nn.Module.__call__``; every int8 layer
then looks up its attributes, builds its argument tuple and resolves the oneDNN operator's
overload on every call. At batch 1 on small inputs a kernel runs for 5-60 us, so that fixed
cost is a large share of the whole call (MobileNetV3-Small at 64x64 runs 46 convolutions).

:func:`plan_runner` compiles the graph once into straight-line Python that calls, per node:

- for an int8 convolution or linear layer, a closure holding the resolved operator overload
  and every constant argument (grids, scales, bias, geometry, post-op), with the weights
  prepacked per input shape (the layer's own :meth:`packed_for` cache fills it);
- for any other submodule, its ``forward`` (no hooks are registered on lowered modules);
- functions and methods as the graph calls them;
- for an int8 convolution with ONE input channel (an image CNN's first layer, where oneDNN's
  int8 kernels, which block input channels by four, run at a small fraction of their peak),
  the direct kernel ``small_conv`` of the compiled extension (``kernels/csrc/smallconv.cpp``),
  fused with the float -> uint8 quantization before it when that feeds only this layer:
  one pass from the float image to the next layer's codes. Its integer dots are exact and its
  scale ``(acc * sx) * w_scale``, bias, ReLU and requantization are the int8 kernel's float
  operations in oneDNN's order, so bit-identical to it (``tests/deployment/test_small_conv.py``;
  the folded ``acc * (sx * w_scale)`` differed in the last bit on ~22% of float outputs).
  Without a C++ compiler the oneDNN kernel runs, as before;
- for a two-term split convolution (:class:`~compactnn.deployment.lowbit.SplitConv2d`, TTQ's
  ``W_p * [w = +1] - W_n * [w = -1]``), the direct VNNI kernel ``term_conv``
  (``kernels/csrc/termconv.cpp``): each input window read once, both terms' int32 dots in
  registers, and the combine (sum of the scaled terms, ReLU/Hardtanh, requantization) in the
  same pass instead of a float ``2 * out``-channel oneDNN output and a second pass. Same
  integer dots and the same float operations in the same order: equal codes
  (``tests/deployment/test_term_conv.py``), each term scaled in oneDNN's own float order
  ``(dot * sx) * w_scale``. Needs AVX-512 VNNI; oneDNN otherwise;
- for a plain int8 convolution (no residual sum or a float32 one, one group, at most 512
  outputs, ReLU / Hardtanh / no post-op), the same ``term_conv`` with one term when a call's
  work is at most ``direct.plain_macs_limit()`` multiply-accumulates (32 M; 4 M with AMX),
  oneDNN above (checked per input shape); stride-1 unpadded 1x1 layers with codes out at every
  size on a CPU without AMX (``direct.pointwise``: ``kernels/csrc/pointwise.cpp``, dots and
  requantization in registers, 1.1-1.8x oneDNN on MobileNetV2's 1x1 layers at batch 8). At batch 1
  oneDNN's int8 convolution costs ~40 us per call whatever the layer's size (mnist-cnn's 1-2 M MAC
  layers), the direct kernel 8-11 us; above ~38 M MACs oneDNN's blocking is faster. A float32
  residual is added after the bias, then the ReLU: oneDNN's sum post-op order. Bit-identical to
  oneDNN (``tests/deployment/test_plain_conv.py``); whole-model gains in
  ``python -m compactnn.bench --only direct_ab`` (``docs/bench/direct_ab.md``);
- for a global average pool whose only user is a quantization (a CNN's head), the
  extension's ``pool_quantize`` (``kernels/csrc/head.cpp``): one pass from the float
  feature map to the head's codes, the same float operations as ``x.mean((2, 3))`` (PyTorch's
  cascaded sum) and the quantizer, so equal codes (``tests/kernels/test_head.py``);
- for an int8 linear layer with a float output and at most 64K weights (a small head), the
  extension's ``small_linear``: exact float dots, then oneDNN's own float order
  ``(acc * sx) * w_scale + bias``, so bit-identical;
- for a depthwise convolution on the integer form with the stride-1 1x1 convolutions around
  it (MobileNetV2's inverted residual block: the expansion whose codes only it reads, the
  projection that only reads its codes, with or without a uint8 residual), the extension's
  ``DwBlockPlan`` (``kernels/csrc/dwblock.cpp``): the expansion's tiles write each row of its
  codes straight into the depthwise kernel's ring of input rows and each depthwise output row
  goes straight to the projection's tiles, so neither map (the expanded one is 6x the block's
  input channels) is written to memory and read back; equal codes
  (``tests/kernels/test_dwblock.py``);
- for a squeeze-excitation tail, ``quantize(Hardsigmoid(g) * x)`` (MobileNetV3), the
  extension's ``gate_quantize``: one pass instead of three, equal codes
  (``tests/deployment/test_gate_fusion.py``); when ``g`` comes from two plain 1x1
  convolutions of the map's pooled codes, the whole block is one call (``SqueezePlan``:
  the same four kernels chained in C++);
- for a float -> uint8 quantization (the model's input), a dequantization (a float residual)
  and a max-pool of codes, the extension's ``quantize_codes``, ``dequantize_codes`` and
  ``maxpool_codes`` (``kernels/csrc/codes.cpp``): one pass each instead of up to six PyTorch
  ops or PyTorch's quantized max-pool, equal values
  (``tests/kernels/test_codes.py``).

The direct kernels' closures are in :mod:`compactnn.deployment.direct` (layers) and
:mod:`compactnn.deployment.codes` (cheap operations on codes); this module compiles
the graph and chooses, per node, which call runs it. The kernels, their order and their
arguments are those of the graph, so the outputs are
bit-identical to the ``fx.GraphModule``'s (``tests/deployment/test_onednn.py``; the direct
kernels give the same codes there).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from compactnn.deployment.chains import (
    dw_block_chain,
    fusable_quantize,
    gate_chain,
    global_pool,
    hardswish_chain,
    pooled_quantize,
    squeeze_chain,
)
from compactnn.deployment.codes import (
    dequantize_call,
    gate_quantize_call,
    maxpool_call,
    pool_quantize_call,
    quantize_call,
)
from compactnn.deployment.depthwise import depthwise_call, depthwise_fits, dw_block_call
from compactnn.deployment.direct import (
    plain_conv_call,
    plain_conv_fits,
    plain_linear_call,
    plain_linear_fits,
    small_conv_call,
    small_conv_fits,
    small_linear_call,
    small_linear_fits,
    squeeze_call,
    term_conv_call,
    term_conv_fits,
)
from compactnn.deployment.hardswish import hardswish_call
from compactnn.deployment.lowbit import QuantizeGrid
from compactnn.deployment.onednn import (
    CL,
    Dequantize,
    Int8Conv2d,
    Int8Linear,
    MaxPoolU8,
    Quantize,
)
from compactnn.errors import CompactnnError
from compactnn.kernels import bitconv

_QCONV = torch.ops.onednn.qconv_pointwise.default
_QCONV_SUM = torch.ops.onednn.qconv2d_pointwise.binary
_QLINEAR = torch.ops.onednn.qlinear_pointwise.default


def _conv_call(m: Int8Conv2d) -> Callable[..., torch.Tensor]:
    """``m.forward`` with every constant bound: (N, C, H, W) uint8 codes -> output."""
    sx, zx = m.x_qp
    ws, wz, bias = m.w_scale_t, m.w_zero, m.bias
    geo = (m.stride, m.padding, m.dilation, m.groups)
    o_scale, o_zero, o_dtype = m.out_args()
    unary, scalars = m.unary, m.scalars
    packed_for, cache = m.packed_for, {}

    def weights(q: torch.Tensor) -> torch.Tensor:
        shape = q.shape
        packed = cache.get(shape)
        if packed is None:  # first call at this shape: pack once (bounded like the layer's)
            if len(cache) >= 4:
                cache.clear()
            packed = cache[shape] = packed_for(tuple(shape))
        return packed

    if m.accum is None:

        def conv(q: torch.Tensor) -> torch.Tensor:
            return _QCONV(
                q, sx, zx, weights(q), ws, wz, bias, *geo,
                o_scale, o_zero, o_dtype, unary, scalars, "",
            )  # fmt: skip

        return conv
    a_scale, a_zero = (1.0, 0) if m.accum == "float" else m.accum
    sum_unary = None if unary == "none" else unary

    def conv_sum(q: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
        # oneDNN adds the conv result into ``acc`` in place (channels-last)
        acc = acc.contiguous(memory_format=CL)
        return _QCONV_SUM(
            q, sx, zx, weights(q), ws, wz, acc, bias, *geo, o_scale, o_zero, o_dtype,
            a_scale, a_zero, "sum", 1.0, sum_unary, scalars, "",
        )  # fmt: skip

    return conv_sum


def _linear_call(m: Int8Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    """``m.forward`` with every constant bound: (..., in) uint8 codes -> (..., out)."""
    sx, zx = m.x_qp
    ws, wz, bias = m.w_scale_t, m.w_zero, m.bias
    o_scale, o_zero, o_dtype = m.out_args()
    unary, scalars = m.unary, m.scalars
    packed_for, cache = m.packed_for, {}

    def linear(q: torch.Tensor) -> torch.Tensor:
        q2 = q.reshape(-1, q.shape[-1]) if q.dim() != 2 else q  # (N, in)
        shape = q2.shape
        packed = cache.get(shape)
        if packed is None:
            if len(cache) >= 4:
                cache.clear()
            packed = cache[shape] = packed_for(tuple(shape))
        y = _QLINEAR(q2, sx, zx, packed, ws, wz, bias, o_scale, o_zero, o_dtype, unary, scalars, "")
        return y if q.dim() == 2 else y.reshape(*q.shape[:-1], y.shape[-1])

    return linear


class _Codegen:
    """Straight-line source for a graph; non-node values become named globals."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.globals: dict[str, Any] = {}
        self.names: dict[fx.Node, str] = {}
        self.absorbed: dict[fx.Node, tuple] = {}  # small conv node -> grid of its quantize
        self.skipped: set[fx.Node] = set()  # those quantize nodes (they pass the float on)
        self.pooled: dict[fx.Node, nn.Module] = {}  # quantize node -> the pool it absorbs
        for node in gm.graph.nodes:
            conv = fusable_quantize(gm, node)
            if conv is not None:
                self.absorbed[conv] = gm.get_submodule(node.target).qp
                self.skipped.add(node)
            quant = pooled_quantize(gm, node)
            if quant is not None:  # the pool passes its input on to the fused quantize
                self.pooled[quant] = global_pool(gm, node)
                self.skipped.add(node)
        # convolution or linear -> Hardswish [-> quantize]: the last node of a chain makes one call
        self.hardswish: dict[fx.Node, tuple[fx.Node, fx.Node, fx.Node | None]] = {}
        for node in gm.graph.nodes:
            chain = hardswish_chain(gm, node)
            if chain is None or node in self.skipped or node in self.absorbed:
                continue
            act, quant = chain
            if quant is not None and quant in self.skipped:
                quant = None  # (a quantization absorbed by the next layer stays there)
            self.hardswish[quant or act] = (node, act, quant)
            self.skipped.update(n for n in (node, act) if n is not (quant or act))
        # [1x1 expansion ->] depthwise [-> 1x1 projection]: one call at the chain's last node
        self.dw_block: dict[fx.Node, tuple] = {}
        for node in gm.graph.nodes:
            block = dw_block_chain(gm, node)
            taken = (self.skipped, self.absorbed, self.hardswish, self.dw_block)
            if block is None or any(n in t for n in block if n is not None for t in taken):
                continue
            *first, last = (n for n in block if n is not None)
            self.dw_block[last] = block
            self.skipped.update(first)
        # Hardsigmoid -> multiply -> quantize (a squeeze-excitation tail): one call at the end
        self.gates: dict[fx.Node, tuple[fx.Node, fx.Node, fx.Node]] = {}
        for node in gm.graph.nodes:
            chain = gate_chain(gm, node)
            if chain is None or any(n in self.skipped for n in (node, *chain)):
                continue
            mul, quant, x = chain
            self.gates[quant] = (node, mul, x)
            self.skipped.update((node, mul))
        # the whole block, quantize(pool(x)) -> fc1 -> fc2 -> that tail: one call
        self.squeeze: dict[fx.Node, tuple[fx.Node, fx.Node, fx.Node]] = {}
        for quant, (gate, _mul, x) in self.gates.items():
            block = squeeze_chain(gm, gate, x, self.pooled)
            if block is None or any(n in self.skipped or n in self.hardswish for n in block[1:]):
                continue
            self.squeeze[quant] = block
            self.skipped.update(block)

    def const(self, value: Any) -> str:
        if value is None or isinstance(value, bool | int | str):
            return repr(value)
        name = f"_c{len(self.globals)}"
        self.globals[name] = value
        return name

    def render(self, arg: Any) -> str:
        if isinstance(arg, fx.Node):
            return self.names[arg]
        if isinstance(arg, tuple | list):
            inner = ", ".join(self.render(a) for a in arg)
            if isinstance(arg, list):
                return f"[{inner}]"
            return f"({inner},)" if len(arg) == 1 else f"({inner})"
        if isinstance(arg, dict):
            return "{" + ", ".join(f"{k!r}: {self.render(v)}" for k, v in arg.items()) + "}"
        if isinstance(arg, slice):
            parts = (self.render(arg.start), self.render(arg.stop), self.render(arg.step))
            return f"slice({', '.join(parts)})"
        return self.const(arg)

    def call(self, node: fx.Node) -> str:
        pos = [self.render(a) for a in node.args]
        kws = [f"{k}={self.render(v)}" for k, v in node.kwargs.items()]
        if node.op == "call_method":
            return f"{pos[0]}.{node.target}({', '.join(pos[1:] + kws)})"
        if node in self.absorbed:  # the quantization and the first layer as one kernel
            fn = small_conv_call(self.gm.get_submodule(node.target), self.absorbed[node])
        elif node in self.hardswish:  # a convolution, its Hardswish [and quantize], one pass
            fn = self._hardswish_fn(*self.hardswish[node])
        elif node in self.dw_block:  # a depthwise convolution and its 1x1 layers, one pass
            layers = (n and self.gm.get_submodule(n.target) for n in self.dw_block[node])
            fn = dw_block_call(*layers)
        elif node in self.pooled:  # the global average pool and its quantization, one pass
            fn = pool_quantize_call(self.pooled[node], self.gm.get_submodule(node.target))
        elif node.op == "call_module":
            fn = module_call(self.gm.get_submodule(node.target))
        else:  # call_function
            fn = node.target
        return f"{self.const(fn)}({', '.join(pos + kws)})"

    def _gate_fn(self, gate: fx.Node, mul: fx.Node, quant: fx.Node) -> Callable:
        hardsigmoid = self.gm.get_submodule(gate.target)
        quantizer = self.gm.get_submodule(quant.target)
        multiply, gate_first = mul.target, mul.args[0] is gate

        def unfused(pre: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            h = hardsigmoid(pre)
            return quantizer(multiply(h, x) if gate_first else multiply(x, h))

        return gate_quantize_call(quantizer, unfused)

    def _squeeze_fn(self, quant: fx.Node) -> Callable:
        gate, mul, _x = self.gates[quant]
        poolq, fc1, fc2 = self.squeeze[quant]
        pool_quant = self.gm.get_submodule(poolq.target)
        gate_input = _in_turn(
            pool_quantize_call(self.pooled[poolq], pool_quant),
            module_call(self.gm.get_submodule(fc1.target)),
            module_call(self.gm.get_submodule(fc2.target)),
        )
        gated = self._gate_fn(gate, mul, quant)

        def unfused(x: torch.Tensor) -> torch.Tensor:
            return gated(gate_input(x), x)

        modules = (self.gm.get_submodule(n.target) for n in (fc1, fc2, quant))
        return squeeze_call(pool_quant, *modules, unfused)

    def _hardswish_fn(self, conv: fx.Node, act: fx.Node, quant: fx.Node | None) -> Callable:
        # large calls: the separate calls
        unfused = _in_turn(*(module_call(self.gm.get_submodule(n.target))
                             for n in (conv, act, quant) if n))  # fmt: skip
        quantizer = None if quant is None else self.gm.get_submodule(quant.target)
        return hardswish_call(self.gm.get_submodule(conv.target), quantizer, unfused)

    def source(self) -> str:
        params, body = [], []
        for i, node in enumerate(self.gm.graph.nodes):
            self.names[node] = f"v{i}"
            if node.op == "placeholder":
                default = f"={self.const(node.args[0])}" if node.args else ""
                params.append(f"v{i}{default}")
            elif node.op == "get_attr":
                body.append(f"v{i} = {self.const(_attr(self.gm, node.target))}")
            elif node in self.squeeze:  # the whole squeeze-excitation block: one call
                x = self.gates[node][2]
                fn = self.const(self._squeeze_fn(node))
                body.append(f"v{i} = {fn}({self.render(x)})")
            elif node in self.gates:  # Hardsigmoid(pre) * x, quantized: one pass
                gate, mul, x = self.gates[node]
                fn = self.const(self._gate_fn(gate, mul, node))
                body.append(f"v{i} = {fn}({self.render(gate.args[0])}, {self.render(x)})")
            elif node in self.skipped:  # absorbed by the next node, which reads its input
                body.append(f"v{i} = {self.render(node.args[0])}")
            elif node.op == "output":
                body.append(f"return {self.render(node.args[0])}")
            else:
                body.append(f"v{i} = {self.call(node)}")
        return f"def run({', '.join(params)}):\n" + "".join(f"    {ln}\n" for ln in body)


def _in_turn(*steps: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """One callable running ``steps`` in turn, each on the previous one's output."""

    def run(value: Any) -> Any:
        for step in steps:
            value = step(value)
        return value

    return run


def _attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def module_call(m: nn.Module) -> Callable[..., Any]:
    if type(m) in (Quantize, QuantizeGrid) and bitconv.available():
        return quantize_call(m)
    if isinstance(m, MaxPoolU8) and bitconv.available():
        return maxpool_call(m)
    if type(m) is Dequantize and bitconv.available():
        return dequantize_call(m)
    if isinstance(m, Int8Conv2d) and small_conv_fits(m):
        return small_conv_call(m, None)
    if term_conv_fits(m):
        return term_conv_call(m)
    if plain_conv_fits(m):
        return plain_conv_call(m, _conv_call(m))
    if depthwise_fits(m):
        return depthwise_call(m, _conv_call(m))
    if isinstance(m, Int8Conv2d):
        return _conv_call(m)
    if isinstance(m, Int8Linear):
        if small_linear_fits(m):
            return small_linear_call(m)
        if plain_linear_fits(m):
            return plain_linear_call(m, _linear_call(m))
        return _linear_call(m)
    hooks = (m._forward_hooks, m._forward_pre_hooks)
    return m if any(hooks) else m.forward


class PlanRunner(nn.Module):
    """A lowered int8 graph run as one compiled Python function (see module docstring).

    Attributes:
        graph_module: the ``fx.GraphModule`` it was built from (owns the modules).
        source: the generated code, for inspection.
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__()
        self.graph_module = gm
        cg = _Codegen(gm)
        self.source = cg.source()
        namespace = dict(cg.globals)
        exec(compile(self.source, "<compactnn plan>", "exec"), namespace)  # our own generated code
        self._run = namespace["run"]
        self._signature = _placeholder_signature(gm)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs:  # the generated function's parameters are v0, v1, ...: bind by the graph's
            args = self._positional(args, kwargs)
        return self._run(*args)

    def _positional(self, args: tuple, kwargs: dict) -> tuple:
        """``args`` and ``kwargs`` as the graph's inputs in order, defaults filled in."""
        if self._signature is None:
            raise CompactnnError(
                "this lowered graph takes variable arguments: pass its inputs by position."
            )
        try:
            bound = self._signature.bind(*args, **kwargs)
        except TypeError as e:
            raise CompactnnError(f"lowered graph{self._signature}: {e}.") from e
        bound.apply_defaults()
        return tuple(bound.arguments.values())


def _placeholder_signature(gm: fx.GraphModule) -> inspect.Signature | None:
    """The graph's inputs as a signature (names and defaults); None for ``*args``."""
    params = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        if str(node.target).startswith("*"):
            return None
        default = node.args[0] if node.args else inspect.Parameter.empty
        params.append(
            inspect.Parameter(
                str(node.target), inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default
            )
        )
    return inspect.Signature(params)


def plan_runner(gm: fx.GraphModule) -> PlanRunner:
    """Compile a lowered int8 graph into a :class:`PlanRunner` with the same outputs.

    Args:
        gm: the ``fx.GraphModule`` from :func:`compactnn.deployment.lower.lower`; it stays
            usable (the runner shares its modules and prepacked weights).

    Returns:
        A module whose outputs are bit-identical to ``gm``'s, with less Python per call.

    Example:
        >>> fast = plan_runner(lower(build_plan(trace(sim), "exact")))  # doctest: +SKIP
        >>> torch.equal(fast(x), gm(x))                                 # doctest: +SKIP
        True
    """
    if not isinstance(gm, fx.GraphModule):
        raise CompactnnError(
            f"plan_runner takes the fx.GraphModule that lowering returns, got "
            f"{type(gm).__name__}; pass deployed.program of a onednn DeployedModel."
        )
    return PlanRunner(gm.eval())
