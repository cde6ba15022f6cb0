"""What one-shot pruning from calibration data shares (Wanda, SparseGPT): the config base and
layer-by-layer input statistics.

Layers are processed in execution order; each one's input statistics are gathered with the
layers before it already pruned, so later layers see (and compensate for) earlier errors,
the sequential scheme both papers use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from compactnn.core.capture import capture_batches
from compactnn.core.config import MethodConfig
from compactnn.core.context import CompressContext
from compactnn.core.hessian import accumulate_hessian, layer_inputs_2d
from compactnn.core.modules import execution_order
from compactnn.errors import name_list
from compactnn.prune.masks import (
    check_nm,
    check_removes_some,
    check_sparsity,
    keep_nm_divisible,
    prunable_layers,
    skip_tied,
)
from compactnn.prune.train import ONE_SHOT_AGREEMENT, collapse_words, warn_if_collapsed


@dataclasses.dataclass(frozen=True)
class OneShotConfig(MethodConfig):
    """Shared fields of calibration-based one-shot pruning.

    Args:
        sparsity: unstructured fraction removed, in [0, 1) (ignored when ``n`` is set).
        n: N of an N:M pattern (0: unstructured).
        m: M of an N:M pattern.
    """

    sparsity: float = 0.5
    n: int = 0
    m: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_sparsity(self.sparsity)
        if self.n or self.m:
            check_nm(self.n, self.m)


def nm_layers(
    layers: dict[str, nn.Module], config: OneShotConfig, ctx: CompressContext, method: str
) -> dict[str, nn.Module]:
    """``layers`` less those an N:M group size does not divide, which stay dense with a
    warning naming them, as ``nm<N>:<M>`` does (all of them when the config is unstructured).

    Example:
        >>> list(nm_layers({"fc": nn.Linear(8, 2)}, OneShotConfig(n=2, m=4), None, "wanda"))
        ['fc']
    """
    return keep_nm_divisible(layers, config.n, config.m, ctx, method) if config.n else layers


def unsupported_kind(layer: nn.Module) -> str | None:
    """Why calibration-based pruning leaves ``layer`` dense (its kind), or None for the
    Linear and ungrouped Conv2d layers it prunes.

    Example:
        >>> unsupported_kind(nn.Conv2d(4, 4, 3, groups=4)), unsupported_kind(nn.Linear(2, 2))
        ('Conv2d with groups>1', None)
    """
    if isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.groups == 1):
        return None
    return type(layer).__name__ + (" with groups>1" if isinstance(layer, nn.Conv2d) else "")


def dense_listing(kinds: dict[str, str]) -> str:
    """``kinds`` (layer -> kind) grouped by kind, a few names each.

    Example:
        >>> dense_listing({"a": "Conv1d", "b": "Conv2d with groups>1", "c": "Conv1d"})
        '2 Conv1d (a, c); 1 Conv2d with groups>1 (b)'
    """
    by_kind: dict[str, list[str]] = {}
    for name, kind in kinds.items():
        by_kind.setdefault(kind, []).append(name)
    return "; ".join(f"{len(v)} {k} ({name_list(v)})" for k, v in by_kind.items())


def oneshot_layers(
    model: nn.Module,
    targets: dict[str, nn.Module],
    config: OneShotConfig,
    ctx: CompressContext,
    method: str,
) -> dict[str, nn.Module]:
    """The layers a one-shot step (``wanda``, ``sparsegpt``) prunes: its targets less a head
    tied to a table (:func:`~compactnn.prune.masks.skip_tied`), the layer types it cannot
    prune (one warning for all; their reason recorded for the float-layer report) and
    the layers an N:M group does not divide (:func:`nm_layers`)."""
    if not config.n:  # here, not in the config: sparsegpt_prune(sparsity=0) reconstructs
        example = f"sparsity=0.5 (short name sp50-{method})"
        check_removes_some(config.sparsity, f"{method} with sparsity=0", "weights", example)
    layers, dense = {}, {}
    for name, layer in prunable_layers(skip_tied(model, targets, ctx, method), ctx).items():
        if (kind := unsupported_kind(layer)) is None:
            layers[name] = layer
        else:
            dense[name] = kind
            ctx.skipped[name] = f"{method} prunes Linear and ungrouped Conv2d only; left dense"
    if dense:  # one line for all (a MobileNet has dozens of depthwise convolutions)
        ctx.warn(
            f"{method}: kept dense (it prunes Linear and ungrouped Conv2d only): "
            + dense_listing(dense)
        )
    return nm_layers(layers, config, ctx, method)


def gather(
    model: nn.Module, name: str, ctx: CompressContext, accumulate: Callable[[torch.Tensor], None]
) -> None:
    """Run the calibration batches up to layer ``name``, passing each of its ``(tokens, K)``
    inputs on. The forward pass stops at the layer (about half the cost on average); a layer
    called several times per forward contributes its first call only."""
    layer = model.get_submodule(name)

    def hook(_m, args):
        accumulate(layer_inputs_2d(layer, args[0].detach().float()))

    capture_batches(model, layer, ctx, hook)


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
    acc: list[torch.Tensor | None] = [None]
    count = [0]

    def add(x2d: torch.Tensor) -> None:
        acc[0] = accumulate_hessian(acc[0], x2d, torch.float64)
        count[0] += x2d.shape[0]

    gather(model, name, ctx, add)
    return (2.0 / max(count[0], 1)) * acc[0]


def in_order(model: nn.Module, names: list[str], ctx: CompressContext) -> list[str]:
    """``names`` in the order their layers run on the first calibration batch."""
    return execution_order(model, names, lambda m: ctx.run(m, ctx.batches[0]))


def collapse_ways(method: str, config: OneShotConfig) -> list[str]:
    """The remedies a collapsed ``wanda`` or ``sparsegpt`` result is offered, each a short
    name that exists: N:M self-distils its pattern (``nm<N>:<M>-ft``), unstructured prunes
    while self-distilling (``sp<P>-gradual``, ``sp<P>-dns``), and Wanda can reconstruct the
    kept weights (SparseGPT).

    Example:
        >>> collapse_ways("wanda", OneShotConfig(sparsity=0.6))[0]
        'lower the sparsity (e.g. sp30-wanda)'
    """
    n, m, wanda = config.n, config.m, method == "wanda"
    if n:
        ways = [f"self-distil with the pattern fixed (nm{n}:{m}-ft)"]
        if n < m - 1:
            ways.append(f"keep more weights per group (e.g. nm{min(2 * n, m - 1)}:{m}-{method})")
        if wanda:
            ways.append(f"reconstruct the kept weights (nm{n}:{m}-sparsegpt)")
        return [*ways, "keep the sensitive layers dense (--ignore NAME)"]
    s, p = config.sparsity, round(100 * config.sparsity)
    ways = [f"lower the sparsity (e.g. sp{round(50 * s)}-{method})"]
    ways.append(f"prune while self-distilling (sp{p}-gradual or sp{p}-dns)")
    if wanda:
        ways.append(f"reconstruct the kept weights (sp{p}-sparsegpt)")
    return ways


def warn_if_oneshot_collapsed(
    model: nn.Module,
    reference: dict,
    config: OneShotConfig,
    ctx: CompressContext,
    method: str,
) -> bool:
    """Warn when the pruned ``model`` agrees with the float model (``reference``, its
    :func:`~compactnn.prune.train.output_summary` before pruning) on fewer than
    ``ONE_SHOT_AGREEMENT`` of the calibration samples, or has collapsed; one forward pass."""
    setting = f"{config.n}:{config.m}" if config.n else f"sparsity {config.sparsity:g}"
    words = collapse_words(method, [setting], 0, 0.0, collapse_ways(method, config))
    return warn_if_collapsed(model, reference, ctx, *words, min_agreement=ONE_SHOT_AGREEMENT)
