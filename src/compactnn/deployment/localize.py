"""Where a deployed model diverges: each lowered layer's output against the simulated
model's value at the same point (:func:`localize`), and each kernel run alone on the
simulation's own inputs (:func:`isolate`); oneDNN backend."""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from torch import fx, nn

from compactnn.core.calib import call_model
from compactnn.deployment.lowbit import ClampU8, QuantizeGrid, SplitConv2d, SplitLinear
from compactnn.deployment.onednn import CL, Int8Conv2d, Int8Linear, Quantize
from compactnn.deployment.runner import module_call
from compactnn.errors import user_stacklevel
from compactnn.lowering.graph import FLOAT, Fused, Plan, QParams, grid_codes, input_form
from compactnn.lowering.isolated import RUNNER, KernelCheck, kernel_check
from compactnn.lowering.verify import LayerGap, compare, layer_gap

_LOWERED = re.compile(r"int8_\d+_(.+)")  # lower.py names a lowered layer int8_<n>_<layer>
_KERNELS = (Int8Conv2d, Int8Linear, SplitConv2d, SplitLinear)  # one per fused group
_TO_CODES = (Quantize, QuantizeGrid)  # float -> codes (not Dequantize, a Quantize subclass)


def localize(deployed: nn.Module, example: Any) -> list[LayerGap]:
    """Each lowered layer's output against the simulated model's value at the same point
    (``deployed``: a :class:`~compactnn.deployment.api.DeployedModel`).

    oneDNN backend only (the lowered modules of ``deployed.program`` are named
    ``int8_<n>_<layer>`` after the source layer, or carry it as ``source_name``; their
    ``out`` is the uint8 ``(scale, zero)`` they write, None for float): the simulated value
    is taken after the ops fused into the kernel (ReLU, residual sum), and compared as codes
    when the kernel writes uint8, else in steps of the float value's range. Returns ``[]``
    when the model cannot be localised (ONNX Runtime runs its graph as a whole).

    Example:
        >>> [str(g) for g in localize(deployed, images[:8])][:2]  # doctest: +SKIP
        ['stem.0 0 steps (uint8)', 'dw.0 0 steps (uint8)']
    """
    plan: Plan | None = deployed.plan
    if plan is None or "program" not in deployed._modules:
        return []
    program = getattr(deployed.program, "eager", deployed.program)  # inductor: its graph
    try:
        return _localize(plan, program, example)
    except Exception as e:  # a diagnosis must never hide the failure it explains
        warnings.warn(
            f"deploy: could not localise the divergence ({e})", stacklevel=user_stacklevel()
        )
        return []


def _localize(plan: Plan, program: nn.Module, example: Any) -> list[LayerGap]:
    by_target = {str(g.layer.target): g for g in plan.groups.values()}
    groups = {}  # lowered-module hint -> fused group (module names with "." -> "_")
    for g in plan.groups.values():
        groups.setdefault(str(g.layer.target).replace(".", "_"), []).append(g)
    wanted = {}  # lowered module -> its fused group, when the name maps back unambiguously
    for name, mod in program.named_children():
        source = getattr(mod, "source_name", None)  # a lowered layer may name its source
        if isinstance(source, str) and source in by_target and hasattr(mod, "out"):
            wanted[mod] = by_target[source]
            continue
        m = _LOWERED.fullmatch(name)
        if m and isinstance(mod, (Int8Conv2d, Int8Linear)) and len(groups.get(m[1], ())) == 1:
            wanted[mod] = groups[m[1]][0]
    got: list[tuple[nn.Module, torch.Tensor]] = []
    hooks = [
        mod.register_forward_hook(lambda mod, _a, out: got.append((mod, out.detach().clone())))
        for mod in wanted
    ]
    try:
        with torch.no_grad():
            call_model(program, example)
    finally:
        for h in hooks:
            h.remove()
    ref = _node_values(plan.gm, {g.last for g in wanted.values()}, example)
    return [
        layer_gap(str(wanted[mod].layer.target), ref[wanted[mod].last], out, mod.out, i)
        for i, (mod, out) in enumerate(got)
    ]


def _node_values(gm: fx.GraphModule, nodes: set[fx.Node], example: Any) -> dict:
    """The values of ``nodes`` when the simulated graph ``gm`` runs on ``example``."""
    values: dict[fx.Node, torch.Tensor] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if n in nodes:
                values[n] = out.detach().clone()
            return out

    if isinstance(example, dict):
        names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        args = tuple(example[k] for k in names if k in example)
    else:
        args = example if isinstance(example, tuple) else (example,)
    with torch.no_grad():
        Recorder(gm).run(*args)
    return values


def isolate(deployed: nn.Module, example: Any) -> list[KernelCheck] | None:
    """Each lowered kernel of ``deployed`` run alone on the simulated model's own input to its
    layer, against the simulated layer's output (:mod:`compactnn.lowering.isolated`).

    For every fused group (convolution or linear layer with the residual sum and ReLU-like op
    folded into it) the simulated graph's float input to the layer is turned into codes by
    the deployment's own float -> codes conversion when one feeds the kernel (else by the
    simulation's formula: the codes the previous kernel was checked to write), the residual
    operand is the simulation's, and the kernel runs as the deployed model runs it (the
    direct kernels of :mod:`compactnn.deployment.runner` included; a chain the runner fuses
    into one call, e.g. MobileNetV2's expansion, depthwise and projection, is checked as its
    separate kernels). Its output, after the deployment's clamp or requantization, is
    compared on the grid it writes. A last check (named ``RUNNER``) runs the whole deployed
    model against its ``fx`` graph of separate kernels: the runner's fused chains must
    reproduce them (within one output step; bit for bit where measured).

    Returns:
        One :class:`~compactnn.lowering.isolated.KernelCheck` per kernel in forward order, or
        None where kernels cannot be run alone: the ONNX Runtime backend (one session), the
        inductor backend (compiled as a whole), a graph whose kernels do not map one to one
        onto the plan's groups, ``residual="fast"`` sums that read an operand's codes
        where the simulation adds its float value (no simulated layer to compare with), or
        binary blocks (their popcount kernels are verified per block when lowered).
    """
    plan: Plan | None = deployed.plan
    if getattr(deployed, "backend", None) != "onednn" or plan is None:
        return None
    if getattr(deployed, "binary_kernels", None):  # popcount blocks: not run alone here
        return None
    if not isinstance(deployed._modules.get("program"), fx.GraphModule):
        return None
    try:
        checks = _isolate(plan, deployed.program, example)
        runner = deployed.__dict__.get("_fast")
        if checks is None or runner is None:
            return checks
        # the runner's fused calls (a chain of kernels in one pass) against the graph's
        # separate kernels, on the whole model: bit-identical by construction (measured 0.0)
        whole = compare(deployed.program, runner, example, "runner", float("inf"))
        steps = float("inf") if whole.nonfinite_mismatches else whole.max_diff_steps
        return [*checks, KernelCheck(RUNNER, "float", steps, 0.0, 0.0, len(checks))]
    except Exception as e:  # a diagnosis must never hide the failure it explains
        warnings.warn(
            f"deploy: could not check the kernels alone ({e})", stacklevel=user_stacklevel()
        )
        return None


def _isolate(plan: Plan, program: fx.GraphModule, example: Any) -> list[KernelCheck] | None:
    groups = [plan.groups[n] for n in plan.gm.graph.nodes if n in plan.groups]
    kernels = [
        n
        for n in program.graph.nodes
        if n.op == "call_module" and isinstance(program.get_submodule(n.target), _KERNELS)
    ]
    if len(kernels) != len(groups):
        return None
    for node, g in zip(kernels, groups, strict=True):  # emitted in the plan's order
        m = _LOWERED.fullmatch(str(node.target))
        if m is None or m[1] != str(g.layer.target).replace(".", "_"):
            return None
        accum = getattr(program.get_submodule(node.target), "accum", None)
        if accum not in (None, "float") and g.accum not in plan.grids:
            return None  # residual="fast": it adds codes where the simulation adds the float
    wanted = {g.last for g in groups} | {g.layer.args[0] for g in groups}
    ref = _node_values(plan.gm, wanted | {g.accum for g in groups if g.accum is not None}, example)
    checks = []
    with torch.no_grad():
        for i, (node, g) in enumerate(zip(kernels, groups, strict=True)):
            form = plan.form.get(g.last, FLOAT)
            got = _run_alone(plan, program, node, g, ref, form)
            grid = None if form == FLOAT else form
            checks.append(kernel_check(str(g.layer.target), ref[g.last], got, grid, i))
    return checks


def _run_alone(
    plan: Plan, program: fx.GraphModule, node: fx.Node, group: Fused, ref: dict, form: Any
) -> torch.Tensor:
    """The kernel of ``node`` on the simulation's input to ``group``, as the deployment runs
    it, followed by the clamp or requantization that the deployment applies to its output."""
    module = program.get_submodule(node.target)
    x = ref[group.layer.args[0]]
    feed = _module_of(program, node.args[0], _TO_CODES)
    if feed is not None:  # the deployment's own conversion of that float value
        q = module_call(feed)(x)
    else:
        q = _codes(x, input_form(plan.lowered[group.layer.name]))
    args = [q]
    if group.add is not None and len(node.args) > 1:  # the residual operand, as it takes it
        acc = ref[group.accum]
        acc = acc.clone() if module.accum == "float" else _codes(acc, module.accum)
        args.append(acc.contiguous(memory_format=CL) if acc.dim() == 4 else acc)
    y = module_call(module)(*args)
    while form != FLOAT:  # a narrow grid's clamp, a float output's requantization
        kinds = (ClampU8,) if y.dtype == torch.uint8 else _TO_CODES
        after = next((u for u in node.users if _module_of(program, u, kinds) is not None), None)
        if after is None or (
            kinds is _TO_CODES and tuple(_module_of(program, after, kinds).qp) != tuple(form)
        ):
            break
        node = after
        y = module_call(program.get_submodule(node.target))(y)
    return y


def _module_of(program: fx.GraphModule, node: Any, kinds: tuple) -> nn.Module | None:
    """The module ``node`` calls when it is exactly one of ``kinds``, else None."""
    if not isinstance(node, fx.Node) or node.op != "call_module":
        return None
    mod = program.get_submodule(node.target)
    return mod if type(mod) in kinds else None


def _codes(x: torch.Tensor, form: QParams) -> torch.Tensor:
    """The simulation's codes of ``x`` on ``form`` as uint8, channels-last when 4-D."""
    q = grid_codes(x, form).to(torch.uint8)
    return q.contiguous(memory_format=CL) if q.dim() == 4 else q
