"""Token ids a language model cannot take are named before any work: ids out of its
vocabulary, sequences past its position table, float ids, a mask of another shape; padding
without a mask is warned about."""

import pytest
import torch
from torch import nn

from compactnn.core.tokens import check_token_ids, unmasked_padding
from compactnn.errors import CompactnnError
from compactnn.models.tiny_hf import tiny_model


def test_token_ids_out_of_the_vocabulary_or_too_long_are_named():
    model, _ = tiny_model("gpt2")  # vocabulary 128, 64 positions (n_positions)
    ok = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(0))
    check_token_ids(model, [{"input_ids": ok}], "ids.npy")  # fits: nothing said
    with pytest.raises(CompactnnError) as info:
        check_token_ids(model, [ok, ok.clamp(max=127) + 3], "ids.npy")  # max 130
    assert str(info.value).startswith(
        "ids.npy holds token ids out of the model's vocabulary: the largest id found is 130, "
        "and the vocabulary has 128 entries (ids 0 to 127)."
    )
    with pytest.raises(CompactnnError, match="the smallest id found is -1, and the vocab"):
        check_token_ids(model, {"input_ids": ok - 1}, "ids.npy")
    with pytest.raises(CompactnnError) as info:
        check_token_ids(model, {"input_ids": torch.cat([ok, ok], 1)}, "ids.npy")
    assert str(info.value).startswith(
        "ids.npy holds sequences of 128 tokens and the model takes at most 64 (n_positions "
        "in its config.json): cut each sequence to 64 tokens or fewer"
    )
    check_token_ids(model, torch.randn(2, 300), "x.npy")  # float inputs: not token ids
    llama, _ = tiny_model("llama")  # rotary positions: runs past max_position_embeddings,
    limit = llama.config.max_position_embeddings  # on positions it was never trained at
    long = torch.randint(0, 128, (1, limit + 1), generator=torch.Generator().manual_seed(0))
    with pytest.raises(CompactnnError, match=f"model takes at most {limit} .max_position_emb"):
        check_token_ids(llama, long, "ids.npy")
    check_token_ids(llama, long[:, :limit], "ids.npy")


def test_float_ids_and_a_mask_of_another_shape_are_named():
    """transformers runs a (2, 12) mask with (2, 16) ids without a word; float ids fail deep
    in the embedding with advice about wrapping batches."""
    model, _ = tiny_model("gpt2")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    short = torch.ones(2, 12, dtype=torch.long)
    with torch.no_grad():  # the premise: the model accepts it silently
        model(input_ids=ids, attention_mask=short)
    with pytest.raises(CompactnnError) as info:
        check_token_ids(model, [{"input_ids": ids, "attention_mask": short}], "--data d")
    assert str(info.value).startswith(
        "--data d: attention_mask has shape (2, 12) and input_ids (2, 16); they must match"
    )
    with pytest.raises(CompactnnError, match="input_ids holds float32 values, and token ids"):
        check_token_ids(model, {"input_ids": ids.float()}, "--data d")
    check_token_ids(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, "d")
    check_token_ids(nn.Linear(4, 2), {"input_ids": ids.float()}, "d")  # not a language model


def test_padded_token_ids_without_a_mask_are_named():
    model = nn.Module()
    model.config = type("Config", (), {"pad_token_id": 1})()
    ids = torch.tensor([[5, 6, 1, 1], [5, 6, 7, 8], [2, 1, 1, 1]])
    assert unmasked_padding(model, ids).startswith(
        "2 of 3 sequences of token ids hold the padding id 1"
    )
    assert unmasked_padding(model, {"input_ids": ids}) == unmasked_padding(model, ids)
    assert unmasked_padding(model, {"input_ids": ids, "attention_mask": ids > 1}) is None
    assert unmasked_padding(model, ids.float()) is None  # not token ids
    assert unmasked_padding(nn.Linear(2, 2), ids) is None  # no padding id
