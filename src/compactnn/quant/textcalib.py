"""Calibration batches for language models from raw text, with clear errors for bad text."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compactnn.errors import CompactnnError


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


def token_id_tensors(data: Any) -> list[torch.Tensor]:
    """The integer token-id tensors in ``data``: an integer tensor, the ``input_ids`` of a
    dict, the first element of a tuple, or those of every batch of a list.

    Example:
        >>> [t.shape for t in token_id_tensors([{"input_ids": torch.zeros(2, 5).long()}])]
        [torch.Size([2, 5])]
    """
    if isinstance(data, torch.Tensor):
        return [data] if not data.is_floating_point() and not data.is_complex() else []
    if isinstance(data, dict):
        return token_id_tensors(data.get("input_ids"))
    if isinstance(data, tuple) and data:
        return token_id_tensors(data[0])
    if isinstance(data, list):
        return [t for batch in data for t in token_id_tensors(batch)]
    return []


def vocab_size(model: nn.Module) -> int | None:
    """Rows of a Hugging Face model's input embedding table (its ``config.vocab_size``
    when it has no ``get_input_embeddings``); None for any other model."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    get = getattr(model, "get_input_embeddings", None)
    try:
        table = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        table = None
    rows = getattr(table, "num_embeddings", None) or getattr(config, "vocab_size", None)
    return rows if isinstance(rows, int) else None


def max_positions(model: nn.Module) -> int | None:
    """A Hugging Face model's ``max_position_embeddings`` (``n_positions`` for GPT-2)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def position_key(model: nn.Module) -> str:
    """The config.json key of :func:`max_positions` (``n_positions`` for GPT-2)."""
    config = getattr(model, "config", None)
    key = getattr(config, "attribute_map", {}).get("max_position_embeddings")
    return key if isinstance(key, str) else "max_position_embeddings"


def _runs(model: nn.Module, length: int) -> bool:
    """Whether ``model`` runs on one sequence of ``length`` token ids (all 0)."""
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, length, dtype=torch.long))
    except Exception:  # any failure: the length is not known to work
        return False
    return True


def refused_length(model: nn.Module, length: int) -> int | None:
    """The model's position limit when a sequence of ``length`` tokens exceeds it and the
    model fails on it while it runs at the limit (a model with rotary positions runs past
    it: None); else None."""
    limit = max_positions(model)
    if limit is None or length <= limit:
        return None
    return limit if not _runs(model, length) and _runs(model, limit) else None


def check_token_ids(model: nn.Module, data: Any, what: str) -> None:
    """Refuse token ids a Hugging Face language model cannot take, naming the data
    (``what``, e.g. ``"--data ids.npy"``): ids outside its vocabulary, or sequences longer
    than its position table. Anything else (float inputs, other models) passes unchecked.

    Raises:
        CompactnnError: naming the ids found against the vocabulary size, or the sequence
            length against the model's limit, and how to fix the data.
    """
    vocab = vocab_size(model)
    tensors = [t for t in token_id_tensors(data) if t.numel()] if vocab is not None else []
    if not tensors:
        return
    lo, hi = min(int(t.min()) for t in tensors), max(int(t.max()) for t in tensors)
    if hi >= vocab or lo < 0:
        found = f"the largest id found is {hi}" if hi >= vocab else f"the smallest id found is {lo}"
        raise CompactnnError(
            f"{what} holds token ids out of the model's vocabulary: {found}, and the "
            f"vocabulary has {vocab} entries (ids 0 to {vocab - 1}). Tokenize the text with "
            "the model's own tokenizer (the one saved with it)."
        )
    length = max(int(t.shape[-1]) for t in tensors if t.dim())
    limit = refused_length(model, length)
    if limit is not None:
        raise CompactnnError(
            f"{what} holds sequences of {length} tokens and the model takes at most {limit} "
            f"({position_key(model)} in its config.json): cut each sequence to {limit} tokens "
            f"or fewer (e.g. ids[:, :{limit}], or windows of {limit}) and save the file again."
        )
