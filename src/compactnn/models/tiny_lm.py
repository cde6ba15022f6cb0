"""``tiny-lm``: a small Llama trained on the ``pydoc_data`` help text on first use, then cached.

Architecture (:class:`TinyLMConfig`; 3.9 M parameters): a Hugging Face ``LlamaForCausalLM``,
hidden 256, 4 layers of 4 heads (head size 64), SwiGLU MLP of width 768, context 128 tokens,
vocabulary 1,024, untied embedding and ``lm_head``. Every linear layer's input width (256 or
768) is a multiple of 128, so group sizes 32, 64 and 128 divide them all.

Tokens: a byte-level BPE of 1,024 tokens (:func:`load_tokenizer`: 3 specials, the 256 bytes,
765 merges) trained with the ``tokenizers`` package on the training text only, in about a
second; deterministic, nothing downloaded. A token is about 3 bytes of this text.
Training text: ``lm_text("train")``; held out: ``lm_text("eval")`` (a split by paragraph
content hash, see :mod:`compactnn.data.text`).

Training (:class:`LMFitConfig`): AdamW, linear warm-up then cosine decay to a tenth, batches
of random windows of the training tokens drawn from a seeded generator, on one thread (the
weights then do not depend on the core count). Cached like the other references, keyed by
this file, the text module, the configs, the seed, the corpus, the tokenizer and the
``transformers`` version.

Quality: perplexity per token on the held-out text in consecutive windows of 128 tokens
(lower is better; every token but the first of a window is predicted), computed by
:func:`compactnn.measure.perplexity.perplexity` (re-exported here as ``perplexity``).
Calibration: windows of the training text spread evenly over it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import sys
import time

import torch
from torch import nn

from compactnn._optional import require
from compactnn.core.calib import main_output
from compactnn.core.progress import bar
from compactnn.core.seeding import seeded_rng
from compactnn.data import text as text_module
from compactnn.errors import CompactnnError
from compactnn.measure.perplexity import next_token_nll, perplexity
from compactnn.models import cache
from compactnn.models.reference import Reference

NAME = "tiny-lm"
VOCAB_SIZE = 1024
SPECIALS = ("<pad>", "<bos>", "<eos>")


@dataclasses.dataclass(frozen=True)
class TinyLMConfig:
    """The architecture (part of the cache key).

    Args:
        hidden_size: model width; a multiple of 128 keeps group size 128 usable.
        num_layers: decoder blocks.
        num_heads: attention heads (``hidden_size`` must divide evenly).
        intermediate_size: SwiGLU width (a multiple of 128 for group size 128).
        context: the longest sequence, in tokens.
        vocab_size: tokens of the BPE (:func:`load_tokenizer`).
    """

    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 768
    context: int = 128
    vocab_size: int = VOCAB_SIZE

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise CompactnnError(
                f"TinyLMConfig: hidden_size {self.hidden_size} is not a multiple of num_heads "
                f"{self.num_heads}; pick sizes that divide evenly."
            )


@dataclasses.dataclass(frozen=True)
class LMFitConfig:
    """How ``tiny-lm`` is trained (part of the cache key).

    Args:
        steps: optimizer steps.
        batch_size: windows per step.
        lr: peak learning rate (AdamW).
        warmup: steps of linear warm-up before the cosine decay to ``lr / 10``.
        weight_decay: AdamW weight decay (on matrices only, not norms).
        threads: torch threads while training (1: the weights do not depend on the machine).
    """

    steps: int = 300
    batch_size: int = 8
    lr: float = 5e-3
    warmup: int = 30
    weight_decay: float = 0.1
    threads: int = 1


class LMTokenizer:
    """A byte-level BPE over the training text: any text encodes, and decodes back exactly.

    Built by :func:`load_tokenizer`; ``pad``, ``bos`` and ``eos`` are ids 0, 1 and 2, the 256
    byte tokens follow, then the learned merges.

    Example:
        >>> tok = load_tokenizer()
        >>> tok.decode(tok.encode("héllo, world"))
        'héllo, world'
    """

    def __init__(self, backend) -> None:
        self.backend = backend  # a tokenizers.Tokenizer
        self.pad_id, self.bos_id, self.eos_id = (backend.token_to_id(t) for t in SPECIALS)
        self.vocab_size = backend.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """The token ids of ``text`` (no specials added)."""
        return self.backend.encode(text).ids

    def decode(self, ids) -> str:
        """The text of ``ids``; special ids are dropped."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=True)

    def fingerprint(self) -> str:
        """A short hash of the whole tokenizer (vocabulary, merges, settings)."""
        return hashlib.sha256(self.backend.to_str().encode()).hexdigest()[:16]


@functools.cache
def load_tokenizer(vocab_size: int = VOCAB_SIZE) -> LMTokenizer:
    """The BPE of ``vocab_size`` tokens trained on ``lm_text("train")`` (about 1 s; cached).

    Deterministic: the trainer breaks ties between equally frequent pairs by the pair itself,
    so the same text gives the same merges in every process.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(SPECIALS),
        show_progress=False,
    )
    backend.train_from_iterator([text_module.lm_text("train")], trainer)
    return LMTokenizer(backend)


def make_model(arch: TinyLMConfig | None = None) -> nn.Module:
    """A fresh (randomly initialised) ``LlamaForCausalLM`` of the given architecture."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tf = require("transformers", "hf")

    arch = arch or TinyLMConfig()
    tok = load_tokenizer(arch.vocab_size)
    config = tf.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size, num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads, num_key_value_heads=arch.num_heads,
        max_position_embeddings=arch.context, tie_word_embeddings=False,
        pad_token_id=tok.pad_id, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
    )  # fmt: skip
    return tf.LlamaForCausalLM(config).eval()


@functools.cache
def split_ids(split: str, vocab_size: int = VOCAB_SIZE) -> torch.Tensor:
    """The token ids ``(L,)`` of ``lm_text(split)`` (computed once per process)."""
    ids = load_tokenizer(vocab_size).encode(text_module.lm_text(split))
    return torch.tensor(ids, dtype=torch.long)


def windows(ids: torch.Tensor, length: int, limit: int | None = None, spread: bool = False):
    """Consecutive non-overlapping ``(N, length)`` windows of ``ids`` (the rest dropped).

    Args:
        ids: token ids ``(L,)``.
        length: tokens per window.
        limit: keep at most this many windows; None: all.
        spread: with ``limit``, take windows evenly spaced over ``ids`` instead of the first.
    """
    n = len(ids) // length
    if n == 0:
        raise CompactnnError(f"{len(ids)} tokens are fewer than one window of {length}.")
    out = ids[: n * length].reshape(n, length).clone()  # (N, T)
    if limit is not None and limit < n:
        keep = torch.linspace(0, n - 1, limit).round().long() if spread else torch.arange(limit)
        out = out[keep]
    return out


def as_batches(ids: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """``(N, T)`` token ids as a list of ``input_ids``/``attention_mask`` dicts."""
    return [
        {"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}
        for chunk in torch.split(ids, batch_size)
    ]


def _lr_at(step: int, cfg: LMFitConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train_lm(
    model: nn.Module,
    ids: torch.Tensor,
    context: int,
    cfg: LMFitConfig,
    seed: int,
    progress: bool = True,
) -> float:
    """Train ``model`` in place on random windows of token ``ids`` ``(L,)``; return the mean
    loss of the last 20 steps.

    Deterministic for a given seed: windows come from a private generator (the global RNG is
    untouched) and training runs on ``cfg.threads`` threads.
    """
    gen = torch.Generator().manual_seed(seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    losses: list[float] = []
    model.train()
    try:
        for step in bar(range(cfg.steps), desc=f"training {NAME}", progress=progress):
            starts = torch.randint(0, len(ids) - context, (cfg.batch_size,), generator=gen)
            batch = torch.stack([ids[s : s + context] for s in starts.tolist()])  # (B, T)
            s, n = next_token_nll(main_output(model(input_ids=batch)), batch)
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, cfg)
            opt.zero_grad(set_to_none=True)
            (s / n).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(float(s.detach() / n))
    finally:
        torch.set_num_threads(threads)
        model.eval()
    return sum(losses[-20:]) / len(losses[-20:])


def calibration_batches(
    arch: TinyLMConfig | None = None, n_windows: int = 64, batch_size: int = 8
) -> list[dict[str, torch.Tensor]]:
    """Calibration data: ``n_windows`` training-text windows spread evenly, in batches."""
    arch = arch or TinyLMConfig()
    ids = split_ids("train", arch.vocab_size)
    return as_batches(windows(ids, arch.context, limit=n_windows, spread=True), batch_size)


def eval_batches(
    arch: TinyLMConfig | None = None, n_windows: int | None = None, batch_size: int = 32
) -> list[dict[str, torch.Tensor]]:
    """The held-out text in consecutive windows (all of them, or the first ``n_windows``)."""
    arch = arch or TinyLMConfig()
    return as_batches(
        windows(split_ids("eval", arch.vocab_size), arch.context, n_windows), batch_size
    )


def _key(arch: TinyLMConfig, fit: LMFitConfig, seed: int) -> str:
    transformers = require("transformers", "hf")
    loss = sys.modules[next_token_nll.__module__]  # the training loss
    files = cache.module_sources(sys.modules[__name__], text_module, loss)
    corpus = hashlib.sha256(text_module.corpus().encode()).hexdigest()[:16]
    return cache.cache_key(
        NAME, files, seed=seed, arch=repr(arch), fit=repr(fit), corpus=corpus,
        tokenizer=load_tokenizer(arch.vocab_size).fingerprint(),
        transformers=transformers.__version__,
    )  # fmt: skip


def build_tiny_lm(
    *,
    progress: bool = True,
    seed: int = 0,
    arch: TinyLMConfig | None = None,
    fit: LMFitConfig | None = None,
    n_calib: int = 64,
    calib_batch: int = 8,
    n_eval: int | None = None,
) -> Reference:
    """The trained ``tiny-lm`` reference (trained on first use, then loaded from the cache).

    Args:
        progress: show a progress bar while training.
        seed: initial weights and training windows; part of the cache key.
        arch: the architecture (part of the cache key); None: :class:`TinyLMConfig()`.
        fit: training settings (part of the cache key); None: :class:`LMFitConfig()`.
        n_calib: calibration windows from the training text.
        calib_batch: windows per calibration batch.
        n_eval: held-out windows scored by ``evaluate``; None: all of them.

    Example:
        >>> ref = build_tiny_lm(progress=False)  # doctest: +SKIP
        >>> ref.metric, round(ref.evaluate(ref.model), 1)  # doctest: +SKIP
        ('perplexity', 100.0)
    """
    arch, fit = arch or TinyLMConfig(), fit or LMFitConfig()

    def make() -> nn.Module:
        with seeded_rng(seed):
            return make_model(arch)

    held_out = eval_batches(arch, n_eval)

    def train(model: nn.Module) -> dict[str, str]:
        start, cpu_start = time.perf_counter(), time.process_time()
        ids = split_ids("train", arch.vocab_size)
        loss = train_lm(model, ids, arch.context, fit, seed, progress)
        return {
            "seed": str(seed),
            "train_loss": f"{loss:.4f}",
            "eval_perplexity": f"{perplexity(model, held_out):.4f}",
            "train_seconds": f"{time.perf_counter() - start:.1f}",
            "train_cpu_seconds": f"{time.process_time() - cpu_start:.1f}",
        }

    model, _ = cache.load_or_train(NAME, _key(arch, fit, seed), make(), train)
    model.eval()
    calib = calibration_batches(arch, n_calib, calib_batch)
    return Reference(
        name=NAME,
        model=model,
        calib=calib,
        evaluate=lambda m: perplexity(m, held_out),
        metric="perplexity",
        example=calib[0],
        kind="transformer",
        skeleton=lambda: make_model(arch),
    )
