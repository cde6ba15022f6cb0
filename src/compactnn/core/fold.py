"""Batch-norm folding: ``conv -> bn`` becomes one conv with rescaled weight and a bias."""

from __future__ import annotations

import warnings
from collections import Counter

import torch
from torch import fx, nn

from compactnn.core.modules import set_module
from compactnn.errors import user_stacklevel


def fold_bn_into_conv(conv: nn.Conv1d | nn.Conv2d | nn.Linear, bn: nn.Module) -> None:
    """Fold an eval-mode BatchNorm into ``conv`` in place.

    ``w' = w * gamma / sqrt(var + eps)`` per output channel and
    ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``.
    """
    with torch.no_grad():
        inv_std = torch.rsqrt(bn.running_var.float() + bn.eps)
        gamma = bn.weight.float() if bn.affine else torch.ones_like(inv_std)
        beta = bn.bias.float() if bn.affine else torch.zeros_like(inv_std)
        factor = gamma * inv_std  # (out,)
        shape = (-1,) + (1,) * (conv.weight.dim() - 1)
        conv.weight.mul_(factor.reshape(shape).to(conv.weight.dtype))
        bias = conv.bias.float() if conv.bias is not None else torch.zeros_like(factor)
        new_bias = (bias - bn.running_mean.float()) * factor + beta
        if conv.bias is None:
            conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype))
        else:
            conv.bias.copy_(new_bias)


def find_conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv_name, bn_name)`` pairs where the BN is the conv's only consumer, each once.

    Traced with ``torch.fx``; a model that does not trace has no pairs found (it is then
    quantized without folding, which is correct but loses a little accuracy).
    """
    try:
        gm = fx.symbolic_trace(model)
    except Exception:
        return []
    modules = dict(gm.named_modules())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    found: Counter[tuple[str, str]] = Counter()  # call sites of each pair, in graph order
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(
            modules.get(node.target), (nn.BatchNorm1d, nn.BatchNorm2d)
        ):
            continue
        src = node.args[0] if node.args else None
        if (
            isinstance(src, fx.Node)
            and src.op == "call_module"
            and isinstance(modules.get(src.target), (nn.Conv1d, nn.Conv2d))
            and len(src.users) == 1
            and modules[node.target].track_running_stats
        ):
            conv = modules[src.target]
            if conv.out_channels == modules[node.target].num_features:
                found[(src.target, node.target)] += 1
    # a module called more than once (a forward that runs a block twice): folded once, and
    # only when every call of the conv feeds the BN and every call of the BN reads the conv
    return [(c, b) for (c, b), n in found.items() if calls[c] == n == calls[b]]


def fold_batchnorm(model: nn.Module, pairs: list[tuple[str, str]] | None = None) -> list[str]:
    """Fold every ``conv -> bn`` pair of ``model`` in place; return the folded BN names.

    The BN modules are replaced by ``nn.Identity``.
    """
    pairs = find_conv_bn_pairs(model) if pairs is None else pairs
    for conv_name, bn_name in pairs:
        conv = model.get_submodule(conv_name)
        fold_bn_into_conv(conv, model.get_submodule(bn_name))
        set_module(model, bn_name, nn.Identity())
        if getattr(conv, "_forward_hooks", None):  # they now see conv + BN, not the conv
            warnings.warn(
                f"the forward hooks on {conv_name!r} now see its output with {bn_name!r} "
                "folded in (batch-norm folding); register them on the compressed model if "
                "they need the convolution's own output.",
                stacklevel=user_stacklevel(),
            )
    return [bn for _, bn in pairs]
