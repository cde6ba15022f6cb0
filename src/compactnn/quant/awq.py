"""AWQ (Lin et al. 2023): activation-aware per-input-channel scaling before quantization.

For a group of linear layers reading one tensor ``x`` produced by a foldable op (a norm, or a
linear layer through an op linear in it: v -> o, up -> down, fc1 -> ReLU -> fc2), the weight
columns are multiplied by ``s = mean|x|^alpha`` and the producer's output divided by ``s``:
the float function is unchanged, but salient input channels get finer quantization. ``alpha``
is searched per group to minimise the quantized groups' output error. Each candidate pair is
first checked numerically (a random scale must leave the block's output unchanged), so the
method never changes a model it does not understand: post-norm encoders such as BERT, whose
norm output also feeds the residual, keep their norms untouched.

Weights are then rounded to nearest, with each group's clipping range searched to minimise
the activation-weighted error (AWQ's clip search).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from compactnn.core.context import CompressContext
from compactnn.core.qlayers import rtn_weight_qparams
from compactnn.core.quantize import dequantize, grouped_view
from compactnn.core.spec import QuantSpec
from compactnn.errors import CompactnnError
from compactnn.quant.base import QuantConfig
from compactnn.registry import register

# (producer suffix, consumer suffix) pairs joined by an op that is linear per channel.
NAMED_PAIRS = (
    ("v_proj", "o_proj"),
    ("v_proj", "out_proj"),
    ("attention.self.value", "attention.output.dense"),
    ("up_proj", "down_proj"),
    ("fc1", "fc2"),
)


@dataclasses.dataclass(frozen=True)
class AWQConfig(QuantConfig):
    """AWQ settings.

    Args:
        grid: number of ``alpha`` values tried in ``[0, 1)``.
        max_tokens: calibration tokens used by the scale search of one group.
    """

    grid: int = 20
    max_tokens: int = 4096

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.grid < 1 or self.max_tokens < 16:
            raise CompactnnError("AWQ needs grid >= 1 and max_tokens >= 16.")

    @property
    def awq(self) -> bool:
        return True

    @classmethod
    def from_short(cls, wbits, abits, group, range_method="mse", **kwargs):
        """Short names ``w<W>[-g<G>]-awq``: asymmetric groups, activation-weighted clip search."""
        return super().from_short(wbits, abits, group, range_method=range_method, **kwargs)


def fold_scale(producer: nn.Module, consumers: list[nn.Module], s: torch.Tensor) -> None:
    """Divide ``producer``'s output channels by ``s`` and multiply consumers' inputs by ``s``.

    ``producer`` is a norm (1-D weight, optional bias) or a linear layer; ``s`` is ``(C,)``.
    """
    with torch.no_grad():
        if isinstance(producer, nn.Linear):
            producer.weight.div_(s.unsqueeze(1))  # (C, in) rows
        else:
            producer.weight.div_(s)
        if getattr(producer, "bias", None) is not None:
            producer.bias.div_(s)
        for c in consumers:
            c.weight.mul_(s.unsqueeze(0))  # (out, C) columns


def search_scale(
    x: torch.Tensor, weights: list[torch.Tensor], spec: QuantSpec, grid: int = 20
) -> torch.Tensor:
    """AWQ's scale ``(C,)`` for consumers ``weights`` (each ``(out, C)``) reading ``x`` ``(N, C)``.

    ``alpha = 0`` (no scaling) is always a candidate, so the result is never worse on ``x``.
    """
    x = x.float()
    xmean = x.abs().mean(0).clamp(min=1e-5)
    fast = dataclasses.replace(spec, range_method="minmax")
    ref = [x @ w.T for w in weights]
    best, best_s = float("inf"), torch.ones_like(xmean)
    for i in range(grid):
        s = xmean.pow(i / grid)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w, r in zip(weights, ref, strict=True):
            codes, scale, zero = rtn_weight_qparams(w * s, fast)
            cg = grouped_view(codes, fast.granularity, fast.group_size)
            wq = dequantize(cg, scale, zero).reshape(w.shape) / s
            err += float((x @ wq.T - r).pow(2).mean())
        if err < best:
            best, best_s = err, s
    return best_s


def _is_norm(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return "Norm" in type(m).__name__ and isinstance(w, torch.Tensor) and w.dim() == 1


def find_scale_pairs(
    block: nn.Module, run: Callable[[], torch.Tensor], layers: list[str]
) -> list[tuple[str, list[str]]]:
    """Candidate ``(producer, consumers)`` pairs among ``layers`` (names in ``block``).

    ``run()`` runs ``block`` (or the model holding it) once on calibration data.
    """
    produced: list[tuple[str, torch.Tensor]] = []  # kept alive so identity checks are sound
    readers: dict[str, list[str]] = {}
    hooks = []
    for n, m in block.named_modules():
        if _is_norm(m):
            hooks.append(m.register_forward_hook(lambda _m, _a, o, n=n: produced.append((n, o))))
        if n in layers:

            def pre(_m, args, n=n):
                src = next((p for p, t in produced if t is args[0]), None)
                if src is not None:
                    readers.setdefault(src, []).append(n)

            hooks.append(m.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    pairs = [(src, names) for src, names in readers.items()]
    for a, b in NAMED_PAIRS:
        for n in layers:
            if n.endswith(b):
                prod = n[: -len(b)] + a
                if prod in layers and block.get_submodule(prod).out_features == len_in(block, n):
                    pairs.append((prod, [n]))
    return pairs


def len_in(block: nn.Module, name: str) -> int:
    return block.get_submodule(name).in_features


def fold_is_exact(block: nn.Module, run: Callable, producer: str, consumers: list[str]) -> bool:
    """Whether a random channel scale folded into the pair leaves ``run()``'s output unchanged."""
    mods = [block.get_submodule(n) for n in [producer, *consumers]]
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in mods]
    c = mods[1].in_features
    s = 1.0 + torch.rand(c, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = run()
        fold_scale(mods[0], mods[1:], s)
        after = run()
    for m, st in zip(mods, saved, strict=True):
        m.load_state_dict(st)
    return bool(torch.allclose(after, before, rtol=1e-3, atol=1e-4 * before.abs().max()))


def _inputs_of(block, calls, hidden, name: str, max_tokens: int) -> torch.Tensor:
    """Up to ``max_tokens`` rows ``(N, C)`` of the input of ``block.<name>``."""
    from compactnn.quant.sequential import run_block

    xs: list[torch.Tensor] = []
    h = block.get_submodule(name).register_forward_pre_hook(
        lambda _m, a: xs.append(a[0].detach().reshape(-1, a[0].shape[-1]))
    )
    try:
        with torch.no_grad():
            for c, hid in zip(calls, hidden, strict=True):
                run_block(block, c, hid)
                if sum(len(x) for x in xs) >= max_tokens:
                    break
    finally:
        h.remove()
    return torch.cat(xs)[:max_tokens]


def awq_block(block: nn.Module, prefix: str, specs: dict, calls, hidden, config) -> int:
    """Search and fold AWQ scales for every exact pair in ``block``; returns pairs scaled."""
    from compactnn.quant.sequential import run_block

    local = {n for n, _ in block.named_modules() if f"{prefix}.{n}" in specs}
    done = 0
    run = lambda: run_block(block, calls[0], hidden[0])  # noqa: E731
    for producer, consumers in find_scale_pairs(block, run, sorted(local)):
        if not fold_is_exact(block, run, producer, consumers):
            continue
        x = _inputs_of(block, calls, hidden, consumers[0], getattr(config, "max_tokens", 4096))
        mods = [block.get_submodule(n) for n in consumers]
        wspec = specs[f"{prefix}.{consumers[0]}"][0]
        s = search_scale(x, [m.weight.detach() for m in mods], wspec, getattr(config, "grid", 20))
        fold_scale(block.get_submodule(producer), mods, s)
        done += 1
    return done


@register("awq", AWQConfig, "AWQ: activation-aware channel scaling + clip search, per block")
def apply_awq(
    model: nn.Module, targets: dict[str, nn.Module], config: AWQConfig, ctx: CompressContext
) -> nn.Module:
    """AWQ scales folded into the model, then activation-weighted round-to-nearest."""
    from compactnn.quant.sequential import run_sequential

    ctx.require_calibration("awq", 64)
    return run_sequential(model, targets, config, ctx)
