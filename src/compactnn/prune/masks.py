"""Weight masks: compute them, keep them through training, bake them into the weights.

A mask is a 0/1 float tensor of a weight's shape. While a model trains, each masked weight
is a ``torch.nn.utils.parametrize`` parametrization, so ``layer.weight`` *is* ``dense * mask``
whatever the optimizer does to ``dense`` (momentum and weight decay included): the sparse
pattern survives fine-tuning. ``bake_masks`` removes the parametrizations and leaves plain
weights with exact zeros.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize

from compactnn.core.qembedding import tied_heads
from compactnn.core.qlayers import is_quant_layer
from compactnn.errors import CompactnnError, name_list, user_stacklevel


class MaskedWeight(nn.Module):
    """Parametrization ``w -> w * mask``.

    With ``straight_through`` the forward value is the same but the gradient reaches every
    entry of the dense weight (Dynamic Network Surgery updates pruned weights too, so they
    can be spliced back).
    """

    def __init__(self, mask: torch.Tensor, straight_through: bool = False) -> None:
        super().__init__()
        self.register_buffer("mask", mask.detach().to(torch.float32).clone())
        self.straight_through = straight_through

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        masked = torch.where(self.mask.bool(), w, torch.zeros_like(w))  # +0.0, never -0.0
        if self.straight_through:
            return w + (masked - w).detach()
        return masked


def check_sparsity(value: float, field: str = "sparsity", what: str = "weights") -> None:
    """Raise ``CompactnnError`` unless ``0 <= value < 1``; ``what``: the things removed
    (``"weights"``, ``"channels"``, ``"attention heads"``), named in the message."""
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise CompactnnError(
            f"{field}={value!r} is outside [0, 1): give the fraction of {what} to remove, "
            "e.g. 0.5 for half of them (1.0 would remove every one)."
        )


def check_removes_some(value: float, where: str, what: str, example: str) -> None:
    """Raise ``CompactnnError`` when the fraction ``value`` is 0: a step that removes
    nothing would write a "pruned" artifact of the float model, so it is refused as the
    short names ``sp0`` and ``ch0`` and ``ChannelConfig(ratio=0)`` are. ``where``: the
    config and field, ``what``: the things removed, ``example``: a value that works."""
    if float(value) == 0.0:
        raise CompactnnError(
            f"{where} removes nothing: give the fraction of {what} to remove, in (0, 1), "
            f"e.g. {example}."
        )


def check_nm(n: int, m: int) -> None:
    """Raise ``CompactnnError`` unless ``0 < n < m`` (integers).

    Example:
        >>> check_nm(2, 4)
    """
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
        raise CompactnnError(f"N:M sparsity needs integers 0 < N < M, got {n}:{m} (e.g. 2:4).")


def check_divides(name: str, weight: torch.Tensor, m: int) -> None:
    """Raise ``CompactnnError`` when ``m`` does not divide the layer's input dimension.

    Example:
        >>> check_divides("fc", torch.zeros(2, 8), 4)
    """
    k = weight[0].numel()
    if k % m:
        raise CompactnnError(
            f"{name}: N:M groups of M={m} do not divide its input dimension {k} "
            f"(weight shape {tuple(weight.shape)}); choose M dividing {k} or add {name!r} "
            "to the step's targets.ignore."
        )


def split_divisible(
    layers: dict[str, nn.Module], m: int
) -> tuple[dict[str, nn.Module], dict[str, int]]:
    """``(layers whose input size M divides, {name: input size} of the others)``.

    Example:
        >>> split_divisible({"a": nn.Linear(8, 2), "b": nn.Linear(9, 2)}, 4)[1]
        {'b': 9}
    """
    keep, dense = {}, {}
    for name, layer in layers.items():
        k = layer.weight[0].numel()  # in_features, or in_channels/groups * kh * kw
        if k % m:
            dense[name] = k
        else:
            keep[name] = layer
    return keep, dense


def keep_nm_divisible(
    layers: dict[str, nn.Module], n: int, m: int, ctx, method: str
) -> dict[str, nn.Module]:
    """The layers whose input size ``m`` divides; the others (a first conv with 1x3x3 = 9
    inputs) stay dense, named in one warning (also in the model's notes). When none is left,
    a ``CompactnnError``.

    Example:
        >>> keep_nm_divisible({"a": nn.Linear(8, 2)}, 2, 4, None, "nm")
        {'a': Linear(in_features=8, out_features=2, bias=True)}
    """
    layers, dense = split_divisible(layers, m)
    if dense:
        listing = ", ".join(f"{name} ({k} inputs)" for name, k in dense.items())
        if not layers:
            raise CompactnnError(
                f"{method} {n}:{m}: M={m} divides the input size of none of the "
                f"targeted layers: {listing}; choose an M that divides them."
            )
        ctx.warn(f"{method} {n}:{m}: kept dense (input size not divisible by M={m}): {listing}")
        for name, k in dense.items():  # the reason the float-layer report gives
            ctx.skipped[name] = (
                f"{method} {n}:{m} kept it dense (input size {k} not divisible by M)"
            )
    return layers


def skip_tied(
    model: nn.Module, targets: dict[str, nn.Module], ctx, method: str
) -> dict[str, nn.Module]:
    """``targets`` less the Linear layers whose weight *is* an embedding table's (an LM head
    tied to the token embedding, as GPT-2's): pruning such a head would prune the embedding.

    Each head left out is named, with its table, in a warning and in ``ctx.skipped`` (the
    reason the float-layer report gives). When the step targets the table too (e.g.
    ``targets.classes: [Linear, Embedding]``, or both names), the user asked for both: the
    shared tensor is pruned once, through the head (the table is dropped from the result).

    Example:
        >>> m = nn.ModuleDict({"emb": nn.Embedding(4, 2), "head": nn.Linear(2, 4)})
        >>> m["head"].weight = m["emb"].weight
        >>> list(skip_tied(m, {"emb": m["emb"], "head": m["head"]}, None, "sp50"))
        ['head']
    """
    out = dict(targets)
    for table, (head, layer) in tied_heads(model).items():
        if head not in out:
            continue
        both = [
            n for n, m in out.items() if n != head and getattr(m, "weight", None) is layer.weight
        ]
        if both:  # the table is targeted as well: prune the one tensor once
            for n in both:
                out.pop(n)
            continue
        out.pop(head)
        ctx.skipped[head] = f"tied to {table}: pruning it would prune the embedding"
        ctx.warn(
            f"{method}: {head} left dense: its weight is {table}'s (tied), so pruning it would "
            f"prune the embedding too; add {table} to the step's targets to prune both."
        )
    return out


def prunable_layers(targets: dict[str, nn.Module], ctx=None) -> dict[str, nn.Module]:
    """Targeted layers that own a weight matrix or kernel and are not quantized yet.

    A quantized layer's integer codes are its ground truth, so it is skipped (prune before
    quantizing) with a warning (into ``ctx.notes``) when a context is given. When every
    targeted weight layer is quantized, the step would prune nothing: that raises a
    ``CompactnnError`` naming the fix (put the pruning step first).
    """
    out, quantized = {}, []
    for name, m in targets.items():
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() < 2:
            continue
        if is_quant_layer(m):
            quantized.append(name)
            continue
        out[name] = m
    if quantized and not out:
        raise CompactnnError(
            f"the pruning step would prune nothing: every layer it targets "
            f"({name_list(quantized, 3)}) is already quantized by an earlier step; put the "
            "pruning step before the quantization step in the recipe (prune, then quantize)."
        )
    if ctx is not None:
        for name in quantized:
            ctx.warn(f"{name}: already quantized; prune before quantizing. Skipped.")
    return out


def _keep_top(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Mask keeping all but the ``n_prune`` lowest scores (exact count, ties by index)."""
    flat = scores.reshape(-1)
    mask = torch.ones_like(flat, dtype=torch.float32)
    if n_prune > 0:
        order = torch.argsort(flat, stable=True)
        mask[order[:n_prune]] = 0.0
    return mask.reshape(scores.shape)


def masks_from_scores(
    scores: dict[str, torch.Tensor], sparsity: float, scope: str = "layer", ctx=None
) -> dict[str, torch.Tensor]:
    """Masks removing the lowest-scoring fraction ``sparsity`` of entries.

    Global ranking has a floor: when it would zero a whole output row (a neuron, a conv
    filter; at high sparsity a whole layer whose weights are small, which gives every input
    the same output), each row of every layer keeps its highest-scoring entry and the
    ranking is redone with those kept; a warning names the layers where the floor binds.

    Args:
        scores: name -> importance tensor (the weight's shape, rows = outputs); higher is
            kept.
        sparsity: fraction removed, per layer (``scope="layer"``) or over all layers pooled
            (``scope="global"``).
        scope: ``"layer"`` or ``"global"``.
        ctx: where the floor's warning goes (also into the notes); default ``warnings``.
    """
    check_sparsity(sparsity)
    if scope == "layer":
        return {n: _keep_top(s, round(sparsity * s.numel())) for n, s in scores.items()}
    if scope != "global":
        raise CompactnnError(f"scope={scope!r}; use 'layer' or 'global'.")
    masks = _pooled_masks(scores, sparsity)
    dead = {n: d for n, mask in masks.items() if (d := _dead_rows(mask))}
    if not dead:
        return masks
    # the floor: each output row keeps its best entry (ranked above everything else), so no
    # layer is cut off (a zero layer gives every input the same output); the total is exact
    floored = {n: _with_row_best_first(s) for n, s in scores.items()}
    listing = ", ".join(
        f"{n} ({'all ' if d == scores[n].shape[0] else ''}{d} of {scores[n].shape[0]} rows)"
        for n, d in dead.items()
    )
    message = (
        f"global pruning at {sparsity:.0%} would zero whole output rows of {listing}; each "
        "row keeps its largest weight (the rest of the budget comes from the other weights)."
    )
    if ctx is not None:
        ctx.warn(message)
    else:
        warnings.warn(message, stacklevel=user_stacklevel())
    return _pooled_masks(floored, sparsity)


def _pooled_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Global ranking: the ``sparsity`` fraction of all entries pooled, lowest first (never
    an entry scored +inf, so fewer when they outnumber the rest)."""
    flat = torch.cat([s.reshape(-1).float() for s in scores.values()])
    n_prune = min(round(sparsity * flat.numel()), int((flat != float("inf")).sum()))
    pooled = _keep_top(flat, n_prune)
    out, start = {}, 0
    for n, s in scores.items():
        out[n] = pooled[start : start + s.numel()].reshape(s.shape)
        start += s.numel()
    return out


def _dead_rows(mask: torch.Tensor) -> int:
    """Output rows (first dimension) of a mask with nothing kept."""
    if mask.dim() < 2:
        return 0
    return int((mask.reshape(mask.shape[0], -1).sum(1) == 0).sum())


def _with_row_best_first(scores: torch.Tensor) -> torch.Tensor:
    """``scores`` with each output row's highest entry raised to +inf (never pruned)."""
    if scores.dim() < 2:
        return scores
    rows = scores.reshape(scores.shape[0], -1).float().clone()  # (out, K)
    rows.scatter_(1, rows.argmax(1, keepdim=True), float("inf"))
    return rows.reshape(scores.shape)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest of every ``m`` consecutive entries along the input dimension.

    ``scores`` has shape ``(out, K)`` (a conv kernel is flattened to ``(out, in*kh*kw)``).
    """
    rows = scores.reshape(scores.shape[0], -1)  # (out, K)
    groups = rows.reshape(rows.shape[0], -1, m)  # (out, K/m, m)
    keep = torch.topk(groups, n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.float32).scatter_(-1, keep, 1.0)
    return mask.reshape(scores.shape)


def attach_masks(
    model: nn.Module, masks: dict[str, torch.Tensor], straight_through: bool = False
) -> None:
    """Make each named layer's weight ``dense * mask`` (replacing an existing mask)."""
    for name, mask in masks.items():
        layer = model.get_submodule(name)
        if parametrize.is_parametrized(layer, "weight"):
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
        parametrize.register_parametrization(
            layer, "weight", MaskedWeight(mask, straight_through), unsafe=True
        )


def set_mask(model: nn.Module, name: str, mask: torch.Tensor) -> None:
    """Replace the mask of an already masked layer in place (keeps the optimizer's params)."""
    layer = model.get_submodule(name)
    layer.parametrizations.weight[0].mask.copy_(mask)


def dense_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The unmasked weight of a masked layer (or the plain weight)."""
    layer = model.get_submodule(name)
    if parametrize.is_parametrized(layer, "weight"):
        return layer.parametrizations.weight.original
    return layer.weight


def current_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Masks of every masked layer of ``model``."""
    return {
        n: m.parametrizations.weight[0].mask.clone()
        for n, m in model.named_modules()
        if parametrize.is_parametrized(m, "weight")
    }


def bake_masks(model: nn.Module) -> None:
    """Remove every mask parametrization, leaving weights with exact zeros."""
    for m in list(model.modules()):
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the masked-out weights in place (no parametrization left behind)."""
    with torch.no_grad():
        for name, mask in masks.items():
            w = model.get_submodule(name).weight
            # where() writes +0.0; w * 0 would leave -0.0 for negative weights, which the
            # sparse storage (bit-exact) would have to keep as non-zero
            w.copy_(torch.where(mask.bool(), w, torch.zeros_like(w)))


def zero_masks(model: nn.Module, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Masks of the current zeros: ``weight != 0`` for each weight layer (or ``names``)."""
    out = {}
    for n, m in model.named_modules():
        w = getattr(m, "weight", None)
        if names is not None and n not in names:
            continue
        if n and isinstance(w, torch.Tensor) and w.dim() >= 2 and not is_quant_layer(m):
            out[n] = (w.detach() != 0).float()
    return out


def sparsity_of(model: nn.Module) -> tuple[int, int]:
    """``(nonzero, total)`` entries over every weight matrix or kernel of ``model``."""
    nnz = total = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() >= 2:
            nnz += int((w != 0).sum())
            total += w.numel()
    return nnz, total
