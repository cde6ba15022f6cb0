"""A byte-level BPE tokenizer as llama.cpp's ``gpt2`` vocabulary in GGUF metadata.

llama.cpp reads ``tokenizer.ggml.model = "gpt2"``: the tokens in id order (in the byte-level
alphabet, as the ``tokenizers`` vocabulary spells them), one type per token (1 normal,
3 control for special tokens), the merges as ``"left right"`` strings, and the bos / eos /
pad ids. ``tokenizer.ggml.pre`` names llama.cpp's split of the text before BPE: ``"gpt-2"``
for a ``ByteLevel`` pre-tokenizer with its default regex, ``"qwen2"`` for Qwen2's (a ``Split``
with Qwen2's regex, then ``ByteLevel`` without its own). Without a tokenizer the file says
``no_vocab`` (llama.cpp then runs token ids only).
"""

from __future__ import annotations

import json
from typing import Any

from compactnn.errors import CompactnnError

NORMAL, CONTROL = 1, 3
#: the split regex of Qwen2's tokenizer.json, which llama.cpp's "qwen2" pre-tokenizer applies
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPECIAL_ROLES = {"bos": ("<bos>", "<s>", "<|begin_of_text|>"), "eos": ("<eos>", "</s>")}


def _backend(tokenizer: Any):
    """The ``tokenizers.Tokenizer`` behind ``tokenizer`` (itself, ``.backend`` or
    ``.backend_tokenizer``)."""
    for attr in ("backend_tokenizer", "backend"):
        inner = getattr(tokenizer, attr, None)
        if inner is not None and hasattr(inner, "to_str"):
            return inner
    if hasattr(tokenizer, "to_str"):
        return tokenizer
    raise CompactnnError(
        f"cannot write a {type(tokenizer).__name__} tokenizer into GGUF: pass a "
        "tokenizers.Tokenizer or a fast transformers tokenizer (byte-level BPE), or none."
    )


NO_VOCAB_FIX = "pass tokenizer=None to write the model without a vocabulary"


def _is_qwen2_split(pre: dict[str, Any]) -> bool:
    """Qwen2's pre-tokenizer: ``Sequence[Split(QWEN2_SPLIT, Isolated), ByteLevel(no regex)]``."""
    steps = pre.get("pretokenizers") or []
    if pre.get("type") != "Sequence" or len(steps) != 2:
        return False
    split, byte_level = steps
    return (
        split.get("type") == "Split"
        and (split.get("pattern") or {}).get("Regex") == QWEN2_SPLIT
        and split.get("behavior") == "Isolated"
        and not split.get("invert")
        and byte_level.get("type") == "ByteLevel"
        and byte_level.get("use_regex") is False
    )


def gpt2_vocab(tokenizer: Any, fix: str = NO_VOCAB_FIX) -> dict[str, Any]:
    """Tokens, token types, merges and special ids of a byte-level BPE tokenizer; ``fix``
    ends the refusal of another kind of tokenizer (the caller's way to give none: the
    command line says to leave out ``--tokenizer``).

    Raises:
        CompactnnError: for a tokenizer that is not a byte-level BPE with a dense id range.
    """
    spec = json.loads(_backend(tokenizer).to_str())
    model = spec.get("model") or {}
    pre_spec = spec.get("pre_tokenizer") or {}
    pre = json.dumps(pre_spec)
    if model.get("type") != "BPE" or "ByteLevel" not in pre:
        raise CompactnnError(
            f"GGUF export writes byte-level BPE vocabularies; this tokenizer is a "
            f"{model.get('type')} model with pre-tokenizer {pre[:60]}. {fix[:1].upper()}{fix[1:]}."
        )
    pre_name = "qwen2" if _is_qwen2_split(pre_spec) else "gpt-2"
    if pre_name == "gpt-2" and '"use_regex": false' in pre:
        raise CompactnnError(
            "GGUF's gpt-2 pre-tokenizer splits with GPT-2's regex (qwen2's with Qwen2's); this "
            "ByteLevel pre-tokenizer has use_regex=False after another split, which llama.cpp "
            "would tokenize differently."
        )
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = {t["content"]: t for t in spec.get("added_tokens") or []}
    for content, t in added.items():
        vocab[content] = t["id"]
    n = max(vocab.values()) + 1
    tokens = [""] * n
    for tok, i in vocab.items():
        tokens[i] = tok
    if any(t == "" for t in tokens):
        raise CompactnnError("the tokenizer's ids are not dense 0..n-1; GGUF needs one per id.")
    types = [CONTROL if added.get(t, {}).get("special") else NORMAL for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    special = {}
    for role, names in _SPECIAL_ROLES.items():
        special[role] = next((vocab[s] for s in names if s in vocab), None)
    special["pad"] = vocab.get("<pad>")
    return {"tokens": tokens, "types": types, "merges": merges, "special": special, "pre": pre_name}


def add_tokenizer(writer: Any, tokenizer: Any, config: Any) -> None:
    """Write ``tokenizer`` (or ``no_vocab``) into a ``gguf.GGUFWriter``'s metadata."""
    if tokenizer is None:
        writer.add_tokenizer_model("no_vocab")
        return
    v = gpt2_vocab(tokenizer)
    if len(v["tokens"]) > config.vocab_size:
        raise CompactnnError(
            f"the tokenizer has {len(v['tokens'])} tokens but the model's embedding has "
            f"{config.vocab_size} rows; pass the tokenizer the model was trained with."
        )
    tokens = v["tokens"] + [f"[PAD{i}]" for i in range(len(v["tokens"]), config.vocab_size)]
    types = v["types"] + [CONTROL] * (len(tokens) - len(v["types"]))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(v["pre"])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(v["merges"])
    ids = {**v["special"]}
    ids["bos"] = ids["bos"] if ids["bos"] is not None else getattr(config, "bos_token_id", None)
    ids["eos"] = ids["eos"] if ids["eos"] is not None else getattr(config, "eos_token_id", None)
    for role, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("pad", writer.add_pad_token_id),
    ):
        if isinstance(ids[role], int):
            add(ids[role])
    writer.add_add_bos_token(False)  # compactnn's perplexity windows start without one
