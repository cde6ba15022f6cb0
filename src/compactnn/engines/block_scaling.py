"""AWQ's activation-aware channel scaling (Lin et al. 2023) as a block-sequential hook.

For each exact ``(producer, consumers)`` pair of a block (see
:mod:`compactnn.core.scale_fold`), the consumers' weight columns are multiplied by
``s = mean|x|^alpha`` and the producer's output divided by ``s``, with ``alpha`` searched to
minimise the consumers' quantized output error: salient input channels get finer
quantization while the float function is unchanged. Used by ``awq`` and by ``gptq`` with
``awq=True``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from compactnn.core.scale_fold import find_scale_pairs, fold_is_exact, fold_scale, search_scale
from compactnn.engines.sequential import BlockData, block_inputs, run_block

# The search's defaults: alpha values tried, calibration tokens per pair.
GRID = 20
MAX_TOKENS = 4096


def awq_block(
    block: nn.Module,
    prefix: str,
    specs: dict,
    calls: list,
    hidden: list,
    grid: int = GRID,
    max_tokens: int = MAX_TOKENS,
) -> int:
    """Search and fold AWQ scales for every exact pair in ``block``; returns pairs scaled.

    Args:
        block: the float block, changed in place.
        prefix: the block's name in the model.
        specs: model layer name -> ``(weight spec, activation spec)``; only targeted layers
            are scaled, each pair with its first consumer's weight spec.
        calls: ``(args, kwargs)`` of the block per calibration batch.
        hidden: the block's inputs per batch.
        grid: number of ``alpha`` values tried in ``[0, 1)``.
        max_tokens: calibration tokens used by the search of one pair.

    Example:
        >>> awq_block(block, "model.layers.0", specs, calls, q_inps)  # doctest: +SKIP
        2
    """
    local = {n for n, _ in block.named_modules() if f"{prefix}.{n}" in specs}
    done = 0
    run = lambda: run_block(block, calls[0], hidden[0])  # noqa: E731
    for producer, consumers in find_scale_pairs(block, run, sorted(local)):
        if not fold_is_exact(block, run, producer, consumers):
            continue
        x = block_inputs(block, calls, hidden, consumers[0], max_tokens)
        mods = [block.get_submodule(n) for n in consumers]
        wspec = specs[f"{prefix}.{consumers[0]}"][0]
        s = search_scale(x, [m.weight.detach() for m in mods], wspec, grid)
        fold_scale(block.get_submodule(producer), mods, s)
        done += 1
    return done


def awq_scaling(grid: int = GRID, max_tokens: int = MAX_TOKENS) -> Callable[[BlockData], None]:
    """A ``before_block`` hook running :func:`awq_block` on each float block.

    Example:
        >>> hooks = BlockHooks(before_block=awq_scaling())  # doctest: +SKIP
    """

    def before_block(data: BlockData) -> None:
        awq_block(data.block, data.name, data.specs, data.calls, data.q_inps, grid, max_tokens)

    return before_block
