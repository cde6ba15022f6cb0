"""``nn.MultiheadAttention`` with its projections as ``nn.Linear`` layers that it calls.

``nn.MultiheadAttention`` keeps its q/k/v projections as parameters (``in_proj_weight``) and
reads ``out_proj``'s weight in ``F.multi_head_attention_forward`` without calling it, so no
method can swap or calibrate them. :class:`SplitMultiheadAttention` computes the same function
through four layers it calls (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``), and
:func:`split_attention` puts it in place of each attention it can stand for.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from compactnn.core.modules import set_module


def _linear_like(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A ``nn.Linear`` holding copies of ``weight`` ``(out, in)`` and ``bias`` (same dtype,
    device and ``requires_grad``)."""
    out_f, in_f = weight.shape
    lin = nn.utils.skip_init(  # no random initialisation: no draw from the seeded generator
        nn.Linear, in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    lin.weight.requires_grad_(weight.requires_grad)
    if bias is not None:
        lin.bias.requires_grad_(bias.requires_grad)
    return lin


class SplitMultiheadAttention(nn.Module):
    """The function of an ``nn.MultiheadAttention`` through ``nn.Linear`` layers it calls.

    Same ``forward`` arguments and results as ``nn.MultiheadAttention`` (its slow path:
    ``F.multi_head_attention_forward`` with the projections as calls, dropout included).
    ``in_proj_weight`` and ``in_proj_bias`` are None, so ``nn.TransformerEncoderLayer`` takes
    its slow path, which calls this module.

    Example:
        >>> mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
        >>> x = torch.randn(3, 5, 8)
        >>> torch.allclose(SplitMultiheadAttention(mha)(x, x, x)[0], mha(x, x, x)[0], atol=1e-6)
        True
    """

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if (why := unsupported_reason(mha)) is not None:
            raise ValueError(f"cannot split this nn.MultiheadAttention: {why}")
        e = mha.embed_dim
        self.embed_dim, self.kdim, self.vdim = e, mha.kdim, mha.vdim
        self.num_heads, self.head_dim = mha.num_heads, mha.head_dim
        self.dropout, self.batch_first = mha.dropout, mha.batch_first
        self._qkv_same_embed_dim = mha._qkv_same_embed_dim
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.split(e)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = (None,) * 3 if mha.in_proj_bias is None else mha.in_proj_bias.split(e)
        self.q_proj = _linear_like(weights[0], biases[0])
        self.k_proj = _linear_like(weights[1], biases[1])
        self.v_proj = _linear_like(weights[2], biases[2])
        self.out_proj = _linear_like(mha.out_proj.weight, mha.out_proj.bias)
        # nn.TransformerEncoderLayer's fused path reads these: None sends it to the slow path
        self.register_parameter("in_proj_weight", None)
        self.register_parameter("in_proj_bias", None)
        self.train(mha.training)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}"

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(output, weights or None)`` exactly as ``nn.MultiheadAttention.forward``."""
        is_batched = F._mha_shape_check(
            query, key, value, key_padding_mask, attn_mask, self.num_heads
        )
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=query.dtype,
        )
        attn_mask = F._canonical_mask(
            mask=attn_mask,
            mask_name="attn_mask",
            other_type=None,
            other_name="",
            target_type=query.dtype,
            check_other=False,
        )
        if self.batch_first and is_batched:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        if not is_batched:
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                "module method `generate_square_subsequent_mask` to create this mask."
            )
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # scaled_dot_product_attention's own causal mask
        elif key_padding_mask is not None:
            is_causal = False  # the merged mask is no longer causal
        out, weights = self._attend(
            query, key, value, key_padding_mask, need_weights, attn_mask, is_causal
        )
        if need_weights and average_attn_weights:
            weights = weights.mean(dim=1)
        if not is_batched:
            out = out.squeeze(1)
            weights = weights.squeeze(0) if weights is not None else None
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        need_weights: bool,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sequence-first ``(L, N, E)`` inputs -> ``(L, N, E)`` output and ``(N, H, L, S)``
        weights (None unless ``need_weights``), as ``F.multi_head_attention_forward``."""
        tgt_len, bsz, embed_dim = query.shape
        src_len, heads, hd = key.shape[0], self.num_heads, self.head_dim
        # a trace records the shapes as constants: the check would only warn there
        if not torch.jit.is_tracing() and key.shape[:2] != value.shape[:2]:
            raise RuntimeError(
                f"key's sequence and batch dims {tuple(key.shape[:2])} do not match value's "
                f"{tuple(value.shape[:2])}"
            )
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        attn_mask = _mask_3d(attn_mask, bsz * heads, tgt_len, src_len)
        q = q.reshape(tgt_len, bsz * heads, hd).transpose(0, 1)
        k = k.reshape(src_len, bsz * heads, hd).transpose(0, 1)
        v = v.reshape(src_len, bsz * heads, hd).transpose(0, 1)
        if key_padding_mask is not None:
            if not torch.jit.is_scripting() and not torch.jit.is_tracing():
                F._check_key_padding_mask(key_padding_mask, src_len, bsz)
            key_padding_mask = (
                key_padding_mask.view(bsz, 1, 1, src_len)
                .expand(-1, heads, -1, -1)
                .reshape(bsz * heads, 1, src_len)
            )
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            q_scaled = q * math.sqrt(1.0 / float(hd))
            if attn_mask is not None:
                weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                weights = torch.bmm(q_scaled, k.transpose(-2, -1))
            weights = F.softmax(weights, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
            out = self.out_proj(out).view(tgt_len, bsz, -1)
            return out, weights.view(bsz, heads, tgt_len, src_len)
        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, heads, -1, src_len)
        q = q.view(bsz, heads, tgt_len, hd)
        k = k.view(bsz, heads, src_len, hd)
        v = v.view(bsz, heads, src_len, hd)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
        return self.out_proj(out).view(tgt_len, bsz, -1), None


def _mask_3d(
    mask: torch.Tensor | None, batch_heads: int, tgt_len: int, src_len: int
) -> torch.Tensor | None:
    """An ``attn_mask`` ``(L, S)`` as ``(1, L, S)``; ``(N*H, L, S)`` checked; else refused."""
    if mask is None:
        return None
    if mask.dim() == 2:
        if mask.shape != (tgt_len, src_len):
            raise RuntimeError(
                f"The shape of the 2D attn_mask is {mask.shape}, but should be "
                f"{(tgt_len, src_len)}."
            )
        return mask.unsqueeze(0)
    if mask.dim() == 3:
        if mask.shape != (batch_heads, tgt_len, src_len):
            raise RuntimeError(
                f"The shape of the 3D attn_mask is {mask.shape}, but should be "
                f"{(batch_heads, tgt_len, src_len)}."
            )
        return mask
    raise RuntimeError(f"attn_mask's dimension {mask.dim()} is not supported")


def unsupported_reason(m: nn.MultiheadAttention) -> str | None:
    """Why :class:`SplitMultiheadAttention` cannot stand for ``m`` (None when it can).

    Example:
        >>> unsupported_reason(nn.MultiheadAttention(4, 2, add_zero_attn=True))
        'add_zero_attn=True'
    """
    if type(m).forward is not nn.MultiheadAttention.forward:
        return f"{type(m).__name__} has its own forward"
    if m.bias_k is not None or m.bias_v is not None:
        return "add_bias_kv=True"
    if m.add_zero_attn:
        return "add_zero_attn=True"
    if not isinstance(m.out_proj, nn.Linear):
        return f"its out_proj is a {type(m.out_proj).__name__}, not a Linear"
    return None


def splittable(model: nn.Module) -> tuple[list[str], dict[str, str]]:
    """The names of ``model``'s ``nn.MultiheadAttention`` modules that can be split, and the
    others with the reason (``model`` itself cannot be replaced in place). A module held under
    several names (``self.b = self.a``) is listed under each.

    Example:
        >>> splittable(nn.Sequential(nn.MultiheadAttention(4, 2, add_bias_kv=True)))
        ([], {'0': 'add_bias_kv=True'})
    """
    ok, left = [], {}
    for name, m in model.named_modules(remove_duplicate=False):
        if not isinstance(m, nn.MultiheadAttention):
            continue
        why = unsupported_reason(m) if m is not model else "it is the whole model"
        if why is None:
            ok.append(name)
        else:
            left[name] = why
    return ok, left


def split_attention(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Replace ``model``'s ``nn.MultiheadAttention`` modules (those of ``names``, default every
    one :func:`splittable` accepts) by equal :class:`SplitMultiheadAttention` modules, in
    place; return the names replaced. Names of one module (``self.b = self.a``) get one
    shared replacement, so the tie holds. Encoders holding one stop converting padded batches
    to nested tensors (their fused path, which this module does not take).

    Example:
        >>> net = nn.Sequential(nn.MultiheadAttention(4, 2))
        >>> split_attention(net), type(net[0]).__name__
        (['0'], 'SplitMultiheadAttention')
    """
    names = splittable(model)[0] if names is None else list(names)
    mhas = [model.get_submodule(name) for name in names]  # before any replacement
    splits: dict[int, SplitMultiheadAttention] = {}
    for name, mha in zip(names, mhas, strict=True):
        if id(mha) not in splits:
            splits[id(mha)] = SplitMultiheadAttention(mha)
        set_module(model, name, splits[id(mha)])
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder) and any(
            isinstance(getattr(layer, "self_attn", None), SplitMultiheadAttention)
            for layer in m.layers
        ):
            m.use_nested_tensor = False
    return names
