"""Calibration batches for language models from raw text, with clear errors for bad text."""

from __future__ import annotations

import torch
from torch import nn

from compactnn.core.tokens import check_token_ids, position_key, refused_length
from compactnn.errors import CompactnnError

# The token-id checks live in compactnn.core.tokens; check_token_ids stays importable here.
__all__ = ["calib_from_text", "check_token_ids"]


def calib_from_text(
    tokenizer,
    text: str,
    n_samples: int = 128,
    seq_len: int = 128,
    batch_size: int = 16,
    model: nn.Module | None = None,
) -> list[dict[str, torch.Tensor]]:
    """``n_samples`` non-overlapping windows of ``seq_len`` tokens from ``text``, batched.

    Args:
        tokenizer: a Hugging Face tokenizer (anything with ``__call__`` giving ``input_ids``).
        text: the calibration text.
        n_samples: windows wanted.
        seq_len: tokens per window.
        batch_size: windows per batch.
        model: when given, the tokenizer's ids are checked against its vocabulary.

    Raises:
        CompactnnError: empty text, text too short for ``n_samples * seq_len`` tokens, a
            tokenizer whose ids do not fit the model's embedding table, or a ``seq_len``
            longer than the model's position table.

    Example:
        >>> batches = calib_from_text(tok, corpus(), 128, 128)  # doctest: +SKIP
    """
    if not isinstance(text, str) or not text.strip():
        raise CompactnnError("the calibration text is empty: pass at least a few pages of text.")
    ids = torch.as_tensor(tokenizer(text)["input_ids"]).flatten()
    need = n_samples * seq_len
    if len(ids) < need:
        raise CompactnnError(
            f"the calibration text has {len(ids)} tokens, too short for {n_samples} samples of "
            f"{seq_len} tokens ({need} needed): give more text, or lower n_samples/seq_len."
        )
    limit = refused_length(model, seq_len) if model is not None else None
    if limit is not None:
        raise CompactnnError(
            f"seq_len={seq_len} is longer than the model takes: at most {limit} tokens "
            f"({position_key(model)} in its config.json); pass seq_len={limit} or less."
        )
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and int(ids.max()) >= vocab:
        raise CompactnnError(
            f"tokenizer mismatch: the tokenizer produced id {int(ids.max())} but the model's "
            f"vocabulary has {vocab} entries; use the tokenizer saved with the model."
        )
    windows = ids[:need].reshape(n_samples, seq_len)  # (n_samples, seq_len)
    return [
        {"input_ids": w, "attention_mask": torch.ones_like(w)}
        for w in torch.split(windows, batch_size)
    ]
