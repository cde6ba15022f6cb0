"""What a PE-wise pruning step (:mod:`compactnn.prune.pewise`) run by ``compress`` tells:
its record in ``extra["pruning"]["pe"]``, read by ``compactnn compress``'s summary as the
other pruning steps' records are, and the words of its collapse warning."""

from __future__ import annotations

from typing import Any

from torch import nn

from compactnn.core.context import CompressContext


def pe_short_name(config: Any, sparsity: float | None = None) -> str:
    """The short name of ``config`` (at another ``sparsity`` if given): ``w2a8-pe50``."""
    act = f"a{config.act.bits}" if config.act is not None else ""
    share = round(100 * (config.sparsity if sparsity is None else sparsity))
    seq = "-seq" if config.schedule == "sequential" else ""
    return f"w{config.weight.bits}{act}-pe{share}{seq}"


def collapse_words(config: Any) -> tuple[str, str]:
    """The step and the way out of :func:`~compactnn.prune.train.warn_if_collapsed` for a
    PE-wise step that ``compress`` calibrated without its training."""
    go, gi = config.group
    act = f"a{config.act.bits}" if config.act is not None else ""
    what = (
        f"pe step ({config.sparsity:.0%} of the {go}x{gi} PE tiles, w{config.weight.bits}{act}, "
        "calibrated, not trained)"
    )
    name = pe_short_name(config)
    way_out = (
        f"Train it (compactnn train MODEL --recipe {name} --data TRAIN_DATA, or "
        "compactnn.train: the tiles are pruned over the epochs while the weights adapt), "
        f"prune fewer tiles (e.g. {pe_short_name(config, config.sparsity / 2)}), or keep the "
        "sensitive layers dense (--ignore NAME)."
    )
    return what, way_out


def record_pruning(
    ctx: CompressContext,
    config: Any,
    model: nn.Module,
    layers: list[str],
    dense: dict[str, int],
    before: dict[str, int] | None,
) -> None:
    """``ctx.extra["pruning"]["pe"]`` as the other pruning steps write it
    (:func:`~compactnn.prune.stats.record_sparsity`): each PE-pruned layer's share of zero
    weights in its frozen form, ``tiles`` (the group and the share of tiles pruned), and
    with ``before`` (the float model's counts) ``params``, ``nonzero`` and ``macs``
    before and after. Tiles are zeroed, not removed, and dense kernels multiply the zeros:
    the parameters and MACs stay; the non-zeros lose what the pruned layers zeroed
    (``dense``: their non-zero weights before)."""
    stats: dict[str, Any] = {}
    zeroed = 0
    for name in layers:
        w = model.get_submodule(name).weight.detach()
        nonzero = int((w != 0).sum())
        stats[name] = round(1.0 - nonzero / w.numel(), 4)
        zeroed += dense.get(name, w.numel()) - nonzero
    stats["tiles"] = {"group": list(config.group), "sparsity": config.sparsity}
    if before is not None:
        after = {**before, "nonzero": before["nonzero"] - zeroed}
        stats.update({k: {"before": before[k], "after": after[k]} for k in before})
    ctx.extra.setdefault("pruning", {})["pe"] = stats
