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
- functions and methods as the graph calls them.

The kernels, their order and their arguments are those of the graph, so the outputs are
bit-identical to the ``fx.GraphModule``'s (``tests/deployment/test_onednn.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from compactnn.deployment.onednn import CL, Int8Conv2d, Int8Linear
from compactnn.errors import CompactnnError

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
        if node.op == "call_module":
            fn = _module_call(self.gm.get_submodule(node.target))
        else:  # call_function
            fn = node.target
        return f"{self.const(fn)}({', '.join(pos + kws)})"

    def source(self) -> str:
        params, body = [], []
        for i, node in enumerate(self.gm.graph.nodes):
            self.names[node] = f"v{i}"
            if node.op == "placeholder":
                default = f"={self.const(node.args[0])}" if node.args else ""
                params.append(f"v{i}{default}")
            elif node.op == "get_attr":
                body.append(f"v{i} = {self.const(_attr(self.gm, node.target))}")
            elif node.op == "output":
                body.append(f"return {self.render(node.args[0])}")
            else:
                body.append(f"v{i} = {self.call(node)}")
        return f"def run({', '.join(params)}):\n" + "".join(f"    {ln}\n" for ln in body)


def _attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _module_call(m: nn.Module) -> Callable[..., Any]:
    if isinstance(m, Int8Conv2d):
        return _conv_call(m)
    if isinstance(m, Int8Linear):
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

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(*args, **kwargs)


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
