"""How far the simulated model moves *from itself* under perturbations of float-rounding size.

:func:`probes` scale or nudge its input by one part in a million and (the probe that
matters) nudge every activation quantizer's input by a few float ulps, as a deployment's
different float summation order does; :func:`explained` adds them to a failed
:class:`~compactnn.lowering.verify.Verification` (see :mod:`compactnn.lowering.verify`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from compactnn.core.calib import call_model
from compactnn.core.qlayers import ActQuantizer
from compactnn.lowering.verify import (
    FLOAT_ROUNDING,
    INPUT_NUDGE,
    INPUT_SCALE,
    NUDGE,
    ROUNDING_DRAWS,
    ROUNDING_ULPS,
    Verification,
    compare,
)


def sensitivity(reference: nn.Module, example: Any, nudge: float = NUDGE) -> float | None:
    """Steps of the output scale that ``reference`` moves from itself under the worst of its
    :func:`probes`; None when ``example`` holds no float tensor.

    A network whose layers amplify small differences (a one-code flip in an early activation
    grows layer by layer) moves by many steps here; a deployment that differs from it by about
    as much is reproducing its integer math and meeting the same amplification.

    Example:
        >>> net = nn.Linear(4, 2)
        >>> sensitivity(net, torch.randn(8, 4)) < 0.01
        True
    """
    found = probes(reference, example, nudge)
    return max((v[0] for v in found.values()), default=None)


def probes(
    reference: nn.Module, example: Any, nudge: float = NUDGE
) -> dict[str, tuple[float, float | None]]:
    """How far ``reference`` moves from itself under each perturbation of rounding size:
    ``{probe: (steps of the output scale, top-1 agreement with itself or None)}``.

    * ``"input scale"``: every float value of ``example`` times ``1 + nudge``;
    * ``"input nudge"``: each float value times ``1 + nudge * s``, ``s = +-1`` at random
      (seed 0): on image data with few distinct values a common scale may flip no input code;
    * ``"float rounding"`` (only when ``reference`` has :class:`ActQuantizer` s): each
      activation quantizer's input times ``1 + e``, ``e = +-ROUNDING_ULPS`` ulps of its float
      type at random, the worst of ``ROUNDING_DRAWS`` draws (seeds 0, 1): what a deployment's
      different float summation order does before each requantization.

    Costs ``3 + ROUNDING_DRAWS`` forward passes on ``example`` (the float-rounding ones about
    2x a plain pass: one random sign per activation value; about 2 s for
    EfficientNet-B0 on 32 images of 64x64, one thread), run by :func:`explained` only on a
    failed check. Empty when ``example`` holds no float tensor.

    Example:
        >>> sorted(probes(nn.Linear(4, 2), torch.randn(8, 4)))
        ['input nudge', 'input scale']
    """
    scaled = _nudged(example, lambda v: v * (1 + nudge))
    if scaled is None:
        return {}
    gen = torch.Generator().manual_seed(0)
    signed = _nudged(example, lambda v: v * (1 + nudge * _signs(v, gen)))
    with torch.no_grad():
        base = call_model(reference, example)
        out = {
            INPUT_SCALE: _moved(base, call_model(reference, scaled), example),
            INPUT_NUDGE: _moved(base, call_model(reference, signed), example),
        }
        modules = reference.modules() if isinstance(reference, nn.Module) else ()
        quantizers = [m for m in modules if isinstance(m, ActQuantizer)]
        if quantizers:
            draws = [
                rounded_run(reference, quantizers, example, seed) for seed in range(ROUNDING_DRAWS)
            ]
            moved = [_moved(base, d, example) for d in draws]
            steps = max(m[0] for m in moved)
            agree = [m[1] for m in moved if m[1] is not None]
            out[FLOAT_ROUNDING] = (steps, min(agree) if agree else None)
    return out


def _signs(v: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random ``+-1`` of ``v``'s shape and dtype from ``gen``."""
    return (torch.rand(v.shape, generator=gen) < 0.5).to(v.device, v.dtype) * 2 - 1


def _moved(base: Any, other: Any, example: Any) -> tuple[float, float | None]:
    """Steps and top-1 agreement of ``other`` against ``base`` (two outputs of one model)."""
    same = compare(lambda *_, **__: base, lambda *_, **__: other, example, "probe", float("inf"))
    return same.max_diff_steps, same.top1_agreement


def rounded_run(reference: nn.Module, quantizers: list, example: Any, seed: int) -> Any:
    """``reference``'s output with each quantizer's float input times ``1 +- ROUNDING_ULPS``
    ulps (random signs from ``seed``); the model is left as it was. Also the probe of
    :func:`compactnn.kernels.nbits_check.rounding_probe`."""
    gen = torch.Generator().manual_seed(seed)

    def hook(_module: nn.Module, args: tuple) -> tuple | None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return None
        e = ROUNDING_ULPS * torch.finfo(x.dtype).eps
        return (x * (1 + e * _signs(x, gen)), *args[1:])

    handles = [q.register_forward_pre_hook(hook) for q in quantizers]
    try:
        return call_model(reference, example)
    finally:
        for h in handles:
            h.remove()


def explained(result: Verification, reference: nn.Module, example: Any) -> Verification:
    """``result``, with the :func:`probes` of ``reference`` on ``example`` when it failed (so
    its message and :func:`enforce` can tell an amplifying network from a kernel error).

    ``within_rounding`` is set when there is no NaN/Inf mismatch, the simulation moves at
    least as far from itself under the float-rounding probe as ``result``'s gap, and
    ``result``'s top-1 agreement is at least the simulation's own there less one sample (the
    probe's agreement is itself one noisy draw). The result still fails (:func:`enforce`).
    """
    if result.passed:
        return result
    found = probes(reference, example)
    if not found:
        return result
    probe = max(found, key=lambda k: found[k][0])
    rounding, agree = found.get(FLOAT_ROUNDING, (None, None))
    result = replace(
        result,
        sensitivity=found[probe][0],
        sensitivity_probe=probe,
        input_scale_steps=found[INPUT_SCALE][0],
        input_nudge_steps=found[INPUT_NUDGE][0],
        rounding_steps=rounding,
        rounding_agreement=agree,
    )
    return replace(result, within_rounding=rounding_explains(result))


def rounding_explains(result: Verification, factor: float = 1.0) -> bool:
    """See :func:`explained`: the gap within ``factor`` times the simulation's own movement
    under float rounding (:func:`~compactnn.lowering.isolated.with_kernels` allows 2), no
    NaN/Inf mismatch, and a top-1 agreement no worse than the simulation's own, less one
    sample."""
    if result.nonfinite_mismatches or result.rounding_steps is None:
        return False
    if not result.max_diff_steps <= factor * result.rounding_steps:
        return False
    if result.top1_agreement is None or result.rounding_agreement is None:
        return True
    return result.top1_agreement >= result.rounding_agreement - 1 / max(result.samples, 1)


def _nudged(example: Any, change: float | Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``example`` with its float tensors scaled by ``1 + change`` (a number) or mapped by
    ``change``; None when it has none."""
    found = False
    if not callable(change):
        factor = 1 + change
        change = lambda v: v * factor  # noqa: E731

    def walk(v: Any) -> Any:
        nonlocal found
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            found = True
            return change(v)
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, (tuple, list)):
            return type(v)(walk(x) for x in v)
        return v

    out = walk(example)
    return out if found else None
