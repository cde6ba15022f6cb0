"""Calibration text: windows, and clear errors for empty, short or mismatched input."""

import pytest
import torch
from torch import nn

from compactnn.errors import CompactnnError
from compactnn.models.tiny_hf import tiny_model
from compactnn.quant.textcalib import calib_from_text


def byte_tokenizer(text):
    return {"input_ids": list(text.encode())}


def test_windows_are_consecutive_tokens():
    text = "abcdefgh" * 100
    batches = calib_from_text(byte_tokenizer, text, n_samples=10, seq_len=8, batch_size=4)
    assert [len(b["input_ids"]) for b in batches] == [4, 4, 2]
    assert torch.equal(batches[0]["input_ids"][1], torch.tensor(list(b"abcdefgh")))


def test_bad_text_is_named():
    with pytest.raises(CompactnnError, match="empty"):
        calib_from_text(byte_tokenizer, "   ")
    with pytest.raises(CompactnnError, match="too short for 128 samples"):
        calib_from_text(byte_tokenizer, "short text", n_samples=128, seq_len=128)
    model, _ = tiny_model("gpt2")  # vocabulary of 128: bytes above 127 do not fit
    with pytest.raises(CompactnnError, match="tokenizer mismatch"):
        calib_from_text(byte_tokenizer, "é" * 100, n_samples=2, seq_len=8, model=model)


def test_token_ids_out_of_the_vocabulary_or_too_long_are_named():
    from compactnn.quant.textcalib import check_token_ids

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
    llama, _ = tiny_model("llama")  # rotary positions: runs past max_position_embeddings
    check_token_ids(llama, torch.cat([ok, ok], 1), "ids.npy")


def test_float_ids_and_a_mask_of_another_shape_are_named():
    """transformers runs a (2, 12) mask with (2, 16) ids without a word; float ids fail deep
    in the embedding with advice about wrapping batches."""
    from compactnn.quant.textcalib import check_token_ids

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


def test_a_seq_len_longer_than_the_model_takes_is_named():
    model, _ = tiny_model("gpt2")  # 64 positions
    with pytest.raises(CompactnnError) as info:
        calib_from_text(byte_tokenizer, "abcdefgh" * 100, n_samples=2, seq_len=96, model=model)
    assert str(info.value) == (
        "seq_len=96 is longer than the model takes: at most 64 tokens (n_positions in its "
        "config.json); pass seq_len=64 or less."
    )
    assert len(calib_from_text(byte_tokenizer, "abcdefgh" * 100, 2, 64, model=model)) == 1


def test_token_id_checks_have_one_home_in_core_calib():
    from compactnn.core import calib
    from compactnn.quant import textcalib

    assert textcalib.check_token_ids is calib.check_token_ids
    for name in ("token_id_tensors", "vocab_size", "max_positions", "_runs"):
        assert not hasattr(textcalib, name), f"textcalib still defines its own {name}"
    model, _ = tiny_model("gpt2")  # 64 positions
    ids = {"input_ids": torch.zeros(1, 96, dtype=torch.long)}
    with pytest.raises(CompactnnError, match=r"windows of 64\) and save the file again\.$"):
        textcalib.check_token_ids(model, ids, "--data ids.npy")  # the CLI's default wording
