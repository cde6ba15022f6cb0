"""Shared fixtures of the command-line tests."""

import numpy as np
import pytest
import torch


@pytest.fixture
def token_files(tmp_path):
    """A random-weight BERT folder (vocabulary 100, 32 positions) and token-id files:
    ``ok.npy`` fits, ``long.npy`` has 40-token rows, ``oov.npy`` holds id 150 and
    ``oov_edge.npy`` id 100 (the vocabulary size itself)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32,
    )  # fmt: skip
    BertModel(config).save_pretrained(tmp_path / "bert")
    ids = np.random.default_rng(0).integers(0, 100, (4, 40))
    np.save(tmp_path / "ok.npy", ids[:, :16])
    np.save(tmp_path / "long.npy", ids)
    for name, at, value in (("oov.npy", (2, 5), 150), ("oov_edge.npy", (1, 3), 100)):
        oov = ids[:, :16].copy()
        oov[at] = value
        np.save(tmp_path / name, oov)
    return tmp_path
