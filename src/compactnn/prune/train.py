"""Training loops the pruning methods share.

``distill_steps`` recovers accuracy inside :func:`compactnn.compress` without labels: the
pruned model learns to reproduce the float model's outputs on the calibration batches (a
self-distillation loss), while a callback updates masks on the method's schedule.
``finetune`` is the labelled loop for users who bring their own data; pass any pruner with a
``step()`` method (gradual, DNS) or none to keep the current zeros fixed.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from compactnn.core.calib import main_output
from compactnn.core.context import CompressContext
from compactnn.distill.kd import DistillationLoss
from compactnn.errors import CompactnnError
from compactnn.prune.masks import attach_masks, bake_masks, zero_masks

output_tensor = main_output  # the main tensor of a model output


def distill_steps(
    student: nn.Module,
    teacher: nn.Module,
    ctx: CompressContext,
    steps: int,
    lr: float,
    on_step: Callable[[int], None] | None = None,
    desc: str = "fine-tune",
) -> None:
    """Train ``student`` for ``steps`` Adam steps to match ``teacher``'s outputs (MSE) on the
    calibration batches, cycling through them. ``on_step(i)`` runs after each update.

    Batch norm and dropout stay in eval mode: calibration sets are small, and re-estimating
    running statistics on a few batches would cost more accuracy than it buys.
    """
    if steps <= 0:
        return
    ctx.require_calibration(desc, 64)
    teacher.eval()
    with torch.no_grad():
        targets = [output_tensor(ctx.run(teacher, b)).detach() for b in ctx.batches]
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    student.eval()
    for i in ctx.bar(range(steps), desc=desc, leave=False):
        k = i % len(ctx.batches)
        loss = nn.functional.mse_loss(output_tensor(ctx.run(student, ctx.batches[k])), targets[k])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step is not None:
            on_step(i)


def finetune(
    model: nn.Module,
    loader: Iterable,
    epochs: int = 1,
    lr: float = 1e-3,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    pruner: Any = None,
) -> nn.Module:
    """Fine-tune ``model`` in place on ``(inputs, labels)`` batches, keeping its sparsity.

    ``loss_fn(outputs, labels)`` (default: cross entropy), or a loss that also needs the
    inputs, called ``loss_fn(outputs, inputs, labels)``: a
    :class:`~compactnn.distill.DistillationLoss` (distil from the float model while
    fine-tuning) or any callable with three required positional parameters.

    Without ``pruner`` the current zeros of every weight layer are frozen as masks (zero
    weights stay exactly zero); with a pruner (``GradualPruner``, ``DNSPruner``) its ``step()``
    runs after each optimizer step and it owns the masks. Masks are baked at the end.

    Example:
        >>> from compactnn.prune.train import finetune
        >>> sparse = compactnn.compress(model, "sp90")          # doctest: +SKIP
        >>> finetune(sparse, train_loader)                      # doctest: +SKIP
    """
    loss_fn = loss_fn or nn.functional.cross_entropy
    with_inputs = wants_inputs(loss_fn)
    if pruner is None:
        attach_masks(model, {n: m for n, m in zero_masks(model).items() if m.min() == 0})
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(epochs):
        for batch in loader:
            if not _is_pair(batch):
                bake_masks(model)  # leave no mask attached behind the refusal
                model.eval()
                raise CompactnnError(_pair_message(batch))
            x, y = batch
            loss = loss_fn(model(x), x, y) if with_inputs else loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if pruner is not None:
                pruner.step()
    model.eval()
    if pruner is not None and hasattr(pruner, "finish"):
        pruner.finish()
    bake_masks(model)
    return model


def wants_inputs(loss_fn: Callable[..., torch.Tensor]) -> bool:
    """Whether ``loss_fn`` is called ``(outputs, inputs, labels)``: a ``DistillationLoss`` (its
    teacher runs on the inputs) or a callable with three required positional parameters.

    Example:
        >>> wants_inputs(nn.functional.cross_entropy), wants_inputs(lambda out, x, y: out.sum())
        (False, True)
    """
    if isinstance(loss_fn, DistillationLoss):
        return True
    try:
        params = inspect.signature(loss_fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: (outputs, labels)
        return False
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in kinds and p.default is inspect.Parameter.empty for p in params) >= 3


def _is_pair(batch: Any) -> bool:
    return isinstance(batch, (tuple, list)) and len(batch) == 2


def _pair_message(batch: Any) -> str:
    """Why ``finetune`` refuses ``batch``: it needs ``(inputs, labels)`` pairs.

    Example:
        >>> _pair_message(torch.zeros(8, 3))[:71]
        'finetune needs (inputs, labels) batches, got a Tensor of shape (8, 3): '
    """
    got = type(batch).__name__
    if isinstance(batch, torch.Tensor):
        got = f"a Tensor of shape {tuple(batch.shape)}"
    elif isinstance(batch, (tuple, list)):
        got = f"a {got} of {len(batch)} item(s)"
    return (
        f"finetune needs (inputs, labels) batches, got {got}: pass e.g. a DataLoader of a "
        "TensorDataset(x, y), or [(x, y)]; without labels, self-distil instead (e.g. recipe "
        "sp50-gradual or ch50-ft with calibration data)."
    )


# An output whose spread across samples falls below this share of the float model's has
# lost its dependence on the input (a collapsed model answers alike for every sample).
COLLAPSE_SPREAD = 0.05
# A classifier whose argmax agrees with the float model's on fewer calibration samples than
# this has drifted too far to ship unnoticed (self-distillation did not recover it).
MIN_AGREEMENT = 0.5
# A one-shot step (nothing trained) that changes more predictions than this has a cheap
# remedy, its fine-tuned form: nm2:4 on mnist-cnn agrees on 52.5% of the calibration samples
# (52.3% top-1; nm2:4-ft: 98.4%, docs/pruning.md), sp30 and nm2:4-sparsegpt on over 99%.
ONE_SHOT_AGREEMENT = 0.9
# What the collapse warnings suggest for self-distillation (docs/pruning.md,
# "Self-distillation defaults").
FINETUNE_HINT_STEPS = 1000
FINETUNE_HINT_LR = 3e-3
_MAX_SPREAD_FEATURES = 1 << 16  # wider outputs (LM logits) are judged by their argmax only


def output_summary(model: nn.Module, ctx: CompressContext) -> dict[str, Any]:
    """What the collapse check compares, over the calibration batches: ``classes``, the set
    of argmax classes (``None`` unless the outputs are ``(N, C)`` or ``(N, T, C)`` scores
    with ``C > 1``); ``argmax``, every sample's class (``(N, C)`` outputs only, else
    ``None``); ``spread``, the per-feature standard deviation across samples averaged over
    the features (``None`` when outputs are too wide, vary in shape, or hold fewer than 2
    samples or non-finite values); ``samples``, the number of samples."""
    classes: set[int] | None = set()
    argmax: list[torch.Tensor] | None = []
    n, total, squares, shape = 0, None, None, None
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in ctx.batches:
            out = output_tensor(ctx.run(model, batch)).detach().float()
            scores = out.dim() in (2, 3) and out.shape[-1] > 1
            if classes is not None and scores:
                classes |= set(out.argmax(-1).unique().tolist())
            else:
                classes = None
            if argmax is not None and scores and out.dim() == 2:
                argmax.append(out.argmax(-1))
            else:
                argmax = None
            flat = out.reshape(out.shape[0], -1).double()
            if shape is None:
                shape, total, squares = flat.shape[1:], flat.sum(0), (flat**2).sum(0)
            elif flat.shape[1:] == shape and total is not None:
                total, squares = total + flat.sum(0), squares + (flat**2).sum(0)
            else:
                total = None
            n += flat.shape[0]
    model.train(was_training)
    spread = None
    if total is not None and n >= 2 and shape.numel() <= _MAX_SPREAD_FEATURES:
        var = (squares - total**2 / n).clamp(min=0) / (n - 1)
        value = float(var.sqrt().mean())
        spread = value if math.isfinite(value) else None
    argmax = torch.cat(argmax) if argmax else None
    return {"classes": classes, "argmax": argmax, "spread": spread, "samples": n}


def collapse_reason(
    pruned: dict[str, Any], reference: dict[str, Any], min_agreement: float = MIN_AGREEMENT
) -> str | None:
    """Why ``pruned``'s outputs count as collapsed against ``reference``'s (both from
    :func:`output_summary`), or ``None``: one argmax class where the reference has several,
    a spread below ``COLLAPSE_SPREAD`` of the reference's, or (classifiers) an argmax that
    agrees with the reference's on fewer than ``min_agreement`` of the samples."""
    reasons = []
    got, want = pruned["classes"], reference["classes"]
    if got is not None and want is not None and len(got) == 1 and len(want) > 1:
        reasons.append(
            f"it predicts class {next(iter(got))} for all {pruned['samples']} calibration "
            f"samples, where the float model predicts {len(want)} classes"
        )
    got, want = pruned["spread"], reference["spread"]
    if got is not None and want is not None and want > 0 and got < COLLAPSE_SPREAD * want:
        reasons.append(
            f"its outputs' spread across samples is {got / want:.1%} of the float model's "
            f"({got:.3g} against {want:.3g})"
        )
    got, want = pruned.get("argmax"), reference.get("argmax")
    if got is not None and want is not None and got.shape == want.shape and len(want):
        agree = float((got == want).float().mean())
        if agree < min_agreement:
            reasons.append(
                f"its argmax agrees with the float model's on {agree:.1%} of the "
                f"{len(want)} calibration samples (top-1 may fall by up to "
                f"{100 * (1 - agree):.1f} points)"
            )
    return "; ".join(reasons) or None


def warn_if_collapsed(
    model: nn.Module,
    reference: dict[str, Any],
    ctx: CompressContext,
    what: str,
    way_out: str,
    min_agreement: float = MIN_AGREEMENT,
) -> bool:
    """Warn (and note) when ``model``'s outputs on the calibration batches have collapsed
    against ``reference`` (the unpruned model's :func:`output_summary`), as
    :func:`collapse_reason` judges; ``what`` and ``way_out`` from :func:`collapse_words`."""
    if not ctx.batches:
        return False
    reason = collapse_reason(output_summary(model, ctx), reference, min_agreement)
    if reason is None:
        return False
    ctx.warn(
        f"{what}: the pruned model's outputs have collapsed or drifted far from the float "
        f"model's: {reason}. {way_out}"
    )
    return True


def collapse_words(
    method: str,
    settings: Sequence[str],
    steps: int | str,
    lr: float,
    ways: Sequence[str],
    fields: dict[str, Any] | None = None,
    pruner: str = "",
) -> tuple[str, str]:
    """The step and the way out of :func:`warn_if_collapsed`: the step is named by its
    ``settings`` and training (``steps`` self-distillation steps at Adam ``lr``, 0: one-shot);
    the way out lists ``ways``, the YAML config ``fields`` with an lr of at least
    ``FINETUNE_HINT_LR`` (when given), then labelled fine-tuning (with ``pruner``)."""
    how = "one-shot, no fine-tuning"
    if steps:
        how = f"{steps} self-distillation steps at Adam lr {lr:g}"
    ways = list(ways)
    if fields is not None:
        fields = {**fields, "lr": max(lr, FINETUNE_HINT_LR)}
        config = ", ".join(f"{k}: {v}" for k, v in fields.items())
        train = "give more steps or a higher lr" if steps else "fine-tune"
        ways.append(f"{train} in a YAML recipe (method: {method}, config: {{{config}}})")
    ways.append(f"fine-tune with labels (compactnn.prune.train.finetune{pruner})")
    way_out = ", ".join(ways[:-1]) + ", or " + ways[-1] + "."
    return f"{method} step ({', '.join([*settings, how])})", way_out[0].upper() + way_out[1:]
