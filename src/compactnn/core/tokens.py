"""Token ids for a language model: refuse ids out of its vocabulary, sequences past its
position table, float ids or a mask of another shape, and warn about padding without a mask."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from compactnn.errors import CompactnnError, user_stacklevel


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


def refused_length(model: nn.Module, length: int) -> int | None:
    """The model's position limit when a sequence of ``length`` tokens exceeds it, else None.

    A model with learned positions (GPT-2, BERT) fails past the limit; one with rotary
    positions (Llama, Qwen2, Mistral) runs there, on positions it was never trained at, so
    its calibration ranges, Hessians and perplexity there are not those of its use: refused
    too."""
    limit = max_positions(model)
    return limit if limit is not None and length > limit else None


def token_dicts(data: Any) -> list[dict]:
    """The dict batches of ``data``: a dict, or the dicts of a list (or of its 1-tuples)."""
    if isinstance(data, dict):
        return [data]
    if isinstance(data, tuple) and len(data) == 1:
        return token_dicts(data[0])
    if isinstance(data, list):
        return [d for batch in data for d in token_dicts(batch)]
    return []


def check_token_dicts(data: Any, what: str) -> None:
    """Refuse ``input_ids`` that are not integers, and an ``attention_mask`` (or
    ``token_type_ids``) whose shape differs from the ids' (transformers runs some such masks
    without a word, on the wrong positions).

    Example:
        >>> check_token_dicts({"input_ids": torch.zeros(2, 4).long()}, "--data d")
        >>> check_token_dicts({"input_ids": torch.zeros(2, 4)}, "--data d")
        Traceback (most recent call last):
        compactnn.errors.CompactnnError: --data d: input_ids holds float32 values, ...
    """
    for batch in token_dicts(data):
        ids = batch.get("input_ids")
        if not isinstance(ids, torch.Tensor):
            continue
        if ids.is_floating_point() or ids.is_complex():
            dtype = str(ids.dtype).removeprefix("torch.")
            raise CompactnnError(
                f"{what}: input_ids holds {dtype} values, and token ids are integers: save "
                "them as int64 (e.g. ids.long()), as the model's tokenizer gives them."
            )
        for key in ("attention_mask", "token_type_ids"):
            other = batch.get(key)
            if isinstance(other, torch.Tensor) and other.shape != ids.shape:
                raise CompactnnError(
                    f"{what}: {key} has shape {tuple(other.shape)} and input_ids "
                    f"{tuple(ids.shape)}; they must match (one {key} value per token). "
                    "Save both from the same tokenizer call."
                )


def check_token_ids(model: nn.Module, data: Any, what: str, *, resave: bool = True) -> None:
    """Refuse token ids a Hugging Face language model cannot take, naming the data
    (``what``, e.g. ``"--data ids.npy"`` or ``"calib_data"``): ids outside its vocabulary,
    sequences longer than its position table, float ids or a mask of another shape
    (:func:`check_token_dicts`). Anything else (float inputs, other models)
    passes unchecked. ``resave``: the fix ends with saving the file again (data from a file).
    Padded token ids without an attention mask are warned about (:func:`unmasked_padding`).

    Raises:
        CompactnnError: naming the ids found against the vocabulary size, or the sequence
            length against the model's limit, and how to fix the data.
    """
    vocab = vocab_size(model)
    if vocab is not None:
        check_token_dicts(data, what)
        warn_unmasked_padding(model, data)
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
    check_positions(model, tensors, what, resave=resave)


def check_positions(
    model: nn.Module, data: Any, what: str = "calib_data", *, resave: bool = False
) -> None:
    """Refuse token ids in ``data`` longer than a Hugging Face language model's position
    table (:func:`refused_length`), naming the data (``what``), the length, the limit, its
    config.json key and the fix; ``resave``: the fix ends with saving the file again."""
    if vocab_size(model) is None:
        return
    tensors = [t for t in token_id_tensors(data) if t.dim() and t.numel()]
    length = max((int(t.shape[-1]) for t in tensors), default=0)
    limit = refused_length(model, length)
    if limit is not None:
        then = " and save the file again" if resave else ""
        raise CompactnnError(
            f"{what} holds sequences of {length} tokens and the model takes at most {limit} "
            f"({position_key(model)} in its config.json): cut each sequence to {limit} tokens "
            f"or fewer (e.g. ids[:, :{limit}], or windows of {limit}){then}."
        )


def unmasked_padding(model: nn.Module, data: Any) -> str | None:
    """Why token ids without an ``attention_mask`` give a Hugging Face model other outputs:
    some contain its ``config.pad_token_id``, which it then attends to. None when a mask is
    given, the model has no padding id, or no id is the padding id.

    Example:
        >>> bert = nn.Module()
        >>> bert.config = type("Config", (), {"pad_token_id": 0})()
        >>> unmasked_padding(bert, torch.tensor([[5, 6, 0], [5, 6, 7]]))[:28]
        '1 of 2 sequences of token id'
    """
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    if isinstance(data, dict):
        if "attention_mask" in data:
            return None
        data = data.get("input_ids")
    if not isinstance(pad, int) or not isinstance(data, torch.Tensor) or data.dim() < 2:
        return None
    if data.is_floating_point() or data.is_complex():
        return None
    padded = int((data == pad).flatten(1).any(1).sum())
    if padded == 0:
        return None
    return (
        f"{padded} of {data.shape[0]} sequences of token ids hold the padding id {pad} but no "
        "attention_mask is given, so the model attends to the padding (other outputs, lower "
        "accuracy): save attention_mask (1 for tokens, 0 for padding) beside input_ids "
        "(with y for labels)."
    )


def warn_unmasked_padding(model: nn.Module, data: Any) -> None:
    """Warn with :func:`unmasked_padding`'s line when it has one (shown once per line)."""
    if (why := unmasked_padding(model, data)) is not None:
        warnings.warn(why, stacklevel=1)  # one location: the same line is not repeated


def masked_out(batch: Any) -> bool | None:
    """Whether every entry of the ``(B, T)`` ``attention_mask`` of a batch (a dict, or a dict
    in a 1-tuple) is 0: no token unmasked. None when the batch has no such mask (a 4-D or
    additive mask, where 0 means attend, is not read).

    Example:
        >>> masked_out({"input_ids": torch.ones(2, 3).long(), "attention_mask": torch.zeros(2, 3)})
        True
    """
    masks = [d.get("attention_mask") for d in token_dicts(batch)]
    masks = [m for m in masks if isinstance(m, torch.Tensor) and m.dim() <= 2 and m.numel()]
    return None if not masks else not any(bool(m.any()) for m in masks)


def check_masked_out(batches: list, what: str = "calibration batch", of: str = "") -> None:
    """Refuse batches whose ``attention_mask`` is all 0 in every batch that has one (no token
    unmasked: the model would run on padding only, and the statistics drawn from it say
    nothing about real text); warn, naming them, when only some batches are so.

    Example:
        >>> check_masked_out([{"attention_mask": torch.zeros(1, 4)}])
        Traceback (most recent call last):
        compactnn.errors.CompactnnError: calibration batch 0: every attention_mask entry is 0, ...
    """
    found = [(i, m) for i, b in enumerate(batches) if (m := masked_out(b)) is not None]
    empty = [i for i, m in found if m]
    if not empty:
        return
    shown = ", ".join(map(str, empty[:8])) + (", ..." if len(empty) > 8 else "")
    named = f"{what}{'es' if len(empty) > 1 else ''} {shown}{of}"  # of: " of --data FILE"
    if len(empty) == len(found):
        every = f" (all {len(empty)})" if len(empty) > 1 else ""
        raise CompactnnError(
            f"{named}{every}: every attention_mask entry is 0, so no token is unmasked and "
            "the model would see padding only: pass the tokenizer's attention_mask (1 for "
            "tokens, 0 for padding) beside input_ids."
        )
    they, add = ("they", "add") if len(empty) > 1 else ("it", "adds")
    warnings.warn(
        f"{named} (of {len(found)}): every attention_mask entry is 0 (no token unmasked), so "
        f"{they} {add} padding only: drop {'them' if len(empty) > 1 else 'it'} or pass the "
        "tokenizer's attention_mask (1 for tokens, 0 for padding).",
        stacklevel=user_stacklevel(),
    )
