"""Counting what pruning saves: parameters, non-zeros and multiply-accumulates."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compactnn.core.calib import call_model
from compactnn.core.context import CompressContext


def count_params(model: nn.Module) -> int:
    """Number of parameters (every tensor in ``model.parameters()``)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example: Any) -> int:
    """Multiply-accumulates of Linear and Conv layers for one call on ``example``.

    Conv: ``out.numel() * in_channels / groups * prod(kernel)``; Linear:
    ``out.numel() * in_features``. Other ops (norms, activations, attention products) are
    not counted: they are the same before and after channel pruning or scale with it.
    """
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, kinds)}
    run = lambda m: call_model(m, example)  # noqa: E731
    return sum(layer_macs(model, layers, run, per_sample=False).values())


def layer_macs(
    model: nn.Module, layers: dict[str, nn.Module], run: Any, per_sample: bool = True
) -> dict[str, int]:
    """Multiply-accumulates of each of ``layers`` (Linear / Conv) during one ``run(model)``.

    A layer does ``out.numel() * weight[0].numel()`` (inputs of one output element:
    ``in_features``, or ``in_channels / groups * prod(kernel)``), summed over its calls;
    ``per_sample`` divides by the batch (the output's first dimension).
    """
    macs = dict.fromkeys(layers, 0)

    def hook(name: str):
        def record(module: nn.Module, _args, out) -> None:
            out = out[0] if isinstance(out, (tuple, list)) else out
            batch = max(out.shape[0], 1) if per_sample else 1
            macs[name] += int(out.numel() // batch * module.weight[0].numel())

        return record

    handles = [layer.register_forward_hook(hook(n)) for n, layer in layers.items()]
    try:
        with torch.no_grad():
            run(model)
    finally:
        for h in handles:
            h.remove()
    return macs


def count_nonzero(model: nn.Module) -> int:
    """Number of non-zero parameter entries (what unstructured pruning removes)."""
    return sum(int((p != 0).sum()) for p in model.parameters())


def model_counts(model: nn.Module, ctx: CompressContext) -> dict[str, int] | None:
    """``params``, ``nonzero`` and ``macs`` of ``model`` on ctx's first calibration batch.

    None when no calibration batch is known (MACs need an input to trace the shapes).

    Example:
        >>> ctx = CompressContext(batches=[torch.zeros(1, 3)])
        >>> model_counts(nn.Linear(3, 2), ctx)
        {'params': 8, 'nonzero': 8, 'macs': 6}
    """
    if not ctx.batches:
        return None
    example = ctx.batches[0]
    if ctx.call_mode == "first" and isinstance(example, tuple):  # (inputs, labels) pairs
        example = example[0]
    was = model.training
    model.eval()  # counting must not move batch-norm statistics
    try:
        macs = count_macs(model, example)
    finally:
        model.train(was)
    return {"params": count_params(model), "nonzero": count_nonzero(model), "macs": macs}


def record_sparsity(
    ctx: CompressContext,
    method: str,
    layers: dict[str, nn.Module],
    model: nn.Module | None = None,
    before: dict[str, int] | None = None,
) -> None:
    """Note the achieved per-layer sparsity in the artifact's ``extra`` (for the report).

    With ``model`` and ``before`` (``model_counts`` taken before pruning), also record
    ``params``, ``nonzero`` and ``macs`` as ``{"before": n, "after": m}`` next to the
    layers' sparsities in ``ctx.extra["pruning"][method]``.

    Example:
        >>> before = model_counts(model, ctx)                     # doctest: +SKIP
        >>> ... prune model's layers ...                          # doctest: +SKIP
        >>> record_sparsity(ctx, "nm", layers, model, before)     # doctest: +SKIP
    """
    stats: dict[str, Any] = {}
    for name, m in layers.items():
        w = m.weight.detach()
        stats[name] = round(1.0 - float((w != 0).sum()) / w.numel(), 4)
    entry = ctx.extra.setdefault("pruning", {})
    entry[method] = stats
    after = model_counts(model, ctx) if model is not None and before is not None else None
    if after is not None:
        stats.update({k: {"before": before[k], "after": after[k]} for k in after})
