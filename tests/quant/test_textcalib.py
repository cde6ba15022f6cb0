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
