"""Lowering a plan to an ``fx.GraphModule`` that runs int8 oneDNN kernels.

Values flow through the new graph as float tensors or as uint8 codes of a known grid; the
helpers ``as_float`` / ``as_u8`` insert the (cached) conversions a consumer needs.
"""

from __future__ import annotations

import copy

from torch import fx, nn

from compactnn.deployment.lowbit import (
    ClampU8,
    SplitConv2d,
    SplitLinear,
    clamped_unary,
    quantize_to,
)
from compactnn.deployment.onednn import (
    Dequantize,
    Int8Conv2d,
    Int8Linear,
    MaxPoolU8,
    ReluU8,
    maxpool_kwargs,
)
from compactnn.lowering.graph import (
    FLOAT,
    Fused,
    Plan,
    QParams,
    code_range,
    input_form,
    module_of,
    unary_attr,
)
from compactnn.lowering.plan import SHAPE_METHODS


class _Builder:
    """Emits the new graph node by node; ``env`` maps old nodes to ``(new node, form)``."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        # float ops keep running on their own modules (a copy); modules already lowered
        # (deploy_leaf: binary blocks with prepacked kernels) are shared, not copied
        shared = {id(m): m for m in plan.gm.modules() if getattr(m, "deploy_leaf", False)}
        self.root = copy.deepcopy(plan.gm, shared)
        self.graph = fx.Graph()
        self.env: dict[fx.Node, tuple[fx.Node, QParams | str]] = {}
        self.cache: dict[tuple[fx.Node, object], fx.Node] = {}
        self.count = 0

    def add_module(self, hint: str, module: nn.Module) -> str:
        self.count += 1
        name = f"int8_{self.count}_{hint.replace('.', '_')}"
        self.root.add_module(name, module)
        return name

    def as_float(self, old: fx.Node) -> fx.Node:
        new, form = self.env[old]
        if form == FLOAT:
            return new
        key = (new, FLOAT)
        if key not in self.cache:
            name = self.add_module("dequant", Dequantize(form))
            self.cache[key] = self.graph.call_module(name, (new,))
        return self.cache[key]

    def as_u8(self, old: fx.Node, qp: QParams) -> fx.Node:
        new, form = self.env[old]
        if form == qp:
            return new
        key = (new, qp)
        if key not in self.cache:
            src = self.as_float(old)  # requantizing goes through float: exact, rare
            name = self.add_module("quant", quantize_to(qp))
            self.cache[key] = self.graph.call_module(name, (src,))
        return self.cache[key]

    def arg_map(self, arg, convert):
        return fx.node.map_arg(arg, convert)

    def tensor_args(self, node: fx.Node, convert) -> tuple[tuple, dict]:
        """``node``'s arguments with only its tensor input (the first argument, or a
        ``torch.cat`` list) passed through ``convert``; sizes read from a tensor
        (``x.view(x.size(0), -1)``) stay the integers they are."""
        raw = lambda n: self.env[n][0]  # noqa: E731 - an integer has no form to convert
        if node.args:
            first = self.arg_map(node.args[0], convert)
            args = (first, *self.arg_map(node.args[1:], raw))
            return args, self.arg_map(node.kwargs, raw)
        kwargs = {
            k: self.arg_map(v, convert if k in ("input", "tensors") else raw)
            for k, v in node.kwargs.items()
        }
        return (), kwargs

    def emit_group(self, group: Fused) -> None:
        plan = self.plan
        layer = plan.lowered[group.layer.name]
        form = plan.form[group.last]
        out = None if form == FLOAT else form
        unary = unary_attr(plan.gm, group.unary) if group.unary is not None else None
        x = self.as_u8(group.layer.args[0], input_form(layer))
        terms = plan.terms[group.layer.name]
        if len(terms) == 2:  # a codebook as two int8 terms: two kernels, outputs added
            split = SplitLinear if isinstance(layer, nn.Linear) else SplitConv2d
            name = self.add_module(group.layer.target, split(layer, terms, out, unary))
            self.env[group.last] = (self.graph.call_module(name, (x,)), form)
            return
        if group.add is not None:
            self._emit_sum(group, layer, x, out, unary, form)
            return
        post, clamp = clamped_unary(unary, out)  # a narrow output grid clamps in the kernel
        kernel = Int8Linear if isinstance(layer, nn.Linear) else Int8Conv2d
        name = self.add_module(group.layer.target, kernel(layer, out, post))
        y = self.graph.call_module(name, (x,))
        self.env[group.last] = (self._clamp(y, out) if clamp else y, form)

    def _clamp(self, y: fx.Node, form: QParams) -> fx.Node:
        """uint8 codes clamped to a narrow grid's ``lo..hi``."""
        name = self.add_module("clamp", ClampU8(*code_range(form)))
        return self.graph.call_module(name, (y,))

    def _emit_sum(self, group, layer, x, out, unary, form) -> None:
        """Conv + residual sum (+ ReLU): oneDNN takes a uint8 accumulator with a uint8
        output, or a float32 accumulator with a float32 output."""
        _, acc_form = self.env[group.accum]
        if out is not None and acc_form != FLOAT:
            acc, accum, kernel_out = self.env[group.accum][0], acc_form[:2], out
        else:
            acc, accum, kernel_out = self.as_float(group.accum), "float", None
        if acc is x or self._needs_copy(group, acc):  # the kernel must not overwrite x
            acc = self.graph.call_method("clone", (acc,))
        conv = Int8Conv2d(layer, kernel_out, unary, accum=accum)
        name = self.add_module(group.layer.target, conv)
        y = self.graph.call_module(name, (x, acc))
        if kernel_out is None and out is not None:
            self.env[group.last] = (y, FLOAT)
            y = self.as_u8(group.last, out)
        elif kernel_out is not None and len(kernel_out) == 4:  # saturated to 0..255: clamp
            y = self._clamp(y, kernel_out)
        self.env[group.last] = (y, form)

    def _needs_copy(self, group: Fused, acc: fx.Node) -> bool:
        """oneDNN writes the sum into the accumulator: copy it unless nothing reads it later."""
        if acc.op == "placeholder":
            return True
        for user in group.accum.users:
            if user is group.add:
                continue
            owner = self._owner(user)
            if user.op == "output" or (owner not in self.env and owner is not group.last):
                return True
        return False

    def _owner(self, node: fx.Node) -> fx.Node:
        """The node whose emission runs ``node`` (a fused group's last node, or itself)."""
        if node not in self.plan.absorbed:
            return node
        return next(k for k, g in self.plan.groups.items() if node in (g.layer, g.add, g.unary))

    def emit_transparent(self, node: fx.Node) -> None:
        form = self.plan.form[node]
        convert = self.as_float if form == FLOAT else (lambda n: self.as_u8(n, form))
        args, kwargs = self.tensor_args(node, convert)
        if form != FLOAT and unary_attr(self.plan.gm, node) is not None:
            name = self.add_module("relu", ReluU8(form))
            self.env[node] = (self.graph.call_module(name, (args[0],)), form)
            return
        if form != FLOAT and _is_maxpool(self.plan.gm, node):
            pool = module_of(self.plan.gm, node)
            name = self.add_module("maxpool", MaxPoolU8(maxpool_kwargs(pool, args[1:], kwargs)))
            self.env[node] = (self.graph.call_module(name, (args[0],)), form)
            return
        target = "reshape" if node.op == "call_method" and node.target == "view" else node.target
        new = self.graph.create_node(node.op, target, args, kwargs, name=node.name)
        self.env[node] = (new, form)

    def emit_float(self, node: fx.Node) -> None:
        if node.op == "call_method" and node.target in SHAPE_METHODS:
            convert = lambda n: self.env[n][0]  # noqa: E731 - shapes are the same in any form
        else:
            convert = self.as_float
        args = self.arg_map(node.args, convert)
        kwargs = self.arg_map(node.kwargs, convert)
        new = self.graph.create_node(node.op, node.target, args, kwargs, name=node.name)
        self.env[node] = (new, FLOAT)


def _is_maxpool(gm: fx.GraphModule, node: fx.Node) -> bool:
    return isinstance(module_of(gm, node), nn.MaxPool2d) or (
        node.op == "call_function" and node.target is nn.functional.max_pool2d
    )


def lower(plan: Plan) -> fx.GraphModule:
    """The int8 graph of ``plan``: same inputs and outputs as the simulated model."""
    b = _Builder(plan)
    for node in plan.gm.graph.nodes:
        if node in plan.absorbed:
            continue
        if node.op == "placeholder":
            b.env[node] = (b.graph.placeholder(node.target, default_value=node.args[0])
                           if node.args else b.graph.placeholder(node.target), FLOAT)  # fmt: skip
        elif node.op == "output":
            b.graph.output(b.arg_map(node.args[0], b.as_float))
        elif node in plan.groups:
            b.emit_group(plan.groups[node])
        elif node in plan.grids:  # a residual quantizer: the codes its input already has
            b.env[node] = (b.as_u8(node.args[0], plan.grids[node]), plan.grids[node])
        elif node in plan.form:
            b.emit_transparent(node)
        else:
            b.emit_float(node)
    b.graph.lint()
    gm = fx.GraphModule(b.root, b.graph)
    gm.eval()
    return gm
