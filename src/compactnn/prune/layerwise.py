"""Layer-by-layer calibration statistics for one-shot pruning (Wanda, SparseGPT).

Layers are processed in execution order; each one's input statistics are gathered with the
layers before it already pruned, so later layers see (and compensate for) earlier errors,
the sequential scheme both papers use.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from compactnn.core.context import CompressContext
from compactnn.core.modules import execution_order


def supported(name: str, layer: nn.Module, ctx: CompressContext) -> bool:
    """Linear and ungrouped Conv2d layers; others are skipped with a note saying why."""
    if isinstance(layer, nn.Linear):
        return True
    if isinstance(layer, nn.Conv2d) and layer.groups == 1:
        return True
    ctx.warn(
        f"{name}: {type(layer).__name__}"
        f"{' with groups>1' if isinstance(layer, nn.Conv2d) else ''} is not supported by "
        "calibration-based pruning; left dense."
    )
    return False


def layer_inputs_2d(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of its weight's input dimension: ``(tokens, K)``."""
    if isinstance(layer, nn.Conv2d):
        cols = nn.functional.unfold(  # (B, C*kh*kw, L)
            x, layer.kernel_size, layer.dilation, layer.padding, layer.stride
        )
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


class _Reached(Exception):
    """Raised by the hook once the layer's input is seen: the rest of the forward is waste."""


def gather(
    model: nn.Module, name: str, ctx: CompressContext, accumulate: Callable[[torch.Tensor], None]
) -> None:
    """Run the calibration batches up to layer ``name``, passing each of its ``(tokens, K)``
    inputs on. The forward pass stops at the layer (about half the cost on average); a layer
    called several times per forward contributes its first call only."""
    layer = model.get_submodule(name)

    def hook(_m, args):
        accumulate(layer_inputs_2d(layer, args[0].detach().float()))
        raise _Reached

    handle = layer.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for b in ctx.batches:
                try:
                    ctx.run(model, b)
                except _Reached:
                    pass
    finally:
        handle.remove()


def input_sq_norms(model: nn.Module, name: str, ctx: CompressContext) -> torch.Tensor:
    """``||x_j||^2`` summed over every calibration token, per input feature ``j``: ``(K,)``."""
    acc: list[torch.Tensor] = []

    def add(x2d: torch.Tensor) -> None:
        s = (x2d * x2d).sum(0)
        acc.append(s) if not acc else acc[0].add_(s)

    gather(model, name, ctx, add)
    return acc[0]


def input_hessian(model: nn.Module, name: str, ctx: CompressContext) -> torch.Tensor:
    """``H = 2/N X^T X`` of the layer's inputs, ``(K, K)`` in float64 accumulation."""
    acc: list[torch.Tensor] = []
    count = [0]

    def add(x2d: torch.Tensor) -> None:
        g = x2d.double().T @ x2d.double()
        acc.append(g) if not acc else acc[0].add_(g)
        count[0] += x2d.shape[0]

    gather(model, name, ctx, add)
    return (2.0 / max(count[0], 1)) * acc[0]


def in_order(model: nn.Module, names: list[str], ctx: CompressContext) -> list[str]:
    """``names`` in the order their layers run on the first calibration batch."""
    return execution_order(model, names, lambda m: ctx.run(m, ctx.batches[0]))
