"""Calibration text: windows, and clear errors for empty, short or mismatched input."""

import pytest
import torch

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


def test_a_seq_len_longer_than_the_model_takes_is_named():
    model, _ = tiny_model("gpt2")  # 64 positions
    with pytest.raises(CompactnnError) as info:
        calib_from_text(byte_tokenizer, "abcdefgh" * 100, n_samples=2, seq_len=96, model=model)
    assert str(info.value) == (
        "seq_len=96 is longer than the model takes: at most 64 tokens (n_positions in its "
        "config.json); pass seq_len=64 or less."
    )
    assert len(calib_from_text(byte_tokenizer, "abcdefgh" * 100, 2, 64, model=model)) == 1


def test_token_id_checks_have_one_home_in_core_tokens():
    from compactnn.core import tokens
    from compactnn.quant import textcalib

    assert textcalib.check_token_ids is tokens.check_token_ids
    for name in ("token_id_tensors", "vocab_size", "max_positions", "_runs"):
        assert not hasattr(textcalib, name), f"textcalib still defines its own {name}"
    model, _ = tiny_model("gpt2")  # 64 positions
    ids = {"input_ids": torch.zeros(1, 96, dtype=torch.long)}
    with pytest.raises(CompactnnError, match=r"windows of 64\) and save the file again\.$"):
        textcalib.check_token_ids(model, ids, "--data ids.npy")  # the CLI's default wording
