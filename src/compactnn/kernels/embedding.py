"""Quantized embedding lookup without a dense float table: gather the codes, then dequantize.

:class:`EmbeddingKernel` keeps a :class:`~compactnn.core.qembedding.QuantEmbedding`'s codes
packed (two 4-bit codes a byte for 2-4-bit tables, one byte a code for 5-8 bits) with the
per-row group scales and zero points. A lookup gathers the rows of the requested tokens,
unpacks them and dequantizes ``(q - zero) * scale`` in float32, the simulation's formula, so
in float32 the output equals the simulated model's lookup bit for bit. A scaled table
(Gemma's) multiplies the rows by its ``embed_scale`` in float32 too.

Example:
    >>> from compactnn.core.qembedding import quantize_embedding_rtn
    >>> from compactnn.core.spec import QuantSpec
    >>> q = quantize_embedding_rtn(nn.Embedding(50, 64), QuantSpec(4, False, "group", 32))
    >>> k = EmbeddingKernel(q, torch.float32)
    >>> torch.equal(k(torch.tensor([[3, 7]])), q(torch.tensor([[3, 7]])))
    True
"""

from __future__ import annotations

import torch
from torch import nn

from compactnn.core.qembedding import QuantEmbedding
from compactnn.core.quantize import dequantize, grouped_view


class EmbeddingKernel(nn.Module):
    """A quantized table looked up as codes: ``packed`` ``(V, D/2)`` uint8 (2-4 bits) or
    ``(V, D)`` codes (5-8 bits), ``scale`` float32 and ``zero`` ``(V, groups)``.

    Args:
        table: the quantized embedding (uniform grid; codebooks are refused).
        dtype: the dtype of the returned vectors (float32 or bfloat16).
    """

    def __init__(self, table: QuantEmbedding, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if getattr(table, "weight_levels", None) is not None:
            raise ValueError("codebook tables have no gather kernel")
        spec = table.weight_spec
        self.spec = spec
        self.dtype = dtype
        self.qmin = spec.qtype.qmin
        self.embedding_dim = table.embedding_dim
        codes = table.weight_codes.detach()  # (V, D) in the grid's storage dtype
        self.nibbles = spec.bits <= 4 and codes.shape[1] % 2 == 0
        if self.nibbles:  # offset to 0..15, two codes a byte: low nibble = even column
            u = (codes.to(torch.int16) - self.qmin).to(torch.uint8)
            packed = u[:, 0::2] | (u[:, 1::2] << 4)
        else:
            packed = codes.clone()
        self.register_buffer("packed", packed.contiguous())
        self.register_buffer("scale", table.weight_scale.detach().float().clone())
        zero = table.weight_zero.detach()
        self.register_buffer("zero", zero.to(spec.qtype.storage_dtype).clone())
        factor = getattr(table, "embed_scale", None)  # float32 like the simulation's
        self.embed_scale = None if factor is None else float(factor)

    def _codes(self, rows: torch.Tensor) -> torch.Tensor:
        """Float codes ``(N, D)`` of the gathered rows."""
        if not self.nibbles:
            return rows.float()
        q = torch.stack((rows & 15, rows >> 4), dim=-1).reshape(rows.shape[0], -1)
        return q.float() + self.qmin

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        q = self._codes(self.packed.index_select(0, flat))  # (N, D)
        spec = self.spec
        qg = grouped_view(q, spec.granularity, spec.group_size)  # (N, groups, G)
        w = dequantize(qg, self.scale.index_select(0, flat), self.zero.index_select(0, flat))
        if self.embed_scale is not None:  # a float32 multiply, as the simulated lookup's
            w = w * torch.tensor(self.embed_scale, dtype=torch.float32)
        return w.reshape(*ids.shape, self.embedding_dim).to(self.dtype)

    def extra_repr(self) -> str:
        factor = "" if self.embed_scale is None else f", embed_scale={self.embed_scale:g}"
        return f"{self.packed.shape[0]}, {self.embedding_dim}, {spec_label(self.spec)}{factor}"


def spec_label(spec) -> str:
    """``uint4-group32`` style label of a table's grid."""
    gran = spec.granularity + (str(spec.group_size) if spec.group_size else "")
    return f"{spec.qtype.name}-{gran}"


def table_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers as it runs (no hidden dense copy)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)
