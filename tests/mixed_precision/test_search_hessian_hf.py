"""measure="hessian" on Hugging Face models: GPT-2's fused attention has no second derivative
(traced on the math kernel instead) and BERT's pooler is not read by the loss (trace 0)."""

import warnings

import numpy as np
import pytest
import torch

from compactnn.mixed_precision import Budget, search

transformers = pytest.importorskip("transformers")


def _gpt2():
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128, n_positions=32)
    cfg.bos_token_id = cfg.eos_token_id = None
    return transformers.GPT2LMHeadModel(cfg)


def _bert():
    cfg = transformers.BertConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    return transformers.BertModel(cfg)


@pytest.mark.parametrize("make", [_gpt2, _bert])
def test_hessian_search_runs_on_hugging_face_models(make):
    torch.manual_seed(0)
    model = make().eval()
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-2's tied head is left out, with a warning
        result = search(
            model,
            formats="w2-g16,w8-g16",
            budget=Budget(avg_bits=4),
            calib_data={"input_ids": ids},
            measure="hessian",
            progress=False,
        )
    assert np.isfinite(result.scores).all()
    assert result.scores[:, 0].max() > 0  # real second-order signal, not all zeros
    assert result.cost["avg_bits"] <= 4
    if "pooler.dense" in result.layers:  # BERT's pooler: the loss never reads it
        assert result.scores[result.layers.index("pooler.dense")].tolist() == [0.0, 0.0]
