import pytest
import torch
from torch import nn

from compactnn.core.qembedding import (
    QuantEmbedding,
    embedding_spec,
    embedding_unsupported,
    quantize_embedding_rtn,
)
from compactnn.core.qlayers import has_integer_weight, is_quant_layer
from compactnn.core.spec import QuantSpec
from compactnn.kernels.embedding import EmbeddingKernel, table_bytes


def _table(rows=40, dim=64, seed=0):
    torch.manual_seed(seed)
    emb = nn.Embedding(rows, dim)
    with torch.no_grad():
        emb.weight.mul_(0.1)
    return emb


def test_int8_per_row_codes_match_a_hand_computation():
    emb = _table()
    q = quantize_embedding_rtn(emb, QuantSpec(bits=8, granularity="channel"))
    w = emb.weight.detach()
    scale = w.abs().amax(1) / 127  # symmetric int8, one scale per token row
    torch.testing.assert_close(q.weight_scale[:, 0], scale, rtol=1e-3, atol=0)
    expected = torch.clamp(torch.round(w / q.weight_scale), -128, 127)
    assert torch.equal(q.weight_codes.float(), expected)
    assert torch.equal(q.weight, q.weight_codes.float() * q.weight_scale)
    assert ((w - q.weight).abs() <= q.weight_scale / 2 + 1e-7).all()


@pytest.mark.parametrize("bits,group", [(4, 32), (3, 32), (2, 16)])
def test_low_bit_groups_dequantize_per_row_group(bits, group):
    emb = _table()
    spec = QuantSpec(bits=bits, symmetric=False, granularity="group", group_size=group)
    q = quantize_embedding_rtn(emb, spec)
    assert q.weight_scale.shape == (40, 64 // group)
    codes = q.weight_codes.float().reshape(40, -1, group)
    deq = (codes - q.weight_zero[..., None]) * q.weight_scale[..., None]
    assert torch.equal(q.weight, deq.reshape(40, 64))
    assert q.weight_codes.min() >= 0 and q.weight_codes.max() <= 2**bits - 1
    err = (emb.weight.detach() - q.weight).abs().reshape(40, -1, group)
    # half a step inside the grid; the integer zero point can push an end value a step out
    assert (err <= q.weight_scale[..., None] + 1e-6).all()
    assert (err <= q.weight_scale[..., None] / 2 + 1e-6).float().mean() > 0.9
    ids = torch.tensor([[0, 5, 39], [7, 7, 1]])
    assert torch.equal(q(ids), deq.reshape(40, 64)[ids])


def test_an_embedding_is_not_a_quant_layer_but_holds_integer_weights():
    q = quantize_embedding_rtn(_table(), QuantSpec(bits=8))
    assert isinstance(q, nn.Embedding) and has_integer_weight(q) and not is_quant_layer(q)
    assert not q.weight.requires_grad
    assert q.format == "int8-sym-channel"


def test_embedding_spec_follows_the_recipe_and_falls_back_to_rows():
    w4 = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=32)
    assert embedding_spec(w4, 384) == QuantSpec(4, False, "group", 32)
    assert embedding_spec(w4, 48).granularity == "channel"  # 32 does not divide 48
    assert embedding_spec(w4, 384, bits=8) == QuantSpec(8, True, "channel")
    assert embedding_spec(QuantSpec(bits=4, symmetric=False), 384).group_size == 64
    assert embedding_unsupported(nn.Embedding(4, 4, max_norm=1.0)) is not None
    assert embedding_unsupported(nn.Embedding(4, 4)) is None


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(8, True, "channel"),
        QuantSpec(4, False, "group", 32),
        QuantSpec(4, True, "group", 16),
        QuantSpec(3, False, "group", 32),
        QuantSpec(2, False, "channel"),
        QuantSpec(6, False, "channel"),
    ],
)
def test_gather_kernel_equals_the_simulated_lookup_in_float32(spec):
    q = quantize_embedding_rtn(_table(seed=1), spec)
    k = EmbeddingKernel(q, torch.float32)
    ids = torch.randint(0, 40, (3, 11), generator=torch.Generator().manual_seed(0))
    assert torch.equal(k(ids), q(ids))
    out16 = EmbeddingKernel(q, torch.bfloat16)(ids)
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), q(ids), rtol=1e-2, atol=1e-3)


def test_gather_kernel_holds_no_dense_float_table():
    q = quantize_embedding_rtn(_table(rows=1000, dim=128), QuantSpec(4, False, "group", 64))
    k = EmbeddingKernel(q, torch.bfloat16)
    # 4-bit codes (64 KiB) + float32 scales and uint8 zeros of 2 groups a row (12 KiB)
    assert table_bytes(k) == 1000 * 64 + 1000 * 2 * 4 + 1000 * 2
    assert table_bytes(k) < 1000 * 128 * 4 / 6
    assert not any(t.is_floating_point() and t.numel() >= 1000 * 128 for t in k.buffers())


def test_like_keeps_padding_idx():
    emb = nn.Embedding(10, 8, padding_idx=0)
    q = QuantEmbedding.like(emb, QuantSpec(bits=8))
    assert q.padding_idx == 0 and q.weight.shape == (10, 8)


def _gemma_table(rows=40, dim=64):
    transformers = pytest.importorskip("transformers")
    from transformers.models.gemma.modeling_gemma import GemmaTextScaledWordEmbedding

    torch.manual_seed(0)
    emb = GemmaTextScaledWordEmbedding(rows, dim, 0, embed_scale=dim**0.5)
    assert transformers is not None and emb.embed_scale.dtype == torch.float32
    return emb


@pytest.mark.parametrize("spec", [QuantSpec(8, True, "channel"), QuantSpec(4, False, "group", 32)])
def test_a_scaled_table_keeps_its_factor_exactly(spec):
    """Gemma's table multiplies the lookup by embed_scale: the quantized table (and its gather
    kernel) returns what the float module returns on the dequantized table, bit for bit."""
    emb = _gemma_table()
    assert embedding_unsupported(emb) is None
    q = quantize_embedding_rtn(emb, spec)
    assert q.embed_scale is not None and float(q.embed_scale) == 8.0
    assert "embed_scale" not in q.state_dict()  # a constant of the architecture, not stored
    ids = torch.tensor([[0, 3, 39], [7, 7, 1]])
    with torch.no_grad():
        emb.weight.copy_(q.weight)
        want = emb(ids)
    assert torch.equal(q(ids), want)
    assert torch.equal(q(ids), nn.functional.embedding(ids, q.weight) * 8.0)
    assert torch.equal(EmbeddingKernel(q, torch.float32)(ids), want)
    assert torch.equal(QuantEmbedding.like(q, spec).embed_scale, q.embed_scale)


def test_a_table_with_another_forward_is_still_refused():
    class OtherScaledWordEmbedding(nn.Embedding):  # the name, but not lookup * embed_scale
        embed_scale = 2.0

        def forward(self, ids):
            return super().forward(ids) * 2.0 + 1.0

    assert "forward of its own" in embedding_unsupported(OtherScaledWordEmbedding(8, 16))
    assert embedding_unsupported(_table()) is None
