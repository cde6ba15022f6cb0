"""Capture what flows into or out of one module, and stop the forward pass there.

Calibration statistics often need one layer's input only: running the rest of the model is
waste (about half of a forward pass on average). A capture hook records what it needs and
raises :class:`StopForward`; the runner swallows exactly that exception, so any other error
(a bad input, a hook's own complaint) still propagates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from compactnn.core.context import CompressContext


class StopForward(Exception):
    """Raised by a capture hook once it has what it needs: the rest of the forward is skipped."""


def stop_after(hook: Callable[..., Any]) -> Callable[..., None]:
    """``hook`` as a module hook that stops the forward pass once it has returned.

    Example:
        >>> handle = layer.register_forward_pre_hook(stop_after(record))  # doctest: +SKIP
    """

    def stopping(*args: Any) -> None:
        hook(*args)
        raise StopForward

    return stopping


def run_until_stopped(run: Callable[..., Any], *args: Any) -> bool:
    """Call ``run(*args)``; return True when a capture hook stopped it early.

    Example:
        >>> run_until_stopped(lambda: None)
        False
    """
    try:
        run(*args)
    except StopForward:
        return True
    return False


def capture_batches(
    model: nn.Module,
    module: nn.Module,
    ctx: CompressContext,
    hook: Callable[..., Any],
    output: bool = False,
    with_kwargs: bool = False,
) -> None:
    """Run every calibration batch through ``model`` up to ``module``, then stop.

    ``hook`` is called as a PyTorch module hook: ``hook(module, args[, kwargs])`` before the
    module runs, or with ``output=True`` ``hook(module, args[, kwargs], output)`` after it;
    each forward pass stops as soon as ``hook`` returns. Runs without gradients.

    Args:
        model: the model the batches go through (``ctx.run``).
        module: a submodule of ``model``.
        ctx: holds the calibration batches.
        hook: sees the module's input (or output) once per batch that reaches it.
        output: capture the output instead of the input.
        with_kwargs: pass the module's keyword arguments to ``hook`` too.

    Example:
        >>> seen = []
        >>> capture_batches(model, model.fc, ctx, lambda _m, args: seen.append(args[0]))
        ... # doctest: +SKIP
    """
    if output:
        handle = module.register_forward_hook(stop_after(hook), with_kwargs=with_kwargs)
    else:
        handle = module.register_forward_pre_hook(stop_after(hook), with_kwargs=with_kwargs)
    try:
        with torch.no_grad():
            for batch in ctx.batches:
                run_until_stopped(ctx.run, model, batch)
    finally:
        handle.remove()
