"""What channel pruning may touch, traced before anything is removed: the layers whose
outputs are the model's (through autograd), the targeted layers it skips and why, and the
layers ``ChannelConfig.keep_whole`` names (:mod:`compactnn.prune.channel` prunes the rest).
"""

from __future__ import annotations

import contextlib
import fnmatch
import traceback
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from compactnn.core.context import CompressContext
from compactnn.core.modules import check_patterns
from compactnn.errors import CompactnnError
from compactnn.prune.train import output_tensor

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


def user_frame(exc: BaseException) -> str:
    """The innermost frame of the user's model code in ``exc``'s traceback."""
    frames = traceback.extract_tb(exc.__traceback__)
    skip = ("/torch/", "/torch_pruning/", "/compactnn/", "/transformers/")
    user = [f for f in frames if not any(s in f.filename for s in skip)]
    f = (user or frames)[-1]
    return f"{f.filename}:{f.lineno} `{(f.line or '').strip()}`"


def _reachable(root: Any) -> set:
    """Autograd nodes reachable from ``root`` (the output's ``grad_fn``)."""
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(nxt for nxt, _ in getattr(node, "next_functions", ()))
    return seen


@contextlib.contextmanager
def grads_for_tracing(model: nn.Module) -> Iterator[None]:
    """Run the block with grad recording on (under a caller's ``torch.no_grad()`` too) and
    every floating-point parameter of ``model`` requiring grad, then give each parameter, by
    name, the flag it had before.

    The trace follows autograd (``grad_fn``): a layer the user froze, fed by an input that
    needs no grad, records no ``grad_fn`` and falls out of the graph. Flags go back by name
    because pruning replaces a layer's tensors with new (trainable) ones.

    Example:
        >>> m = nn.Linear(2, 2).requires_grad_(False)
        >>> with grads_for_tracing(m):
        ...     m.weight.requires_grad
        True
        >>> m.weight.requires_grad
        False
    """
    if torch.is_inference_mode_enabled():  # its tensors can never record a graph
        raise CompactnnError(
            "channel pruning traces the model through autograd, which torch.inference_mode() "
            "turns off for every tensor made inside it: call compress outside "
            "inference_mode (torch.no_grad() is fine)."
        )
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        if p.is_floating_point() or p.is_complex():
            p.requires_grad_(True)
    try:  # a caller's torch.no_grad() would hide the graph as well
        with torch.enable_grad():
            yield
    finally:
        for n, p in model.named_parameters():
            if n in flags and p.requires_grad != flags[n] and p.is_leaf:
                p.requires_grad_(flags[n])


def output_layers(model: nn.Module, ctx: CompressContext, example: Any) -> list[str]:
    """Weight layers whose output is (part of) the model's output, in run order.

    Their output channels are the model's outputs and cannot be removed. When no layer's
    output reaches the output unchanged, the last weight layer to run is returned.

    Raises:
        CompactnnError: when a layer's output does not reach the model output through
            autograd (the dependency graph cannot be traced past it).
    """
    produced: dict[int, str] = {}
    grad_fns: dict[str, Any] = {}
    hooks = []
    for n, m in model.named_modules():
        if isinstance(m, PRUNABLE):

            def hook(_m, _a, out, n=n):
                produced[id(out)] = n
                grad_fns.setdefault(n, out.grad_fn)

            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.enable_grad(), grads_for_tracing(model):
            out = ctx.run(model, example)
    finally:
        for h in hooks:
            h.remove()
    reachable = _reachable(output_tensor(out).grad_fn)
    broken = [n for n, g in grad_fns.items() if g not in reachable]
    if broken:
        raise CompactnnError(
            f"channel pruning cannot trace the model: the output of {broken[0]!r} does not "
            "reach the model's output through autograd. An operation after it breaks the "
            "graph (.detach(), .numpy(), .item(), argmax, a torch.no_grad block, or an "
            "in-place write to a leaf). Remove it from forward() or prune unstructured."
        )
    outs = out.values() if isinstance(out, dict) else out if isinstance(out, tuple) else [out]
    hits = [produced[id(o)] for o in outs if id(o) in produced]
    return hits or list(grad_fns)[-1:]


def skip_reasons(
    model: nn.Module, targets: dict[str, nn.Module], outputs: list[str]
) -> dict[str, str]:
    """Targeted layers that cannot be pruned structurally, with the reason."""
    reasons = {}
    for name, m in model.named_modules():
        if not isinstance(m, PRUNABLE):
            continue
        if name not in targets:
            reasons[name] = "not targeted by the step"
        elif name in outputs:
            reasons[name] = "its output channels are the model's outputs"
        elif hasattr(m, "weight_codes"):
            reasons[name] = "already quantized (prune channels before quantizing)"
    return reasons


def whole_layers(model: nn.Module, patterns: tuple[str, ...]) -> tuple[str, ...]:
    """The prunable layers ``patterns`` (``ChannelConfig.keep_whole``) name: ``fnmatch``
    patterns, a container's name covering the modules inside it.

    Raises:
        CompactnnError: a pattern matches no module (the message lists close names).

    Example:
        >>> m = nn.Sequential(nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU()), nn.Conv2d(2, 2, 1))
        >>> whole_layers(m, ("0",))
        ('0.0',)
    """
    if not patterns:
        return ()
    check_patterns(model, patterns, "ChannelConfig.keep_whole")
    return tuple(
        n
        for n, m in model.named_modules()
        if isinstance(m, PRUNABLE)
        and any(fnmatch.fnmatchcase(n, p) or fnmatch.fnmatchcase(n, f"{p}.*") for p in patterns)
    )
