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
from typing import Any, ClassVar

import torch
import torch_pruning as tp
from torch import nn

from compactnn.core.config import MethodConfig
from compactnn.core.context import CompressContext
from compactnn.core.modules import attention_out_projs
from compactnn.errors import CompactnnError, first_line
from compactnn.prune.channel_trace import (
    PRUNABLE,
    grads_for_tracing,
    output_layers,
    skip_reasons,
    user_frame,
    whole_layers,
)
from compactnn.prune.geometry import changed, snapshot
from compactnn.prune.masks import check_sparsity, prunable_layers
from compactnn.prune.shortnames import percent_fraction
from compactnn.prune.stats import model_counts, record_sparsity
from compactnn.prune.train import (
    FINETUNE_HINT_STEPS,
    MIN_AGREEMENT,
    ONE_SHOT_AGREEMENT,
    collapse_words,
    distill_steps,
    output_summary,
    output_tensor,
    warn_if_collapsed,
)
from compactnn.recipe import Recipe, Step
from compactnn.registry import register, register_short_name

IMPORTANCES = ("l1", "l2", "taylor")
COUPLED = "(residual add, concat, shared or grouped conv)"
FIXED_WIDTH_HINT = (  # what to do when the pruned model no longer runs
    "If forward() fixes a width that pruning changed (a stored size such as "
    "self.hidden_dim, or a parameter used outside a layer), keep the layer that sets it "
    "whole (ignore=[NAME], CLI --ignore NAME, or the step's keep_whole); or prune "
    "unstructured (sp50, nm2:4)"
)


@dataclasses.dataclass(frozen=True)
class ChannelConfig(MethodConfig):
    """Structured channel pruning.

    Args:
        ratio: fraction of output channels removed from each prunable group, in [0, 1)
            (0 only with ``heads``); the count kept is rounded down, and every group keeps
            at least one channel (``round_to`` channels when set).
        importance: ``"l1"``, ``"l2"`` (weight norms) or ``"taylor"`` (``|w * grad|`` on the
            calibration batches, with the model's own predictions as labels).
        global_ranking: rank channels across layers instead of within each layer; every
            group still keeps its most important channel (``round_to`` of them when set).
        round_to: keep channel counts multiples of this (e.g. 8 for SIMD-friendly shapes).
        heads: transformers only: fraction of attention heads removed per layer.
        finetune_steps: self-distillation steps on the calibration batches afterwards
            (0: none; the short names ``ch<P>`` do not fine-tune).
        lr: Adam learning rate of that fine-tuning (3e-3: at 1e-4, 200 steps left half the
            channels of mnist-cnn removed at 50% top-1, see docs/pruning.md).
        keep_whole: module names or ``fnmatch`` patterns (a container's name covers its
            children) whose weights keep their whole shape: neither their output nor their
            input channels are removed, so the layers feeding them are not pruned either.
            ``compress(..., ignore=[...])`` and ``--ignore`` add their names here.
    """

    needs_calibration: ClassVar[bool] = True

    ratio: float = 0.3
    importance: str = "l1"
    global_ranking: bool = False
    round_to: int | None = None
    heads: float = 0.0
    finetune_steps: int = 0
    lr: float = 3e-3
    keep_whole: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        check_sparsity(self.ratio, "ratio", "channels")
        check_sparsity(self.heads, "heads", "attention heads")
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


@dataclasses.dataclass
class _Plan:
    """What the dependency graph asks for before anything is removed.

    Attributes:
        keep: layers whose output channels stay, with the reason (torch-pruning ignores them).
        ratios: root layer -> the ratio torch-pruning must use so its group keeps
            :func:`kept_channels` channels (it truncates, and skips a group left empty), or
            the count :func:`pooled_keep` gives it under global ranking.
        floored: global ranking: the layers the one-channel floor saved from being emptied.
        grouped: local ranking: the layers losing the same count in each channel group.
    """

    keep: dict[str, str]
    ratios: dict[nn.Module, float]
    floored: list[str] = dataclasses.field(default_factory=list)
    grouped: list[str] = dataclasses.field(default_factory=list)


def kept_channels(n: int, config: ChannelConfig) -> int:
    """Channels a group of ``n`` keeps: ``floor(n * (1 - ratio))``, but at least one (at
    least ``round_to`` when set), so pruning never grows as the ratio rises.

    Example:
        >>> [kept_channels(16, ChannelConfig(ratio=r)) for r in (0.5, 0.9, 0.97)]
        [8, 1, 1]
    """
    least = config.round_to or 1
    return min(n, max(least, int(n * (1 - config.ratio) + 1e-9)))  # 1e-9: 10 * (1 - 0.9)


def kept_per_channel_group(n: int, config: ChannelConfig) -> int:
    """Channels each channel group of a grouped convolution keeps (``n`` per group): the
    removed count rounded down (a whole channel in every group is a coarse step, and rounding
    the kept count down removed 8 of 16 channels at ratio 0.3), or to the nearest when that
    removes none; at least one (``round_to``) kept.

    Example:
        >>> [kept_per_channel_group(4, ChannelConfig(ratio=r)) for r in (0.3, 0.5, 0.1)]
        [3, 2, 4]
        >>> kept_per_channel_group(2, ChannelConfig(ratio=0.3))
        1
    """
    removed = int(n * config.ratio + 1e-9) or int(n * config.ratio + 0.5)
    return min(n, max(config.round_to or 1, n - removed))


def achieved_notes(widths: dict[str, int], now: dict[str, int], ratio: float) -> list[str]:
    """A note per layer whose share of removed output channels is not the nearest its width
    allows to ``ratio`` (a grouped convolution removes whole channels per group).

    Example:
        >>> achieved_notes({"c1": 16, "fc": 32}, {"c1": 12, "fc": 22}, 0.3)[0][:67]
        'channel pruning: c1 lost 25% of its output channels (4 of 16), not '
    """
    out = []
    for name, before in widths.items():
        after = now.get(name, before)
        removed = before - after
        if 0 < removed != int(before * ratio + 0.5):
            out.append(
                f"channel pruning: {name} lost {removed / before:.0%} of its output channels "
                f"({removed} of {before}), not the {ratio:.0%} asked: grouped convolutions "
                "remove the same count from every channel group"
            )
    return out


def _removed_lowest(imps: list[torch.Tensor], n: int) -> list[int]:
    """How many of each group's channels are among the ``n`` lowest scores pooled (ties by
    position)."""
    sizes = torch.tensor([len(i) for i in imps])
    owner = torch.repeat_interleave(torch.arange(len(imps)), sizes)
    order = torch.argsort(torch.cat(imps).float(), stable=True)[:n]
    return torch.bincount(owner[order], minlength=len(imps)).tolist()


def pooled_keep(
    imps: list[torch.Tensor], ratio: float, least: int = 1
) -> tuple[list[int], list[int]]:
    """Global ranking with a floor: the channels each group keeps when the ``ratio`` share of
    all channels, pooled, is removed lowest score first, each group keeping its ``least``
    best channels (the rest of the budget comes from the other groups; fewer are removed
    only when the floors leave too few); and the groups the floor saved from emptying.

    Example:
        >>> tiny, big = torch.tensor([0.1, 0.2]), torch.arange(1.0, 9.0)
        >>> pooled_keep([tiny, big], 0.5)
        ([1, 4], [0])
    """
    total = sum(len(i) for i in imps)
    n = total - int(total * (1 - ratio) + 1e-9)  # 1e-9: 10 * (1 - 0.9), as kept_channels
    bare = _removed_lowest(imps, n)
    floored = []
    for imp in imps:  # each group's `least` best channels rank above everything
        imp = imp.float().clone()
        imp[torch.topk(imp, min(least, len(imp))).indices] = float("inf")
        floored.append(imp)
    n = min(n, total - sum(min(least, len(i)) for i in imps))
    keep = [len(i) - r for i, r in zip(imps, _removed_lowest(floored, n), strict=True)]
    return keep, [g for g, (i, r) in enumerate(zip(imps, bare, strict=True)) if len(i) - r < least]


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
    per-group ratios that keep the floor of :func:`kept_channels` (local ranking) or give
    each group its count of :func:`pooled_keep` (global ranking)."""
    plan = _Plan({}, {})
    groups = pruner.DG.get_all_groups(
        ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
    )
    pooled: list[tuple[Any, list[str], int, torch.Tensor]] = []
    for group in groups:
        outs, ins, n, ch_groups = _members(pruner, group)
        fed = [names[id(m)] for m in ins if names.get(id(m)) in whole]
        keep = kept_channels(n, config) if ch_groups == 1 else kept_per_channel_group(n, config)
        if fed:
            reason = f"its output channels feed {fed[0]!r}, kept whole ({reasons[fed[0]]})"
        elif keep == n:
            reason = _too_few(n, ch_groups, config)
        elif config.global_ranking and (imp := pruner.estimate_importance(group)) is not None:
            layers = [names[id(m)] for m in outs if id(m) in names]
            pooled.append((group, layers, n, imp.view(ch_groups, -1).mean(0).cpu()))
            continue
        elif config.global_ranking:
            reason = "torch-pruning gives its channel group no importance score"
        else:
            if ch_groups > 1:
                plan.grouped += [names[id(m)] for m in outs if id(m) in names]
            if keep != int(n * (1 - config.ratio)):
                plan.ratios[group[0].dep.target.module] = 1 - (keep + 0.5) / n
            continue
        plan.keep.update({names[id(m)]: reason for m in outs if id(m) in names})
    if pooled:
        counts, saved = pooled_keep([p[3] for p in pooled], config.ratio, config.round_to or 1)
        for (group, layers, n, _), keep in zip(pooled, counts, strict=True):
            if keep == n:
                plan.keep.update(
                    dict.fromkeys(layers, "global ranking removed none of its channels")
                )
            else:
                plan.ratios[group[0].dep.target.module] = 1 - (keep + 0.5) / n
        floored = {name for g in saved for name in pooled[g][1]}
        plan.floored = [name for name in names.values() if name in floored]  # model order
    return plan


def untraced_reason(name: str, owners: dict[str, str]) -> str:
    """Why a layer that torch-pruning's dependency graph never saw called keeps its channels;
    ``owners``: :func:`~compactnn.core.modules.attention_out_projs` of the model.

    Example:
        >>> untraced_reason("fc", {})
        'the model never calls it (its weight is read directly): torch-pruning cannot trace it'
    """
    if name in owners:
        return (
            f"out_proj of nn.MultiheadAttention {owners[name]!r}, which reads its weight and "
            "never calls it: its outputs are the attention's embed_dim, removed only with the "
            "channels of the stream the attention feeds"
        )
    return "the model never calls it (its weight is read directly): torch-pruning cannot trace it"


def _unpruned_reason(pruner: Any, module: nn.Module, names: dict[int, str], reasons: dict) -> str:
    """Why torch-pruning left a targeted layer's output channels whole: the layer not pruned
    that its channel group is coupled to, else a coupling the library refuses."""
    dg = pruner.DG
    if module not in dg.module2node:  # never called: the graph has no node to ask
        return untraced_reason(names[id(module)], attention_out_projs(pruner.model))
    fn = dg.get_pruner_of_module(module).prune_out_channels
    group = dg.get_pruning_group(module, fn, list(range(dg.get_out_channels(module))))
    for dep, _ in group:
        m = dep.target.module
        if dg.is_out_channel_pruning_fn(dep.handler) and names.get(id(m)) in reasons:
            other = names[id(m)]
            return f"its channels are coupled {COUPLED} to {other!r}, not pruned ({reasons[other]})"
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
        global_pruning=False,  # global ranking is ours (pooled_keep), passed on as ratios
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

    Layers not in ``targets`` keep their output channels; layers named in ``whole`` keep
    their whole shape: their output channels and their input channels (the layers feeding
    them are not pruned either).
    """
    example = ctx.batches[0]
    outputs = output_layers(model, ctx, example)
    reasons = skip_reasons(model, targets, outputs)
    names = {id(m): n for n, m in model.named_modules() if isinstance(m, PRUNABLE)}
    widths = {n: m.weight.shape[0] for n, m in model.named_modules() if isinstance(m, PRUNABLE)}
    for name in whole:
        if name in widths:
            reasons.setdefault(name, "named in keep_whole")
    try:
        if config.importance == "taylor":  # before planning: global ranking reads them
            _taylor_grads(model, ctx)
        pruner = _pruner(model, config, ctx, [model.get_submodule(n) for n in reasons], {})
        plan = _plan(pruner, names, reasons, set(whole) & set(reasons), config)
        if plan.keep or plan.ratios:  # trace again with the extra ignored layers and ratios
            reasons.update(plan.keep)
            ignored = [model.get_submodule(n) for n in reasons]
            pruner = _pruner(model, config, ctx, ignored, plan.ratios)
        if plan.floored:
            least = config.round_to or 1
            cut = (
                f"leave fewer than {least} channels in" if least > 1 else "remove every channel of"
            )
            best = f"its {least} best channels" if least > 1 else "its best channel"
            ctx.warn(
                f"global channel ranking at {config.ratio:.0%} would {cut} "
                f"{', '.join(plan.floored)}; each keeps {best} (the rest of the budget comes "
                "from the other layers)."
            )
        pruner.step()
        with torch.no_grad():
            ctx.run(model, example)
    except CompactnnError:
        raise
    except Exception as exc:
        raise CompactnnError(
            f"channel pruning cannot trace or prune the model at {user_frame(exc)}: "
            f"{type(exc).__name__}: {first_line(exc)}. {FIXED_WIDTH_HINT}"
        ) from exc
    model.zero_grad(set_to_none=True)
    now = {n: m.weight.shape[0] for n, m in model.named_modules() if isinstance(m, PRUNABLE)}
    grouped = {n: w for n, w in widths.items() if n in set(plan.grouped) & set(targets)}
    ctx.notes.extend(achieved_notes(grouped, now, config.ratio))
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
    reads_batches = config.importance == "taylor" or config.finetune_steps  # more than a trace
    ctx.require_calibration(
        "channel pruning (an example input traces the graph)", 32 if reads_batches else 1
    )
    counts = model_counts(model, ctx)  # params and MACs before, for the record
    before = snapshot(model)
    reference = output_summary(model, ctx)  # the unpruned outputs, for the collapse check
    teacher = copy.deepcopy(model) if config.finetune_steps else None
    from compactnn.prune.heads import is_hf_transformer, prune_transformer

    if is_hf_transformer(model):
        prune_transformer(model, targets, config, ctx)
    else:
        prunable_layers(targets)  # refuses a step whose every layer an earlier step quantized
        whole = whole_layers(model, config.keep_whole)
        with grads_for_tracing(model):  # a frozen layer is traced like a trainable one
            skipped = remove_channels(model, targets, config, ctx, whole=whole)
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
    least = MIN_AGREEMENT if config.finetune_steps else ONE_SHOT_AGREEMENT  # one-shot: as nm
    warn_if_collapsed(model, reference, ctx, *_collapse_words(config), min_agreement=least)
    return model


def _collapse_words(config: ChannelConfig) -> tuple[str, str]:
    """The collapse warning's words for a channel step (:func:`collapse_words`)."""
    r, h, steps, importance = config.ratio, config.heads, config.finetune_steps, config.importance
    cut = {k: v for k, v in (("ratio", r), ("heads", h)) if v}
    fields = {**cut, "importance": importance} if importance != "l1" else dict(cut)
    fields["finetune_steps"] = max(2 * steps, FINETUNE_HINT_STEPS)
    fewer = [f"remove fewer channels (e.g. {f'ch{round(50 * r)}' if r else f'heads: {h / 2:g}'})"]
    if r and not h and not steps:  # the short name's fine-tuned form
        suffix = "" if importance == "l1" else f"-{importance}"
        fewer.insert(0, f"self-distil after pruning (ch{round(100 * r)}{suffix}-ft)")
    settings = [*(f"{k} {v:g}" for k, v in cut.items()), f"{importance} importance"]
    return collapse_words("channel", settings, steps, config.lr, fewer, fields)


SHORT_FT_STEPS = 1000  # `-ft`: 97.8% on mnist-cnn at ch50, lr 3e-3 (docs/pruning.md)


@register_short_name(
    r"ch(?P<p>\d+)(?:-(?P<imp>l1|l2|taylor))?(?P<ft>-ft)?",
    "ch<P>[-l1|-l2|-taylor][-ft]",
    ("ch30", "ch50-taylor", "ch50-ft"),
)
def _short_name(m: re.Match[str]) -> Recipe:
    """``ch50``: one-shot; ``-ft``: then :data:`SHORT_FT_STEPS` self-distillation steps on
    the calibration batches at the default lr."""
    config = ChannelConfig(
        ratio=percent_fraction(m["p"], m.string),
        importance=m["imp"] or "l1",
        finetune_steps=SHORT_FT_STEPS if m["ft"] else 0,
    )
    return Recipe(m.string, (Step("channel", config),))
