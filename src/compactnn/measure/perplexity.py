"""Next-token perplexity of a causal language model on token ids.

Position ``t`` of a sequence predicts token ``t + 1``; with an attention mask, a target is
scored only when it and the position predicting it are both real tokens (padding is not).

Example:
    >>> logits = torch.zeros(1, 3, 4)  # uniform over 4 tokens
    >>> total, count = next_token_nll(logits, torch.tensor([[0, 1, 2]]))
    >>> int(count), round(math.exp(float(total / count)), 4)
    (2, 4.0)
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compactnn.core.calib import call_model, main_output
from compactnn.errors import CompactnnError


def next_token_nll(
    logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy of ``logits`` ``(B, T, V)`` against ``ids`` ``(B, T)``
    and the number of scored targets; ``mask`` ``(B, T)`` (1 real, 0 padding) leaves out
    every target that is padding or predicted from padding. Differentiable."""
    logits, targets = logits[:, :-1].float(), ids[:, 1:].long()  # (B, T-1, V), (B, T-1)
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    )
    if mask is not None:  # scored: real targets predicted from real positions
        keep = (mask[:, 1:] * mask[:, :-1]).reshape(-1).to(loss.dtype)
        return (loss * keep).sum(), keep.sum()
    return loss.sum(), torch.tensor(float(loss.numel()))


def token_ids(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(input_ids, attention_mask or None)`` of a batch: a dict with ``input_ids``, or a
    tensor of token ids ``(B, T)`` (passed positionally: a Hugging Face model's first input)."""
    if isinstance(batch, dict) and isinstance(batch.get("input_ids"), torch.Tensor):
        return batch["input_ids"], batch.get("attention_mask")
    if isinstance(batch, torch.Tensor) and batch.dim() == 2 and not batch.is_floating_point():
        return batch, None
    raise CompactnnError(
        f"perplexity needs token ids: a (B, T) integer tensor or a dict with input_ids; got "
        f"{type(batch).__name__}."
    )


@torch.no_grad()
def nll_totals(model: nn.Module, token_batches: list) -> tuple[float, float]:
    """Summed next-token negative log-likelihood of ``model`` over ``token_batches`` (each
    as :func:`token_ids` reads it) and the number of scored targets; eval mode, restored."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    try:
        for i, batch in enumerate(token_batches):
            ids, mask = token_ids(batch)
            logits = main_output(call_model(model, batch))
            if logits.dim() != 3 or logits.shape[:2] != ids.shape:
                raise CompactnnError(
                    f"perplexity needs logits of shape (B, T, vocab) for input_ids of shape "
                    f"{tuple(ids.shape)}; batch {i} gave shape {tuple(logits.shape)}: "
                    "pass a causal language model."
                )
            s, n = next_token_nll(logits, ids, mask)
            total, count = total + float(s), count + float(n)
    finally:
        model.train(was_training)
    return total, count


def perplexity(model: nn.Module, token_batches: list) -> float:
    """``exp`` of the mean next-token cross-entropy over every scored target of the batches.

    Each batch is a dict with ``input_ids`` ``(B, T)`` and optionally ``attention_mask``, or
    a ``(B, T)`` tensor of ids; masked positions are not scored (module docstring).
    """
    total, count = nll_totals(model, token_batches)
    if count == 0:
        raise CompactnnError("perplexity needs at least one predicted token (T >= 2).")
    return math.exp(total / count)


def is_causal_lm(model: Any) -> bool:
    """Whether ``model`` is a Hugging Face causal language model (a class
    ``AutoModelForCausalLM`` builds, or a subclass of one); never imports ``transformers``."""
    tf = sys.modules.get("transformers")
    if tf is None or not isinstance(model, tf.PreTrainedModel):
        return False
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([value] if isinstance(value, str) else value)
    return any(cls.__name__ in names for cls in type(model).__mro__)
