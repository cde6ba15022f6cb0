"""Tiny random-weight Hugging Face transformers for architecture coverage in tests and docs.

Each builder returns ``(model, calib)``: a seeded model of a few thousand parameters (hidden
size 64, so group sizes 16 and 32 divide every layer) and a list of calibration batches (dicts
of ``input_ids`` and ``attention_mask``, the second batch with padding).
"""

from __future__ import annotations

import torch
from torch import nn

from compactnn._optional import require
from compactnn.core.seeding import seeded_rng

ARCHS = ("llama", "opt", "gpt2", "bert")


def _config(arch: str):
    tf = require("transformers", "hf")

    common = dict(vocab_size=128)
    if arch == "llama":
        return tf.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, **common,
        )  # fmt: skip
    if arch == "opt":
        return tf.OPTConfig(
            hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
            word_embed_proj_dim=64, max_position_embeddings=64, **common,
        )  # fmt: skip
    if arch == "gpt2":
        return tf.GPT2Config(
            n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2, **common
        )
    if arch == "bert":
        return tf.BertConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, **common,
        )  # fmt: skip
    raise ValueError(f"unknown tiny architecture {arch!r}; use one of {ARCHS}")


def tiny_model(arch: str, seed: int = 0) -> tuple[nn.Module, list[dict[str, torch.Tensor]]]:
    """A tiny seeded model of ``arch`` (causal LM, or ``BertModel``) and calibration batches.

    Example:
        >>> model, calib = tiny_model("llama")
        >>> type(model).__name__
        'LlamaForCausalLM'
    """
    tf = require("transformers", "hf")
    config = _config(arch)
    cls = tf.BertModel if arch == "bert" else tf.AutoModelForCausalLM
    with seeded_rng(seed):  # the caller's torch stream is the same after the call
        model = cls(config) if arch == "bert" else cls.from_config(config)
    model.eval()
    gen = torch.Generator().manual_seed(seed + 1)
    batches = []
    for i in range(4):
        ids = torch.randint(4, 128, (4, 24), generator=gen)
        mask = torch.ones_like(ids)
        if i == 1:
            mask[0, 18:] = 0  # right padding in one batch
        batches.append({"input_ids": ids, "attention_mask": mask})
    return model, batches


def outputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's main output tensor (logits or last hidden state) on ``batch``."""
    with torch.no_grad():
        out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state
