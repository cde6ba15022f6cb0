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
COUPLED = "(residual add, concat, shared or grouped conv)"


@dataclasses.dataclass(frozen=True)
class ChannelConfig(MethodConfig):
    """Structured channel pruning.

    Args:
        ratio: fraction of output channels removed from each prunable group, in [0, 1)
            (0 only with ``heads``); the count kept is rounded down, and every group keeps
            at least one channel (``round_to`` channels when set).
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
        if self.ratio == 0 and self.heads == 0:
            raise CompactnnError(
                "ChannelConfig(ratio=0, heads=0) removes nothing: give the fraction of channels "
                "to remove, in (0, 1), e.g. ratio=0.3 (short name ch30)."
            )


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


@dataclasses.dataclass
class _Plan:
    """What the dependency graph asks for before anything is removed.

    Attributes:
        keep: layers whose output channels stay, with the reason (torch-pruning ignores them).
        ratios: root layer -> the ratio torch-pruning must use so its group keeps
            :func:`kept_channels` channels (it truncates, and skips a group left empty).
    """

    keep: dict[str, str]
    ratios: dict[nn.Module, float]


def kept_channels(n: int, config: ChannelConfig) -> int:
    """Channels a group of ``n`` keeps: ``floor(n * (1 - ratio))``, but at least one (at
    least ``round_to`` when set), so pruning never grows as the ratio rises.

    Example:
        >>> [kept_channels(16, ChannelConfig(ratio=r)) for r in (0.5, 0.9, 0.97)]
        [8, 1, 1]
    """
    least = config.round_to or 1
    return min(n, max(least, int(n * (1 - config.ratio) + 1e-9)))  # 1e-9: 10 * (1 - 0.9)


def _members(pruner: Any, group: Any) -> tuple[list[nn.Module], list[nn.Module], int, int]:
    """A group's layers losing output channels, those losing inputs, its channel count
    (per channel group) and the number of channel groups (grouped convs), as torch-pruning
    ranks them."""
    dg, outs, ins, ch_groups = pruner.DG, [], [], 1
    for dep, _ in group:
        m = dep.target.module
        if dg.is_out_channel_pruning_fn(dep.handler):
            outs.append(m)
            ch_groups = max(ch_groups, pruner.out_channel_groups.get(m, 1))
        elif dg.is_in_channel_pruning_fn(dep.handler):
            ins.append(m)
            ch_groups = max(ch_groups, pruner.in_channel_groups.get(m, 1))
    return outs, ins, dg.get_out_channels(group[0].dep.target.module) // ch_groups, ch_groups


def _too_few(n: int, ch_groups: int, config: ChannelConfig) -> str:
    per = f" in each of {ch_groups} channel groups (grouped convolution)" if ch_groups > 1 else ""
    if config.round_to and n <= config.round_to:
        return f"it has {n} channels{per}, no more than round_to={config.round_to}"
    return f"ratio {config.ratio:g} removes none of its {n} channels{per}"


def _plan(
    pruner: Any,
    names: dict[int, str],
    reasons: dict[str, str],
    whole: set[str],
    config: ChannelConfig,
) -> _Plan:
    """Groups to leave whole (they feed a layer in ``whole``, or are too small) and the
    per-group ratios that keep the floor of :func:`kept_channels` (local ranking only)."""
    plan = _Plan({}, {})
    groups = pruner.DG.get_all_groups(
        ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
    )
    for group in groups:
        outs, ins, n, ch_groups = _members(pruner, group)
        fed = [names[id(m)] for m in ins if names.get(id(m)) in whole]
        keep = kept_channels(n, config)
        if fed:
            reason = f"its output channels feed {fed[0]!r}, kept whole ({reasons[fed[0]]})"
        elif keep == n:
            reason = _too_few(n, ch_groups, config)
        elif not config.global_ranking and keep != int(n * (1 - config.ratio)):
            plan.ratios[group[0].dep.target.module] = 1 - (keep + 0.5) / n
            continue
        else:
            continue
        plan.keep.update({names[id(m)]: reason for m in outs if id(m) in names})
    return plan


def _unpruned_reason(pruner: Any, module: nn.Module, names: dict[int, str], reasons: dict) -> str:
    """Why torch-pruning left a targeted layer's output channels whole: the layer not pruned
    that its channel group is coupled to, else what is left (global ranking, a coupling the
    library refuses)."""
    dg = pruner.DG
    fn = dg.get_pruner_of_module(module).prune_out_channels
    group = dg.get_pruning_group(module, fn, list(range(dg.get_out_channels(module))))
    for dep, _ in group:
        m = dep.target.module
        if dg.is_out_channel_pruning_fn(dep.handler) and names.get(id(m)) in reasons:
            other = names[id(m)]
            return f"its channels are coupled {COUPLED} to {other!r}, not pruned ({reasons[other]})"
    if pruner.global_pruning:
        return "global ranking removed none of its channels, or all (a group is never emptied)"
    return f"torch-pruning refused to prune its channel group {COUPLED}"


def _pruner(
    model: nn.Module, config: ChannelConfig, ctx: CompressContext, ignored: list, ratios: dict
) -> Any:
    return tp.pruner.MetaPruner(
        model,
        ctx.batches[0],
        importance=_importance(config),
        pruning_ratio=config.ratio,
        pruning_ratio_dict=ratios or None,
        global_pruning=config.global_ranking,
        ignored_layers=ignored,
        round_to=config.round_to,
        forward_fn=lambda m, x: ctx.run(m, x),
        output_transform=output_tensor,
    )


def remove_channels(
    model: nn.Module,
    targets: dict[str, nn.Module],
    config: ChannelConfig,
    ctx: CompressContext,
    whole: tuple[str, ...] = (),
) -> dict[str, str]:
    """Prune ``model`` in place; returns the skipped layers with reasons.

    Layers not in ``targets`` keep their output channels; layers named in ``whole`` (among
    those) keep their input channels too: the layers feeding them are not pruned either.
    """
    example = ctx.batches[0]
    outputs = output_layers(model, ctx, example)
    reasons = _skip_reasons(model, targets, outputs)
    names = {id(m): n for n, m in model.named_modules() if isinstance(m, PRUNABLE)}
    widths = {n: m.weight.shape[0] for n, m in model.named_modules() if isinstance(m, PRUNABLE)}
    try:
        pruner = _pruner(model, config, ctx, [model.get_submodule(n) for n in reasons], {})
        plan = _plan(pruner, names, reasons, set(whole) & set(reasons), config)
        if plan.keep or plan.ratios:  # trace again with the extra ignored layers and ratios
            reasons.update(plan.keep)
            ignored = [model.get_submodule(n) for n in reasons]
            pruner = _pruner(model, config, ctx, ignored, plan.ratios)
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
    kept = dict(reasons)  # the layers torch-pruning was told to keep: what a group can blame
    for name, m in model.named_modules():
        if name in targets and name not in kept and isinstance(m, PRUNABLE):
            if m.weight.shape[0] == widths.get(name):
                reasons[name] = _unpruned_reason(pruner, m, names, kept)
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
        steps, lr = config.finetune_steps, config.lr
        distill_steps(model, teacher, ctx, steps, lr, desc="channel fine-tune")
    record_sparsity(ctx, "channel", {}, model, counts)
    return model


@register_short_name(
    r"ch(?P<p>\d+)(?:-(?P<imp>l1|l2|taylor))?", "ch<P>[-l1|-l2|-taylor]", ("ch30", "ch50-taylor")
)
def _short_name(m: re.Match[str]) -> Recipe:
    config = ChannelConfig(ratio=percent_fraction(m["p"], m.string), importance=m["imp"] or "l1")
    return Recipe(m.string, (Step("channel", config),))
