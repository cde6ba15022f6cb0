"""A tiny random-weight T5 (encoder-decoder, relative position bias) and its calibration."""

import pytest
import torch


def tiny_t5(batches: int = 4):
    """``(model, calib)``: a 2+2-block T5 in eval mode and ``batches`` batches of 4 x 12
    encoder and 4 x 8 decoder tokens (skipped without ``transformers``)."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = tf.T5Config(
        d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2, d_kv=16,
        vocab_size=100,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    calib = [
        {
            "input_ids": torch.randint(4, 100, (4, 12), generator=gen),
            "decoder_input_ids": torch.randint(4, 100, (4, 8), generator=gen),
        }
        for _ in range(batches)
    ]
    return tf.T5ForConditionalGeneration(config).eval(), calib


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits
