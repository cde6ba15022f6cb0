"""SplitMultiheadAttention computes nn.MultiheadAttention's function through called layers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from compactnn.core.attention import (
    SplitMultiheadAttention,
    split_attention,
    splittable,
    unsupported_reason,
)

ATOL = 1e-6


def _mha(**kw) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, **kw)
    with torch.no_grad():  # nonzero biases (they start at zero), so a swapped bias shows
        for p in (mha.in_proj_bias, mha.out_proj.bias):
            if p is not None:
                p.normal_()
    return mha.eval()


def _both(mha, split, *args, seed=1, **kw):
    """Each module's outputs on the same inputs, from the same random state (dropout)."""
    torch.manual_seed(seed)
    a = mha(*args, **kw)
    torch.manual_seed(seed)
    b = split(*args, **kw)
    return a, b


def _assert_same(a, b, atol=ATOL):
    assert (a[1] is None) == (b[1] is None)
    torch.testing.assert_close(b[0], a[0], atol=atol, rtol=0)
    if a[1] is not None:
        torch.testing.assert_close(b[1], a[1], atol=atol, rtol=0)


def _masks(batch: int, length: int):
    kpm = torch.zeros(batch, length, dtype=torch.bool)
    kpm[0, -2:] = True  # the first sequence is padded
    bool_mask = torch.rand(length, length, generator=torch.Generator().manual_seed(3)) > 0.6
    bool_mask.fill_diagonal_(False)  # every query sees itself
    float_mask = torch.randn(length, length, generator=torch.Generator().manual_seed(4))
    return [
        {},
        {"key_padding_mask": kpm},
        {"attn_mask": bool_mask},
        {"attn_mask": float_mask},
        {"attn_mask": bool_mask, "key_padding_mask": kpm},
        {"attn_mask": float_mask, "key_padding_mask": kpm.float() * -1e4},
    ]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("average", [True, False])
def test_outputs_and_weights_equal_multihead_attention(batch_first, need_weights, average):
    mha = _mha(batch_first=batch_first)
    split = SplitMultiheadAttention(mha)
    x = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)
    for masks in _masks(3, 5):
        kw = dict(need_weights=need_weights, average_attn_weights=average, **masks)
        with torch.no_grad():
            a, b = _both(mha, split, x, x, x, **kw)
        _assert_same(a, b)
        if need_weights:  # weights (N, L, S) averaged, else (N, H, L, S)
            assert b[1].shape == ((3, 5, 5) if average else (3, 4, 5, 5))


def test_cross_attention_with_other_key_and_value_widths():
    mha = _mha(kdim=6, vdim=10, batch_first=True)
    split = SplitMultiheadAttention(mha)
    assert not split._qkv_same_embed_dim
    assert (split.k_proj.in_features, split.v_proj.in_features) == (6, 10)
    q, k, v = torch.randn(3, 4, 16), torch.randn(3, 7, 6), torch.randn(3, 7, 10)
    kpm = torch.zeros(3, 7, dtype=torch.bool)
    kpm[1, -3:] = True
    for kw in ({}, {"need_weights": False}, {"key_padding_mask": kpm}):
        with torch.no_grad():
            _assert_same(*_both(mha, split, q, k, v, **kw))


def test_causal_unbatched_no_bias_and_dropout_while_training():
    mha = _mha(batch_first=True)
    x = torch.randn(3, 5, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    for need in (True, False):
        with torch.no_grad():
            _assert_same(
                *_both(
                    mha,
                    SplitMultiheadAttention(mha),
                    x,
                    x,
                    x,
                    attn_mask=causal,
                    is_causal=True,
                    need_weights=need,
                )
            )
    kpm = torch.tensor([False, False, False, True, True])
    with torch.no_grad():  # one (L, E) sequence
        _assert_same(*_both(mha, SplitMultiheadAttention(mha), x[0], x[0], x[0]))
        _assert_same(
            *_both(mha, SplitMultiheadAttention(mha), x[0], x[0], x[0], key_padding_mask=kpm)
        )
    plain = _mha(bias=False)
    assert SplitMultiheadAttention(plain).q_proj.bias is None
    with torch.no_grad():
        _assert_same(*_both(plain, SplitMultiheadAttention(plain), x, x, x))
    drop = _mha(dropout=0.3, batch_first=True).train()
    split = SplitMultiheadAttention(drop)
    assert split.training  # the mode is the attention's
    for need in (True, False):  # the same dropout draws
        _assert_same(*_both(drop, split, x, x, x, need_weights=need))


def test_gradients_reach_each_projection():
    mha = _mha(batch_first=True).train()
    split = SplitMultiheadAttention(mha)
    x = torch.randn(3, 5, 16)
    mha(x, x, x)[0].square().sum().backward()
    split(x, x, x)[0].square().sum().backward()
    in_grad = torch.cat(
        [split.q_proj.weight.grad, split.k_proj.weight.grad, split.v_proj.weight.grad]
    )
    torch.testing.assert_close(in_grad, mha.in_proj_weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        split.out_proj.weight.grad, mha.out_proj.weight.grad, atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("train", [False, True])
def test_transformer_encoder_with_split_attention(train):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).train(train)
    split = copy.deepcopy(enc)
    assert split_attention(split) == ["layers.0.self_attn", "layers.1.self_attn"]
    assert all(isinstance(m.self_attn, SplitMultiheadAttention) for m in split.layers)
    assert split.layers[0].self_attn.in_proj_bias is None  # the encoder's slow path
    x = torch.randn(3, 5, 16)
    kpm = torch.zeros(3, 5, dtype=torch.bool)
    kpm[1, -2:] = True
    with torch.no_grad():
        for kw in ({}, {"src_key_padding_mask": kpm}):
            torch.manual_seed(2)
            a = enc(x, **kw)
            torch.manual_seed(2)
            b = split(x, **kw)
            assert not b.is_nested
            # the fused eval path zeroes padded positions: compare the real tokens
            keep = ~kpm if kw else torch.ones_like(kpm)
            torch.testing.assert_close(b[keep], a[keep], atol=ATOL, rtol=0)


def test_only_plain_attentions_are_split():
    assert unsupported_reason(nn.MultiheadAttention(4, 2)) is None
    assert unsupported_reason(nn.MultiheadAttention(4, 2, add_bias_kv=True)) == "add_bias_kv=True"

    class Own(nn.MultiheadAttention):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    net = nn.Sequential(
        nn.MultiheadAttention(4, 2),
        nn.MultiheadAttention(4, 2, add_zero_attn=True),
        Own(4, 2),
    )
    assert splittable(net) == (
        ["0"],
        {"1": "add_zero_attn=True", "2": "Own has its own forward"},
    )
    assert splittable(nn.MultiheadAttention(4, 2)) == ([], {"": "it is the whole model"})
    with pytest.raises(ValueError, match="add_zero_attn"):
        SplitMultiheadAttention(net[1])
    assert split_attention(net) == ["0"]
    assert [type(m).__name__ for m in net] == [
        "SplitMultiheadAttention",
        "MultiheadAttention",
        "Own",
    ]


def test_an_attention_under_two_names_gets_one_shared_split():
    class Aliased(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = _mha(batch_first=True)
            self.b = self.a

        def forward(self, x):
            h = self.a(x, x, x)[0]
            return self.b(h, h, h)[0]

    net = Aliased()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = net(x)
    assert splittable(net) == (["a", "b"], {})
    assert split_attention(net) == ["a", "b"]
    assert isinstance(net.a, SplitMultiheadAttention) and net.b is net.a
    with torch.no_grad():
        _assert_same(net(x), expected)
    again = Aliased()  # explicit names (what load passes): the tie holds as well
    assert split_attention(again, ["a", "b"]) == ["a", "b"] and again.b is again.a
