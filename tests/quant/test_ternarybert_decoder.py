"""w2a8-ternarybert on a decoder language model is refused in one line, before the copy and
the 2,400-step distillation; encoders still go through."""

from __future__ import annotations

import time

import pytest
import torch

import compactnn
from compactnn.errors import CompactnnError

pytest.importorskip("transformers")
from compactnn.models.tiny_hf import tiny_model
from compactnn.quant.ternarybert import is_causal_lm

torch.set_num_threads(1)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_decoder_lm_is_refused_before_any_training(arch):
    model, calib = tiny_model(arch)
    start = time.perf_counter()
    with pytest.raises(CompactnnError) as info:
        compactnn.compress(model, "w2a8-ternarybert", calib_data=calib, progress=False)
    name = type(model).__name__
    assert str(info.value) == (
        f"ternarybert is for BERT-style encoders (bidirectional attention), and {name} is a "
        "decoder language model: compress it with a decoder recipe such as w4-g32-gptq or "
        "w8a8, or pass an encoder (e.g. minilm)."
    )
    assert time.perf_counter() - start < 20  # was: 2,400 distillation steps


def test_encoders_are_not_decoders():
    bert, _ = tiny_model("bert")
    llama, _ = tiny_model("llama")
    assert not is_causal_lm(bert) and is_causal_lm(llama)
    assert is_causal_lm(llama.model)  # the bare decoder stack: causal attention
    assert not is_causal_lm(torch.nn.Linear(2, 2))
