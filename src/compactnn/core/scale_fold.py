"""Per-channel scales folded between a producer and its consumers (AWQ, SmoothQuant).

For a group of linear layers reading one tensor ``x`` produced by a foldable op (a norm, or a
linear layer through an op linear in it: v -> o, up -> down, fc1 -> ReLU -> fc2), multiplying
the consumers' weight columns by ``s`` and dividing the producer's output by ``s`` leaves the
float function unchanged. Each candidate pair is checked numerically (:func:`fold_is_exact`)
before use, so a model these rules do not understand (post-norm encoders such as BERT, whose
norm output also feeds the residual) is never changed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from compactnn.core.qlayers import rtn_weight_qparams
from compactnn.core.quantize import dequantize, grouped_view
from compactnn.core.spec import QuantSpec

# (producer suffix, consumer suffix) pairs joined by an op that is linear per channel.
NAMED_PAIRS = (
    ("v_proj", "o_proj"),
    ("v_proj", "out_proj"),
    ("attention.self.value", "attention.output.dense"),
    ("up_proj", "down_proj"),
    ("fc1", "fc2"),
)


def fold_scale(producer: nn.Module, consumers: list[nn.Module], s: torch.Tensor) -> None:
    """Divide ``producer``'s output channels by ``s`` and multiply consumers' inputs by ``s``.

    ``producer`` is a norm (1-D weight, optional bias) or a linear layer; ``s`` is ``(C,)``.

    Example:
        >>> fold_scale(norm, [q_proj, k_proj], torch.full((64,), 2.0))  # doctest: +SKIP
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

    ``s = mean|x|^alpha`` with ``alpha`` searched over ``grid`` values in ``[0, 1)`` to
    minimise the consumers' round-to-nearest output error; ``alpha = 0`` (no scaling) is
    always a candidate, so the result is never worse on ``x``.

    Example:
        >>> s = search_scale(x, [layer.weight], QuantSpec(bits=4))  # doctest: +SKIP
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

    ``run()`` runs ``block`` (or the model holding it) once on calibration data; a norm
    whose output tensor is read by some of ``layers`` is their producer. :data:`NAMED_PAIRS`
    adds the linear-to-linear pairs. Check each with :func:`fold_is_exact` before folding.

    Example:
        >>> find_scale_pairs(block, run, ["q_proj", "k_proj", "v_proj", "o_proj"])
        ... # doctest: +SKIP
        [('input_layernorm', ['q_proj', 'k_proj', 'v_proj']), ('v_proj', ['o_proj'])]
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
                if prod in layers and block.get_submodule(prod).out_features == _in_features(
                    block, n
                ):
                    pairs.append((prod, [n]))
    return pairs


def _in_features(block: nn.Module, name: str) -> int:
    return block.get_submodule(name).in_features


def fold_is_exact(block: nn.Module, run: Callable, producer: str, consumers: list[str]) -> bool:
    """Whether a random channel scale folded into the pair leaves ``run()``'s output unchanged.

    The pair's parameters are restored afterwards.

    Example:
        >>> fold_is_exact(block, run, "v_proj", ["o_proj"])  # doctest: +SKIP
        True
    """
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
