"""AWQ's activation-aware channel scaling (Lin et al. 2023) as a block-sequential hook.

For each exact ``(producer, consumers)`` pair of a block (see
:mod:`compactnn.core.scale_fold`), the consumers' weight columns are multiplied by
``s = mean|x|^alpha`` and the producer's output divided by ``s``, with ``alpha`` searched to
minimise the consumers' quantized output error: salient input channels get finer
quantization while the float function is unchanged. Used by ``awq`` and by ``gptq`` with
``awq=True``; both note the pairs scaled and those skipped (:class:`ScaledPairs`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import nn

from compactnn.core.scale_fold import find_scale_pairs, fold_is_exact, fold_scale, search_scale
from compactnn.engines.sequential import BlockData, block_inputs, run_block

# The search's defaults: alpha values tried, calibration tokens per pair.
GRID = 20
MAX_TOKENS = 4096


@dataclasses.dataclass
class ScaledPairs:
    """The candidate pairs of a run, as ``"producer -> [consumers]"`` with model names:
    ``scaled`` where AWQ folded a scale, ``skipped`` where folding is not exact."""

    scaled: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)

    def notes(self, method: str) -> list[str]:
        """Compress notes: each skipped pair named, then the number of pairs scaled.

        Example:
            >>> ScaledPairs(["a -> ['b']"], ["c -> ['d']"]).notes("awq")[0]
            "awq: c -> ['d'] not foldable, left as is"
        """
        lines = [f"{method}: {pair} not foldable, left as is" for pair in self.skipped]
        return [*lines, f"{method}: {len(self.scaled)} producer/consumer pairs scaled"]


def awq_block(
    block: nn.Module,
    prefix: str,
    specs: dict,
    calls: list,
    hidden: list,
    grid: int = GRID,
    max_tokens: int = MAX_TOKENS,
    pairs: ScaledPairs | None = None,
) -> ScaledPairs:
    """Search and fold AWQ scales for every exact pair in ``block``.

    Args:
        block: the float block, changed in place.
        prefix: the block's name in the model.
        specs: model layer name -> ``(weight spec, activation spec)``; only targeted layers
            are scaled, each pair with its first consumer's weight spec.
        calls: ``(args, kwargs)`` of the block per calibration batch.
        hidden: the block's inputs per batch.
        grid: number of ``alpha`` values tried in ``[0, 1)``.
        max_tokens: calibration tokens used by the search of one pair.
        pairs: where the block's pairs are appended (a new one when None).

    Returns:
        ``pairs``, with this block's pairs (model names) appended to ``scaled`` / ``skipped``.

    Example:
        >>> awq_block(block, "model.layers.0", specs, calls, q_inps).scaled  # doctest: +SKIP
        ["model.layers.0.input_layernorm -> ['model.layers.0.self_attn.q_proj', ...]", ...]
    """
    pairs = ScaledPairs() if pairs is None else pairs
    local = sorted(n for n, _ in block.named_modules() if f"{prefix}.{n}" in specs)
    run = lambda: run_block(block, calls[0], hidden[0])  # noqa: E731
    for producer, consumers in find_scale_pairs(block, run, local):
        pair = f"{prefix}.{producer} -> {[f'{prefix}.{c}' for c in consumers]}"
        if not fold_is_exact(block, run, producer, consumers):
            pairs.skipped.append(pair)
            continue
        x = block_inputs(block, calls, hidden, consumers[0], max_tokens)
        mods = [block.get_submodule(n) for n in consumers]
        wspec = specs[f"{prefix}.{consumers[0]}"][0]
        s = search_scale(x, [m.weight.detach() for m in mods], wspec, grid)
        fold_scale(block.get_submodule(producer), mods, s)
        pairs.scaled.append(pair)
    return pairs


def awq_scaling(
    grid: int = GRID, max_tokens: int = MAX_TOKENS, pairs: ScaledPairs | None = None
) -> Callable[[BlockData], None]:
    """A ``before_block`` hook running :func:`awq_block` on each float block; the pairs of
    every block are appended to ``pairs`` when given.

    Example:
        >>> hooks = BlockHooks(before_block=awq_scaling())  # doctest: +SKIP
    """
    pairs = ScaledPairs() if pairs is None else pairs

    def before_block(data: BlockData) -> None:
        awq_block(
            data.block, data.name, data.specs, data.calls, data.q_inps, grid, max_tokens, pairs
        )

    return before_block
