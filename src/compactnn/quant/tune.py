"""Block-wise tuning after GPTQ: integer codes stay fixed; each group's scale (through a
log-factor), every float bias and every norm gain in the block are tuned with Adam so the
quantized block, fed the quantized model's activations, reproduces the float block's outputs
on the float model's activations. This corrects the error the earlier blocks let through,
which layer-wise GPTQ cannot see.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from compactnn.core.context import CompressContext
from compactnn.core.qlayers import QuantLinear
from compactnn.core.quantize import round_scale
from compactnn.quant.gptq import GPTQConfig, apply_gptq
from compactnn.registry import register


def _dequant(layer: QuantLinear, log_factor: torch.Tensor) -> torch.Tensor:
    """Weight ``(out, in)`` of ``layer`` with its scales multiplied by ``exp(log_factor)``."""
    rows, ngroups = layer.weight_scale.shape
    codes = layer.weight_codes.float().reshape(rows, ngroups, -1)
    scale = (layer.weight_scale * log_factor.exp()).unsqueeze(-1)
    w = (codes - layer.weight_zero.unsqueeze(-1)) * scale
    return w.reshape(layer.weight.shape)


def tune_block(
    block: nn.Module,
    calls: list,
    q_inps: list[torch.Tensor],
    targets: list[torch.Tensor],
    steps: int,
    lr: float,
    seed: int = 0,
) -> float:
    """Tune the scales and biases of ``block``'s ``QuantLinear`` layers in place.

    Args:
        block: the block with quantized layers.
        calls: ``(args, kwargs)`` per calibration batch (hidden states replaced per call).
        q_inps: the block's inputs from the quantized model, one ``(B, T, C)`` per batch.
        targets: the float block's outputs on the float model's inputs, same shapes.
        steps: Adam steps (one calibration batch each, in a seeded random order).
        lr: learning rate.
        seed: seed of the batch order.

    Returns:
        The final mean squared error over all batches.
    """
    from compactnn.quant.sequential import with_hidden

    qlayers = {n: m for n, m in block.named_modules() if isinstance(m, QuantLinear)}
    factors = {n: torch.zeros_like(m.weight_scale, requires_grad=True) for n, m in qlayers.items()}
    qweights = {f"{n}.weight" for n in qlayers}
    biases = {  # every 1-D float parameter: biases and norm gains
        n: p.detach().clone().requires_grad_(True)
        for n, p in block.named_parameters()
        if p.dim() == 1 and n not in qweights
    }
    opt = torch.optim.Adam([*factors.values(), *biases.values()], lr=lr)
    gen = torch.Generator().manual_seed(seed)

    def forward(i: int) -> torch.Tensor:
        params = {f"{n}.weight": _dequant(m, factors[n]) for n, m in qlayers.items()}
        params.update(biases)
        args, kwargs = with_hidden(*calls[i], q_inps[i])
        out = torch.func.functional_call(block, params, args, kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def loss_of(i: int) -> torch.Tensor:
        return (forward(i) - targets[i]).pow(2).mean() / targets[i].pow(2).mean()

    with torch.no_grad():
        before = sum(float(loss_of(i)) for i in range(len(calls)))
    for _ in range(steps):
        i = int(torch.randint(len(calls), (1,), generator=gen))
        opt.zero_grad()
        loss_of(i).backward()
        opt.step()
    with torch.no_grad():
        after = sum(float(loss_of(i)) for i in range(len(calls)))
        if after >= before:  # tuning made it worse on the calibration data: keep GPTQ's result
            return before / len(calls)
        for n, m in qlayers.items():
            scale = round_scale(m.weight_scale * factors[n].exp())
            m.set_quantized_weight(m.weight_codes, scale, m.weight_zero)
        named = dict(block.named_parameters())
        for n, b in biases.items():
            named[n].copy_(b)
    return after / len(calls)


@dataclasses.dataclass(frozen=True)
class GPTQTuneConfig(GPTQConfig):
    """GPTQ followed by block-wise tuning of scales and biases (the best combination here).

    Same fields as :class:`GPTQConfig`, with tuning on by default.
    """

    tune_steps: int = 100
    tune_lr: float = 3e-3


@register("gptq_tune", GPTQTuneConfig, "GPTQ + block-wise tuning of scales and biases")
def apply_gptq_tune(
    model: nn.Module, targets: dict[str, nn.Module], config: GPTQTuneConfig, ctx: CompressContext
) -> nn.Module:
    """GPTQ block by block, each block then tuned against the float block's outputs."""
    return apply_gptq(model, targets, config, ctx)
