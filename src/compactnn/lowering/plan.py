"""Fusion and value forms: the backend-neutral plan of an integer graph (see ``graph.py``)."""

from __future__ import annotations

from torch import fx

from compactnn.core.qlayers import QuantConv2d, is_quant_layer
from compactnn.lowering.graph import (
    ANY,
    FLOAT,
    Fused,
    Plan,
    QParams,
    act_form,
    input_form,
    is_add,
    is_residual_quantizer,
    is_transparent,
    module_of,
    unary_attr,
    unsupported_reason,
    weight_terms,
)

SHAPE_METHODS = ("size", "dim")
RESIDUALS = ("exact", "fast")


def build_plan(gm: fx.GraphModule, residual: str = "exact") -> Plan:
    """Decide which layers run on int8 kernels, how they fuse, and each value's form."""
    plan = Plan(gm=gm, lowered={}, kept={})
    for node in gm.graph.nodes:
        m = module_of(gm, node)
        if m is not None and is_residual_quantizer(m):  # quantize_residuals: uint8 on its grid
            plan.grids[node] = act_form(m)
        if m is None or not is_quant_layer(m):
            continue
        reason = unsupported_reason(m)
        if reason is None:
            plan.lowered[node.name] = m
            plan.terms[node.name] = weight_terms(m)
        else:
            plan.kept[node.target] = reason
    _fuse(plan)
    memo: dict[fx.Node, set] = {}
    for node in gm.graph.nodes:
        if node in plan.grids:
            plan.form[node] = plan.grids[node]
        elif node in plan.groups or (is_transparent(gm, node) and node not in plan.absorbed):
            plan.form[node] = _resolve(_demand(plan, node, residual, memo))
    return plan


def _fuse(plan: Plan) -> None:
    """Group each int8 layer with a residual add and/or a ReLU-like op that only it feeds."""
    gm = plan.gm
    claimed: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.name not in plan.lowered:
            continue
        group = Fused(layer=node)
        users = list(node.users)
        nxt = users[0] if len(users) == 1 else None
        if (
            nxt is not None
            and is_add(nxt)
            and nxt not in claimed
            and isinstance(plan.lowered[node.name], QuantConv2d)
            and len(plan.terms[node.name]) == 1  # a two-term layer adds its halves itself
            and nxt.args[0] is not nxt.args[1]
        ):
            group.add = nxt
            group.accum = nxt.args[1] if nxt.args[0] is node else nxt.args[0]
            claimed.add(nxt)
            after = list(nxt.users)
            if len(after) == 1 and (unary_attr(gm, after[0]) or ("",))[0] == "relu":
                group.unary = after[0]  # oneDNN's sum post-op takes a ReLU after it
        elif nxt is not None and unary_attr(gm, nxt) is not None:
            group.unary = nxt
        plan.groups[group.last] = group
        plan.absorbed.update(n for n in (group.layer, group.add, group.unary) if n is not None)
        plan.absorbed.discard(group.last)


def _demand(plan: Plan, node: fx.Node, residual: str, memo: dict) -> set:
    """The forms that ``node``'s consumers would quantize it to (FLOAT: needs float)."""
    if node in memo:
        return memo[node]
    out: set = set()
    for user in node.users:
        group = plan.groups.get(user)
        if user.name in plan.lowered and user.args and user.args[0] is node:
            out.add(input_form(plan.lowered[user.name]))
        elif user in plan.grids:
            out.add(plan.grids[user])
        elif _is_accum_use(plan, user, node):
            out.add(ANY if residual == "fast" else FLOAT)
        elif user.op == "call_method" and user.target in SHAPE_METHODS:
            continue
        elif is_transparent(plan.gm, user) and user not in plan.absorbed and group is None:
            out |= _demand(plan, user, residual, memo)
        else:
            out.add(FLOAT)
    memo[node] = out
    return out


def _is_accum_use(plan: Plan, user: fx.Node, node: fx.Node) -> bool:
    return any(g.add is user and g.accum is node for g in plan.groups.values())


def _resolve(demand: set) -> QParams | str:
    concrete = demand - {ANY}
    if len(concrete) == 1 and FLOAT not in concrete:
        return next(iter(concrete))
    return FLOAT
