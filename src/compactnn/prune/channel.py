"""Structured channel pruning that physically removes channels (torch-pruning underneath).

Channels are ranked by L1 or L2 norm of their weights, or by first-order Taylor importance
``|w * dL/dw|``, and removed from the weights: convolutions, linear layers and batch norms
really shrink, so parameters, MACs and (usually) latency fall. The dependency graph of
torch-pruning (Fang et al., CVPR 2023) keeps coupled layers consistent: both sides of a
residual add, the inputs of a concatenation, depthwise and grouped convolutions, and the
batch norms that follow them. We use it rather than writing our own because tracing every
coupling correctly is the hard part, and that library is well kept and tested on hundreds
of architectures. Hugging Face transformers take another path (attention heads and MLP
widths, see :mod:`compactnn.prune.heads`).
"""

from __future__ import annotations

import copy
import dataclasses
import re
import traceback
from typing import Any, ClassVar

import torch
import torch_pruning as tp
from torch import nn

from compactnn.core.config import MethodConfig
from compactnn.core.context import CompressContext
from compactnn.errors import CompactnnError
from compactnn.prune.geometry import changed, snapshot
from compactnn.prune.masks import check_sparsity
from compactnn.prune.shortnames import percent_fraction
from compactnn.prune.stats import model_counts, record_sparsity
from compactnn.prune.train import distill_steps, output_tensor
from compactnn.recipe import Recipe, Step
from compactnn.registry import register, register_short_name

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)
IMPORTANCES = ("l1", "l2", "taylor")


@dataclasses.dataclass(frozen=True)
class ChannelConfig(MethodConfig):
    """Structured channel pruning.

    Args:
        ratio: fraction of output channels removed from each prunable group, in [0, 1).
        importance: ``"l1"``, ``"l2"`` (weight norms) or ``"taylor"`` (``|w * grad|`` on the
            calibration batches, with the model's own predictions as labels).
        global_ranking: rank channels across layers instead of within each layer.
        round_to: keep channel counts multiples of this (e.g. 8 for SIMD-friendly shapes).
        heads: transformers only: fraction of attention heads removed per layer.
        finetune_steps: self-distillation steps on the calibration batches afterwards.
        lr: Adam learning rate of that fine-tuning.
    """

    needs_calibration: ClassVar[bool] = True

    ratio: float = 0.3
    importance: str = "l1"
    global_ranking: bool = False
    round_to: int | None = None
    heads: float = 0.0
    finetune_steps: int = 0
    lr: float = 1e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_sparsity(self.ratio, "ratio")
        check_sparsity(self.heads, "heads")
        if self.importance not in IMPORTANCES:
            raise CompactnnError(
                f"ChannelConfig.importance={self.importance!r}; use one of {IMPORTANCES}."
            )
        if self.round_to is not None and self.round_to < 1:
            raise CompactnnError(f"ChannelConfig.round_to={self.round_to} must be >= 1.")


def _where(exc: BaseException) -> str:
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
        with torch.enable_grad():
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


def _taylor_grads(model: nn.Module, ctx: CompressContext) -> None:
    """Accumulate gradients of a label-free loss (own predictions as labels) for Taylor."""
    model.zero_grad(set_to_none=True)
    for b in ctx.batches[:4]:
        out = output_tensor(ctx.run(model, b))
        if out.dim() == 2:
            loss = nn.functional.cross_entropy(out, out.detach().argmax(-1))
        else:
            loss = out.pow(2).mean()
        loss.backward()


def _importance(config: ChannelConfig) -> tp.importance.Importance:
    if config.importance == "taylor":
        return tp.importance.GroupTaylorImportance()
    return tp.importance.GroupMagnitudeImportance(p=1 if config.importance == "l1" else 2)


def _skip_reasons(
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


def remove_channels(
    model: nn.Module, targets: dict[str, nn.Module], config: ChannelConfig, ctx: CompressContext
) -> dict[str, str]:
    """Prune ``model`` in place; returns the skipped layers with reasons."""
    example = ctx.batches[0]
    outputs = output_layers(model, ctx, example)
    reasons = _skip_reasons(model, targets, outputs)
    ignored = [model.get_submodule(n) for n in reasons]
    widths = {n: m.weight.shape[0] for n, m in model.named_modules() if isinstance(m, PRUNABLE)}
    try:
        pruner = tp.pruner.MetaPruner(
            model,
            example,
            importance=_importance(config),
            pruning_ratio=config.ratio,
            global_pruning=config.global_ranking,
            ignored_layers=ignored,
            round_to=config.round_to,
            forward_fn=lambda m, x: ctx.run(m, x),
            output_transform=output_tensor,
        )
        if config.importance == "taylor":
            _taylor_grads(model, ctx)
        pruner.step()
        with torch.no_grad():
            ctx.run(model, example)
    except CompactnnError:
        raise
    except Exception as exc:
        raise CompactnnError(
            f"channel pruning cannot trace or prune the model at {_where(exc)}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    model.zero_grad(set_to_none=True)
    for name, m in model.named_modules():
        if name in targets and name not in reasons and isinstance(m, PRUNABLE):
            if m.weight.shape[0] == widths.get(name) and round(widths[name] * config.ratio):
                reasons[name] = (
                    "its channels are coupled (residual add, concat, grouped conv) to a layer "
                    "that cannot be pruned"
                )
            elif m.weight.shape[0] == widths.get(name):
                reasons[name] = f"too few channels ({widths[name]}) to remove at this ratio"
    return {n: r for n, r in reasons.items() if n in targets}


@register("channel", ChannelConfig, "structured channel pruning that removes channels")
def apply_channel(
    model: nn.Module, targets: dict[str, nn.Module], config: ChannelConfig, ctx: CompressContext
) -> nn.Module:
    """Remove the least important channels (and their batch norms and inputs downstream)."""
    ctx.require_calibration("channel pruning (an example input traces the graph)", 1)
    counts = model_counts(model, ctx)  # params and MACs before, for the record
    before = snapshot(model)
    teacher = copy.deepcopy(model) if config.finetune_steps else None
    from compactnn.prune.heads import is_hf_transformer, prune_transformer

    if is_hf_transformer(model):
        prune_transformer(model, targets, config, ctx)
    else:
        skipped = remove_channels(model, targets, config, ctx)
        ctx.skipped.update({n: f"channel pruning skipped it ({r})" for n, r in skipped.items()})
        if skipped:
            ctx.warn(
                "channel pruning skipped: " + "; ".join(f"{n} ({r})" for n, r in skipped.items())
            )
    ctx.extra.setdefault("resized", {}).update(changed(before, snapshot(model)))
    if teacher is not None:
        distill_steps(model, teacher, ctx, config.finetune_steps, config.lr, "channel fine-tune")
    record_sparsity(ctx, "channel", {}, model, counts)
    return model


@register_short_name(
    r"ch(?P<p>\d+)(?:-(?P<imp>l1|l2|taylor))?", "ch<P>[-l1|-l2|-taylor]", ("ch30", "ch50-taylor")
)
def _short_name(m: re.Match[str]) -> Recipe:
    config = ChannelConfig(ratio=percent_fraction(m["p"], m.string), importance=m["imp"] or "l1")
    return Recipe(m.string, (Step("channel", config),))
