"""A quantized token-embedding table that stays a drop-in ``nn.Embedding``.

``QuantEmbedding`` holds the table as integer codes with one scale and zero point per row
(int8 per row) or per group of ``G`` entries along the embedding dimension (int4 / int3 /
int2 with groups), exactly like the weight storage of the quantized Linear layers
(:class:`compactnn.core.qlayers.IntegerWeightMixin`): rows are tokens, the grouped view is
``(num_embeddings, dim / G, G)``. ``weight`` is the codes' dequantization, so the simulated
model looks rows up in it; :mod:`compactnn.kernels.embedding` gathers codes instead.

A scaled token table (Gemma's ``GemmaTextScaledWordEmbedding``, BART's and other
``*ScaledWordEmbedding``: the lookup times a constant ``embed_scale``) keeps its factor: the
lookup is multiplied by ``embed_scale`` (float32, cast to the table's dtype as Gemma does).

It is not a "quant layer" (:func:`compactnn.core.qlayers.is_quant_layer` is False): it has no
input activation and no matrix product, so deployment, GPTQ and the linear kernels never
take it for a Linear. :func:`compactnn.core.qlayers.has_integer_weight` covers both.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import torch
from torch import nn

from compactnn.core.qlayers import IntegerWeightMixin, QuantLinear, rtn_weight_qparams
from compactnn.core.spec import QuantSpec
from compactnn.errors import CompactnnError

EMBEDDING_DEFAULT_GROUP = 64  # per-row group along the embedding dim for sub-8-bit tables


class QuantEmbedding(IntegerWeightMixin, nn.Embedding):
    """``nn.Embedding`` whose table is held as integer codes with per-row (group) grids.

    Example:
        >>> emb = nn.Embedding(10, 8)
        >>> q = quantize_embedding_rtn(emb, QuantSpec(bits=8, granularity="channel"))
        >>> q(torch.tensor([1, 2])).shape
        torch.Size([2, 8])
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        weight_spec: QuantSpec,
        embed_scale: float | None = None,
        **kw,
    ):
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, **kw)
        self._init_codes(weight_spec)
        factor = None if embed_scale is None else torch.tensor(checked_embed_scale(embed_scale))
        self.register_buffer("embed_scale", factor, persistent=False)

    @classmethod
    def like(cls, emb: nn.Embedding, weight_spec: QuantSpec) -> QuantEmbedding:
        """An empty quantized twin of ``emb`` (same geometry, options and lookup factor,
        codes unset)."""
        return cls(
            emb.num_embeddings,
            emb.embedding_dim,
            weight_spec,
            embed_scale=lookup_factor(emb),
            padding_idx=emb.padding_idx,
            scale_grad_by_freq=emb.scale_grad_by_freq,
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = nn.Embedding.forward(self, input)
        return out if self.embed_scale is None else out * self.embed_scale.to(out.dtype)

    def extra_repr(self) -> str:
        factor = "" if self.embed_scale is None else f", embed_scale={float(self.embed_scale):g}"
        return super().extra_repr() + factor


def checked_embed_scale(value: Any) -> float:
    """``embed_scale`` as a float: a finite real number or a one-element floating tensor.

    Example:
        >>> checked_embed_scale(torch.tensor([8.0]))
        8.0

    Raises:
        CompactnnError: a bool, string, non-finite number, or tensor of other size or dtype.
    """
    if isinstance(value, torch.Tensor):
        ok = value.numel() == 1 and value.is_floating_point() and not value.is_meta
        number = float(value.detach().float().cpu()) if ok else math.nan
        what = f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {list(value.shape)}"
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an int beyond float range
            number = math.inf
        what = repr(number)
    else:
        number = math.nan
        what = f"{value!r:.60}" if isinstance(value, (str, bool)) else f"a {type(value).__name__}"
    if not math.isfinite(number):
        raise CompactnnError(
            f"embed_scale={what} is not a finite number: pass the factor the lookup is "
            "multiplied by as a finite float (or a one-element float tensor), or None."
        )
    return number


def lookup_factor(emb: nn.Embedding) -> float | None:
    """The constant ``embed_scale`` a ``*ScaledWordEmbedding`` multiplies its lookup by (None
    for a plain table, or a factor that cannot be read: a tensor on the ``meta`` device).

    Example:
        >>> lookup_factor(nn.Embedding(4, 2)) is None
        True
    """
    if isinstance(emb, QuantEmbedding):
        return None if emb.embed_scale is None else float(emb.embed_scale)
    if not type(emb).__name__.endswith("ScaledWordEmbedding"):
        return None
    for key in ("scalar_embed_scale", "embed_scale"):  # Gemma keeps both; BART a float
        value = getattr(emb, key, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_meta:
            return float(value.float())
    return None


def embedding_spec(weight: QuantSpec, dim: int, bits: int | None = None) -> QuantSpec:
    """The grid of an embedding table under a recipe's weight spec ``weight``.

    Per row for 8 bits (symmetric) and for per-channel recipes; below 8 bits per group of the
    recipe's group size along the embedding dim (``EMBEDDING_DEFAULT_GROUP`` when the recipe
    has none), falling back to per row when the group does not divide ``dim``.

    Example:
        >>> embedding_spec(QuantSpec(bits=4, granularity="group", group_size=32), 384).group_size
        32
    """
    bits = weight.bits if bits is None else bits
    group = weight.group_size if weight.granularity == "group" else None
    if group is None and bits < 8:
        group = EMBEDDING_DEFAULT_GROUP
    if bits >= 8 or group is None or dim % group:
        group = None
    return QuantSpec(
        bits=bits,
        symmetric=weight.symmetric if bits < 8 else True,
        granularity="group" if group else "channel",
        group_size=group,
        range_method=weight.range_method,
        percentile=weight.percentile,
    )


def quantize_embedding_rtn(emb: nn.Embedding, spec: QuantSpec) -> QuantEmbedding:
    """Round-to-nearest quantized twin of the embedding table ``emb``."""
    q = QuantEmbedding.like(emb, spec)
    q.set_quantized_weight(*rtn_weight_qparams(emb.weight, spec))
    return q


def embedding_unsupported(emb: nn.Embedding) -> str | None:
    """Why ``emb`` cannot be held as codes (None when it can)."""
    factor = lookup_factor(emb)
    if factor is not None and not math.isfinite(factor):  # NaN: no lookup could match it
        return f"its scale factor is not a finite number ({factor})"
    if type(emb) is not nn.Embedding and (factor is None or not _scales(emb)):
        # e.g. OPT's learned positions: a forward of its own
        return (
            f"{type(emb).__name__} has a forward of its own (only nn.Embedding and scaled "
            "token tables, lookup * embed_scale, are quantized)"
        )
    if emb.max_norm is not None:
        return "max_norm renormalises the table in place on lookup"
    if emb.sparse:
        return "sparse gradients"
    if emb.weight.dim() != 2:
        return "not a 2-D table"
    return None


def _scales(emb: nn.Embedding) -> bool:
    """Whether ``emb``'s forward is the plain lookup times :func:`lookup_factor` (checked on a
    few rows, so a subclass doing more is never quantized as a scaled table)."""
    ids = torch.arange(min(4, emb.num_embeddings), device=emb.weight.device)
    try:
        with torch.no_grad():
            got = emb(ids)
    except Exception:  # a forward taking other inputs: not a scaled table
        return False
    want = nn.functional.embedding(ids, emb.weight) * torch.tensor(lookup_factor(emb))
    return got.shape == want.shape and torch.allclose(got.float(), want.float(), rtol=1e-2)


def with_bits(spec: QuantSpec, bits: int) -> QuantSpec:
    """``spec`` at ``bits`` (8 bits symmetric, the integer kernels' grid)."""
    return dataclasses.replace(spec, bits=bits, symmetric=spec.symmetric or bits == 8)


def tied_heads(model: nn.Module) -> dict[str, tuple[str, nn.Linear]]:
    """Embedding name -> (name, module) of a Linear whose weight *is* that table's weight
    (an LM head tied to the token embeddings, as GPT-2 and ``tie_word_embeddings`` do)."""
    tables = {
        id(m.weight): n for n, m in model.named_modules() if n and isinstance(m, nn.Embedding)
    }
    out = {}
    for n, m in model.named_modules():
        if n and isinstance(m, nn.Linear) and id(m.weight) in tables:
            out.setdefault(tables[id(m.weight)], (n, m))
    return out


def table_aliases(model: nn.Module) -> dict[str, list[str]]:
    """Embedding name -> the other names of ``nn.Embedding`` modules holding the very same
    weight (T5 and BART: ``shared``, ``encoder.embed_tokens``, ``decoder.embed_tokens``), or
    of the same module reached by another path; the first name met is the key. Tables with no
    alias map to an empty list.

    Example:
        >>> m = nn.ModuleDict({"a": nn.Embedding(4, 2), "b": nn.Embedding(4, 2)})
        >>> m["b"].weight = m["a"].weight
        >>> table_aliases(m)
        {'a': ['b']}
    """
    first: dict[int, str] = {}
    out: dict[str, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        if not n or not isinstance(m, nn.Embedding):
            continue
        owner = first.setdefault(id(m.weight), n)
        if owner == n:
            out[n] = []
        elif n not in out[owner]:  # a module reached by two paths is an alias as well
            out[owner].append(n)
    return out


def tie_to_table(head: nn.Linear, table: QuantEmbedding, act_spec: QuantSpec | None) -> QuantLinear:
    """A quantized twin of ``head`` that shares ``table``'s codes, grid and weight.

    The head's weight ``(vocab, dim)`` is the table itself, so the tie survives: one set of
    codes, stored once, read by the lookup and by the output projection.
    """
    if tuple(head.weight.shape) != tuple(table.weight.shape):
        raise ValueError(
            f"head weight {tuple(head.weight.shape)} is not the table {tuple(table.weight.shape)}"
        )
    q = QuantLinear(
        head.in_features, head.out_features, head.bias is not None, table.weight_spec, act_spec
    )
    if head.bias is not None:
        with torch.no_grad():
            q.bias.copy_(head.bias.detach().float())
        q.bias.requires_grad_(head.bias.requires_grad)
    share_codes(q, table)
    return q


def share_codes(head: QuantLinear, table: QuantEmbedding) -> None:
    """Make ``head`` hold the very tensors of ``table``'s weight and integer grid."""
    head.weight = table.weight
    for key in ("weight_codes", "weight_scale", "weight_zero"):
        setattr(head, key, getattr(table, key))


def is_tied_to(head: nn.Module, table: nn.Module) -> bool:
    """Whether ``head`` reads ``table``'s codes (the same tensor, not a copy)."""
    return getattr(head, "weight_codes", None) is getattr(table, "weight_codes", False)
