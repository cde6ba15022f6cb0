"""Structured pruning of Hugging Face transformers: attention heads and MLP widths.

Supported layouts (the module names Hugging Face uses):

* BERT-style encoders: ``<layer>.attention.self.{query,key,value}`` with the head
  projection ``<layer>.attention.output.dense``; MLP ``<layer>.intermediate.dense`` ->
  ``<layer>.output.dense``.
* LLaMA-style decoders: MLP ``mlp.{gate_proj,up_proj}`` -> ``mlp.down_proj`` (attention
  heads of these models are left alone: grouped-query attention ties them in groups).
* GPT-2: MLP ``mlp.c_fc`` -> ``mlp.c_proj`` (its ``Conv1D`` layers, which ``compress``
  turns into ``nn.Linear`` first; attention heads are left alone: ``c_attn`` packs
  query, key and value in one layer).

Heads are ranked by the L1 norm of their query/key/value rows and output columns; MLP units
by the L1 norm of their input rows and output column. The hidden size is never changed, so
embeddings, norms and the model's outputs keep their shapes.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from compactnn.core.context import CompressContext
from compactnn.core.modules import set_module
from compactnn.errors import CompactnnError


def is_hf_transformer(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face ``PreTrainedModel``. Never imports transformers
    (a model can only be one if it is loaded): importing it costs a CNN's channel pruning
    about 1.3 s and torchao's import-time log lines."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def slice_linear(layer: nn.Linear, keep: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping rows (``dim=0``: outputs) or columns (``dim=1``: inputs)."""
    w = layer.weight.detach().index_select(dim, keep)
    new = nn.Linear(w.shape[1], w.shape[0], bias=layer.bias is not None)
    new.to(layer.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if layer.bias is not None:
            new.bias.copy_(layer.bias if dim == 1 else layer.bias.detach()[keep])
    return new


def units_removed(n: int, ratio: float) -> int:
    """Units (MLP channels or attention heads) a transformer group of ``n`` loses at
    ``ratio``: ``floor(n * ratio)``, at most ``n - 1``. The count Probe Pruning skips
    (``pp30`` and ``ch30`` compare like for like); a CNN group instead keeps
    ``floor(n * (1 - ratio))`` (:func:`compactnn.prune.channel.kept_channels`).

    Example:
        >>> units_removed(128, 0.3), units_removed(100, 0.29), units_removed(4, 1.0)
        (38, 29, 3)
    """
    return min(int(n * ratio + 1e-9), n - 1)  # 1e-9: 100 * 0.29 is 28.999999999999996


def _kept(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Sorted indices of the entries kept when removing ``fraction`` of the lowest scores."""
    n_remove = units_removed(scores.numel(), fraction)
    keep = torch.argsort(scores, descending=True, stable=True)[: scores.numel() - n_remove]
    return keep.sort().values


def prune_heads_bert(model: nn.Module, name: str, fraction: float) -> int:
    """Remove the ``fraction`` least important heads of the attention at ``name``
    (a ``BertSelfAttention``-like module); returns the heads removed."""
    att = model.get_submodule(name)
    out_name = name.rsplit(".", 1)[0] + ".output.dense"
    out = model.get_submodule(out_name)
    d = att.attention_head_size
    heads = att.query.out_features // d
    score = sum(
        getattr(att, p).weight.detach().abs().reshape(heads, d, -1).sum((1, 2))
        for p in ("query", "key", "value")
    ) + out.weight.detach().abs().reshape(out.out_features, heads, d).sum((0, 2))  # (heads,)
    keep_heads = _kept(score, fraction)
    keep = (keep_heads[:, None] * d + torch.arange(d)[None, :]).reshape(-1)  # (kept*d,)
    for p in ("query", "key", "value"):
        set_module(att, p, slice_linear(getattr(att, p), keep, 0))
    set_module(model, out_name, slice_linear(out, keep, 1))
    att.num_attention_heads = int(keep_heads.numel())
    att.all_head_size = int(keep.numel())
    return heads - int(keep_heads.numel())


def prune_mlp(model: nn.Module, ins: list[str], out_name: str, fraction: float) -> int:
    """Remove the ``fraction`` least important hidden units between the input projections
    ``ins`` and the output projection ``out_name``; returns the units removed."""
    out = model.get_submodule(out_name)
    score = out.weight.detach().abs().sum(0)  # (hidden,)
    for n in ins:
        score = score + model.get_submodule(n).weight.detach().abs().sum(1)
    keep = _kept(score, fraction)
    for n in ins:
        set_module(model, n, slice_linear(model.get_submodule(n), keep, 0))
    set_module(model, out_name, slice_linear(out, keep, 1))
    return score.numel() - keep.numel()


def _is_linear(model: nn.Module, name: str) -> bool:
    return isinstance(model.get_submodule(name), nn.Linear)


def _mlp_pairs(model: nn.Module, targets: dict) -> list[tuple[list[str], str]]:
    names = {n for n, _ in model.named_modules()}
    pairs = []
    for n in names:
        if n.endswith(".intermediate.dense"):
            out = n.removesuffix("intermediate.dense") + "output.dense"
            if out in names and n in targets:
                pairs.append(([n], out))
        if n.endswith(".mlp.down_proj") and n in targets:
            base = n.removesuffix("down_proj")
            ins = [base + p for p in ("gate_proj", "up_proj") if base + p in names]
            if ins:
                pairs.append((ins, n))
        if n.endswith(".mlp.c_proj") and n in targets:  # GPT-2, its Conv1D made Linear
            fc = n.removesuffix("c_proj") + "c_fc"
            if fc in names and all(_is_linear(model, m) for m in (fc, n)):
                pairs.append(([fc], n))
    return sorted(pairs, key=lambda p: p[1])


def prune_transformer(model: nn.Module, targets: dict, config, ctx: CompressContext) -> None:
    """Remove ``config.heads`` of the heads and ``config.ratio`` of the MLP units.

    Refuses a model in which neither is found (the recipe would remove nothing), and warns
    when one of the two the recipe asks for is not found."""
    removed_heads = removed_units = 0
    found_heads = pairs = []
    if config.heads:
        found_heads = [
            n
            for n, m in list(model.named_modules())
            if all(hasattr(m, p) for p in ("query", "key", "value", "attention_head_size"))
            and f"{n}.query" in targets
        ]
        for n in found_heads:
            removed_heads += prune_heads_bert(model, n, config.heads)
    if config.ratio:
        pairs = _mlp_pairs(model, targets)
        for ins, out in pairs:
            removed_units += prune_mlp(model, ins, out, config.ratio)
    kind = type(model).__name__
    if not found_heads and not pairs:
        raise CompactnnError(
            f"channel pruning found nothing to remove in {kind}: it prunes the MLPs of BERT-, "
            "GPT-2- and LLaMA-style transformers and the attention heads of BERT-style ones; "
            "prune this model unstructured instead (e.g. sp50-sparsegpt, sp50-wanda or nm2:4)."
        )
    if config.heads and not found_heads:
        ctx.warn(
            f"channel pruning: heads={config.heads:g} removed no attention heads: {kind} has no "
            "BERT-style attention (query/key/value) among the targets; only its MLPs were pruned."
        )
    if config.ratio and not pairs:
        ctx.warn(
            f"channel pruning: ratio={config.ratio:g} removed no MLP units: {kind} has no "
            "BERT-, GPT-2- or LLaMA-style MLP among the targets; only its heads were pruned."
        )
    ctx.notes.append(
        f"channel pruning (transformer): removed {removed_heads} attention heads and "
        f"{removed_units} MLP units"
    )
