"""Tuning of quantized blocks against the float model's outputs (hooks of the block-sequential
engine, used after GPTQ), in two stages.

1. **Per block** (``tune_steps``): each group's scale (through a log-factor), every float
   bias and every norm gain in the block, and optionally the rounding of each integer code,
   are tuned with Adam so the quantized block, fed the quantized model's activations,
   reproduces the float block's outputs on the float model's activations. This corrects the
   error the earlier blocks let through, which layer-wise GPTQ cannot see.
2. **End to end** (``e2e_steps``): once every block is quantized, the same scales, biases and
   norm gains of all blocks are tuned together so the whole stack of quantized blocks, fed the
   model's first-block inputs, reproduces the float stack's output (codes fixed). A per-block
   loss cannot see how errors of different blocks combine; this stage can.

Learned rounding (``rounding=True``, in the spirit of AdaRound and AutoRound, but starting
from GPTQ's codes): every code gets a continuous offset ``v``, initialised at 0 and bounded to
``[-1, 1]``; the forward pass uses ``clamp(round(code + v), qmin, qmax)`` with a
straight-through gradient, so a code moves by one step only when the loss keeps asking for it.
The stored format does not change: the result is again integer codes on the same grid.

Losses are the squared error relative to the target's energy, over real tokens only (padding
positions, known from the attention mask, are left out).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from compactnn.core.qlayers import QuantLinear
from compactnn.core.quantize import round_scale
from compactnn.engines.blocks import Slot, call_block, hidden_out, linked_call
from compactnn.engines.sequential import BlockData, StackData, run_block, token_mask


def moved_codes(codes: torch.Tensor, offset: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """``clamp(round(codes + offset), qmin, qmax)`` with a straight-through gradient to
    ``offset`` (float result, ``codes``' shape).

    The gradient passes through the clamp too: a code sitting at ``qmin`` or ``qmax`` has
    ``codes + offset`` exactly on the bound, where ``torch.clamp`` would block it for good.
    """
    moved = codes.float() + offset
    return moved + (moved.round().clamp(qmin, qmax) - moved).detach()


def tuned_weight(
    layer: QuantLinear, log_factor: torch.Tensor, offset: torch.Tensor | None = None
) -> torch.Tensor:
    """Weight ``(out, in)`` of ``layer`` with its scales multiplied by ``exp(log_factor)`` and,
    when ``offset`` is given, its codes moved by the rounded offset."""
    rows, ngroups = layer.weight_scale.shape
    codes = layer.weight_codes.float()
    if offset is not None:
        qt = layer.weight_spec.qtype
        codes = moved_codes(codes, offset, qt.qmin, qt.qmax)
    codes = codes.reshape(rows, ngroups, -1)
    scale = (layer.weight_scale * log_factor.exp()).unsqueeze(-1)
    w = (codes - layer.weight_zero.unsqueeze(-1)) * scale
    return w.reshape(layer.weight.shape)


def relative_error(
    out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """``sum((out - target)^2) / sum(target^2)`` over the ``(B, T)`` positions where ``mask``
    is true (all positions when ``mask`` is None); ``out``/``target`` are ``(B, T, C)``."""
    err, energy = (out - target).pow(2), target.pow(2)
    if mask is not None:
        err, energy = err[mask], energy[mask]
    return err.sum() / energy.sum().clamp(min=1e-12)


class Tunables:
    """The tuned quantities of one module: per-group log scale factors and (optionally)
    rounding offsets of every ``QuantLinear``, and a copy of every other 1-D float parameter
    (biases, norm gains). ``params()`` feeds ``torch.func.functional_call``; ``commit()``
    writes the result back into the module as integer codes, scales and parameters."""

    def __init__(self, module: nn.Module, rounding: bool) -> None:
        self.module = module
        self.qlayers = {n: m for n, m in module.named_modules() if isinstance(m, QuantLinear)}
        self.factors = {
            n: torch.zeros_like(m.weight_scale, requires_grad=True) for n, m in self.qlayers.items()
        }
        self.offsets = {
            n: torch.zeros(m.weight_codes.shape, requires_grad=True)
            for n, m in self.qlayers.items()
        } if rounding else {}  # fmt: skip
        qweights = {f"{n}.weight" for n in self.qlayers}
        self.vectors = {
            n: p.detach().clone().requires_grad_(True)
            for n, p in module.named_parameters()
            if p.dim() == 1 and n not in qweights
        }

    def optimizer(self, lr: float, rounding_lr: float) -> torch.optim.Optimizer:
        groups = [{"params": [*self.factors.values(), *self.vectors.values()], "lr": lr}]
        if self.offsets:
            groups.append({"params": list(self.offsets.values()), "lr": rounding_lr})
        return torch.optim.Adam(groups)

    def params(self) -> dict[str, torch.Tensor]:
        out = {
            f"{n}.weight": tuned_weight(m, self.factors[n], self.offsets.get(n))
            for n, m in self.qlayers.items()
        }
        out.update(self.vectors)
        return out

    def clamp_(self) -> None:
        with torch.no_grad():
            for v in self.offsets.values():
                v.clamp_(-1.0, 1.0)

    @torch.no_grad()
    def commit(self) -> None:
        for n, m in self.qlayers.items():
            scale = round_scale(m.weight_scale * self.factors[n].exp())
            codes = m.weight_codes
            if n in self.offsets:
                qt = m.weight_spec.qtype
                codes = moved_codes(codes, self.offsets[n], qt.qmin, qt.qmax).to(codes.dtype)
            m.set_quantized_weight(codes, scale, m.weight_zero)
        named = dict(self.module.named_parameters())
        for n, v in self.vectors.items():
            named[n].copy_(v)


def fit(
    tunables: Tunables,
    loss_of: Callable[[int], torch.Tensor],
    n_batches: int,
    steps: int,
    lr: float,
    seed: int = 0,
    rounding_lr: float | None = None,
) -> tuple[float, float]:
    """Adam on ``tunables`` for ``steps`` steps, one batch each in a seeded random order.

    ``loss_of(i)`` runs batch ``i`` through ``tunables.params()``. The result is written back
    only when it lowers the mean loss over all batches (otherwise the module is unchanged).

    Returns:
        ``(before, after)``: mean loss over all batches before and after.
    """
    opt = tunables.optimizer(lr, rounding_lr or 1.0 / max(steps, 1))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        before = sum(float(loss_of(i)) for i in range(n_batches)) / n_batches
    for _ in range(steps):
        i = int(torch.randint(n_batches, (1,), generator=gen))
        opt.zero_grad()
        loss_of(i).backward()
        opt.step()
        tunables.clamp_()
    with torch.no_grad():
        after = sum(float(loss_of(i)) for i in range(n_batches)) / n_batches
    if after < before:
        tunables.commit()
    return before, min(before, after)


def tune_block(
    block: nn.Module,
    calls: list,
    q_inps: list[torch.Tensor],
    targets: list[torch.Tensor],
    steps: int,
    lr: float,
    seed: int = 0,
    rounding: bool = False,
) -> float:
    """Tune the scales, biases, norm gains (and optionally codes) of ``block`` in place.

    Args:
        block: the block with quantized layers.
        calls: ``(args, kwargs)`` per calibration batch (hidden states replaced per call).
        q_inps: the block's inputs from the quantized model, one ``(B, T, C)`` per batch.
        targets: the float block's outputs on the float model's inputs, same shapes.
        steps: Adam steps (one calibration batch each, in a seeded random order).
        lr: learning rate of scales, biases and norm gains.
        seed: seed of the batch order.
        rounding: also learn each code's rounding (codes move by at most one step; their
            learning rate is ``1 / steps``: Adam moves about ``lr`` a step, so an offset can
            cross half a step in half the run).

    Returns:
        The final mean relative error over all batches.
    """
    tun = Tunables(block, rounding)
    masks = [token_mask(c, h) for c, h in zip(calls, q_inps, strict=True)]

    def loss_of(i: int) -> torch.Tensor:
        out = run_block(block, calls[i], q_inps[i], params=tun.params())
        return relative_error(out, targets[i], masks[i])

    return fit(tun, loss_of, len(calls), steps, lr, seed)[1]


def tune_stack(
    blocks: nn.ModuleList,
    calls: list,
    inps: list[torch.Tensor],
    targets: list[torch.Tensor],
    steps: int,
    lr: float,
    seed: int = 0,
    links: dict[Slot, int] | None = None,
) -> tuple[float, float]:
    """Tune the scales, biases and norm gains of all ``blocks`` together (codes fixed) so the
    quantized stack maps the first block's inputs ``inps`` to the float stack's ``targets``.
    ``calls`` are the first block's; each later block takes the inputs named in ``links``
    from the block before it (T5's position bias; :func:`~compactnn.engines.blocks.block_links`).

    Returns:
        ``(before, after)`` mean relative error over all batches.
    """
    tun = Tunables(blocks, rounding=False)
    masks = [token_mask(c, h) for c, h in zip(calls, inps, strict=True)]

    def loss_of(i: int) -> torch.Tensor:
        params = tun.params()
        h, call = inps[i], calls[i]
        for j, block in enumerate(blocks):
            prefix = f"{j}."
            own = {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}
            out = call_block(block, call, h, params=own)
            h, call = hidden_out(out), linked_call(calls[i], out, links or {})
        return relative_error(h, targets[i], masks[i])

    return fit(tun, loss_of, len(calls), steps, lr, seed)


def block_tuning(steps: int, lr: float, rounding: bool) -> Callable[[BlockData], None]:
    """An ``after_block`` hook running :func:`tune_block` on each quantized block.

    Example:
        >>> hooks = BlockHooks(after_block=block_tuning(100, 3e-3, True))  # doctest: +SKIP
    """

    def after_block(data: BlockData) -> None:
        tune_block(
            data.block, data.calls, data.q_inps, data.fp_out, steps, lr, data.seed,
            rounding=rounding,
        )  # fmt: skip

    return after_block


def stack_tuning(steps: int, lr: float) -> Callable[[StackData], dict[str, Any]]:
    """An ``after_stack`` hook running :func:`tune_stack`; records the relative error before
    and after as ``e2e_relative_error``.

    Example:
        >>> hooks = BlockHooks(after_stack=stack_tuning(100, 2e-4))  # doctest: +SKIP
    """

    def after_stack(data: StackData) -> dict[str, Any]:
        e2e = tune_stack(
            data.blocks, data.calls, data.first_inps, data.fp_out, steps, lr, data.seed,
            links=data.links,
        )  # fmt: skip
        return {"e2e_relative_error": [round(e, 6) for e in e2e]} if e2e else {}

    return after_stack
