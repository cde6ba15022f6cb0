"""Where a deployed model diverges: each lowered layer's output against the simulated
model's value at the same point (oneDNN backend)."""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from torch import fx, nn

from compactnn.core.calib import call_model
from compactnn.deployment.onednn import Int8Conv2d, Int8Linear
from compactnn.lowering.graph import Plan
from compactnn.lowering.verify import LayerGap, layer_gap

_LOWERED = re.compile(r"int8_\d+_(.+)")  # lower.py names a lowered layer int8_<n>_<layer>


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
        warnings.warn(f"deploy: could not localise the divergence ({e})", stacklevel=2)
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
