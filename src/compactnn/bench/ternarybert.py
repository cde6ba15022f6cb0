"""Benchmark section ``ternarybert``: TernaryBERT on MiniLM against 2-bit GPTQ with tuning.

Rows, each against the float model in the same run (mean cosine of the sentence embeddings of
256 held-out ``sentences("eval")``; bytes of the saved artifact; CPU seconds of ``compress``):

* ``w2-g32-gptq_tune``: weight-only 2 bits in groups of 32 (GPTQ, then block tuning; embedding
  tables 2 bits in groups of 32), on the reference's 512 calibration sentences and, in the
  full run, on the whole calibration split like TernaryBERT;
* ``w2a8-ternarybert`` with 0 steps: ternary weights and 8-bit activations, no training
  (plain row-wise ternarisation: what the distillation has to recover);
* ``w2a8-ternarybert``: the recipe's defaults, distilled from the float model on every
  sentence of the calibration split (full run only), and on ``unlabeled_texts()`` (the
  calibration split, the rest of the corpus' non-held-out text and random spans): the row the
  target reads. Both are disjoint from the evaluation sentences;
* the ablations (full run only, on ``unlabeled_texts()``, each at ``ABLATION_STEPS`` beside the
  defaults at that many steps): the recipe without each of its additions to the paper, a
  cosine weight of 10, and the defaults at 1,200 steps.

``COMPACTNN_BENCH_DEVICE=cuda`` trains every row there (``TernaryBERTConfig.device``); the
scores are always taken on the CPU. The recipe's 2,400 steps take about 45 minutes on one CPU
thread and 4 on an H200.

``run(val=True)`` is for choosing settings: it trains on 90% of ``unlabeled_texts()`` and scores
256 of the other 10% (``validation_split``), never the held-out sentences.

Target (issue 19): TernaryBERT's mean cosine >= 0.95 and above ``w2-g32-gptq_tune`` at equal
or smaller size.
"""

from __future__ import annotations

import dataclasses
import os
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import compactnn
from compactnn.data import text as corpus_text
from compactnn.data.text import sentences
from compactnn.measure.environment import cpu_description
from compactnn.measure.size import artifact_bytes, float_artifact_bytes
from compactnn.measure.timing import set_threads
from compactnn.recipe import Recipe, Step, resolve_recipe

THREADS = 1
COMMAND = "python -m compactnn.bench --only ternarybert"
ABLATION_STEPS = 600  # the ablations' length: a quarter of the recipe's, to keep the run short
ABLATIONS = {  # name -> fields changed from the recipe's defaults (at ABLATION_STEPS)
    f"{ABLATION_STEPS} steps": {},
    "embedding table at 2 bits (paper-like)": {"embedding_bits": None},
    "no cosine term": {"cosine": 0.0},
    "TWN scales (not learned)": {"learn_scale": False},
    "cosine term 10": {"cosine": 10.0},
    "1,200 steps": {"steps": 1200},
}
SEEDS = (0, 1, 2)  # the target row's seeds (text order and compress seed) in the full run
DEVICE = os.environ.get("COMPACTNN_BENCH_DEVICE") or None  # where the rows train


def unlabeled_texts(seed: int = 0) -> list[str]:
    """More unlabeled training text than ``sentences("calib")``, none of it held out.

    Every piece of the corpus cut at sentence ends with the rules of ``sentences`` (the calib
    sentences, and the text the sentence filter drops: long sentences, list items, code
    lines), then one random word span (a third of its words or more) of each calib sentence.
    A text is dropped when it contains a held-out sentence or is part of one, so nothing of
    ``sentences("eval")`` is ever trained on. Shuffled with ``seed``.
    """
    held_out = sentences("eval")
    joined = "\n".join(held_out)

    def fresh(t: str) -> bool:
        return t not in joined and not any(e in t for e in held_out)

    pieces: dict[str, None] = {}
    for paragraph in corpus_text._paragraphs(corpus_text.corpus()):
        for piece in corpus_text._SENTENCE_END.split(paragraph):
            piece = " ".join(piece.split())
            if len(piece.split()) >= 3 and fresh(piece):
                pieces.setdefault(piece, None)
    rng = random.Random(seed)
    for s in sentences("calib"):
        words = s.split()
        n = rng.randint(max(3, len(words) // 3), len(words))
        i = rng.randint(0, len(words) - n)
        span = " ".join(words[i : i + n])
        if fresh(span):
            pieces.setdefault(span, None)
    out = list(pieces)
    rng.shuffle(out)
    return out


def validation_split(texts: list[str], fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """``(train, val)``: the last ``fraction`` of ``texts`` held aside for choosing settings.

    A training text that contains a validation text, or is part of one (a calib sentence and
    a word span of it), is dropped, so the validation texts are never trained on.
    """
    n_val = max(1, int(len(texts) * fraction))
    val = texts[-n_val:]
    joined = "\n".join(val)
    train = [t for t in texts[:-n_val] if t not in joined and not any(v in t for v in val)]
    return train, val


def _ternarybert(label: str, **changes) -> Recipe:
    base = resolve_recipe("w2a8-ternarybert").steps[0]
    config = dataclasses.replace(base.config, **dict({"device": DEVICE}, **changes))
    return Recipe(f"w2a8-ternarybert ({label})", (Step("ternarybert", config, base.targets),))


def _batches(texts: list[str], batch: int = 16, seed: int = 0) -> list[dict]:
    """Tokenized batches of similar lengths (less padding), in a shuffled order."""
    from compactnn.models.minilm import load_tokenizer, tokenize

    tokenizer, order = load_tokenizer(), sorted(texts, key=len)
    out = [tokenize(tokenizer, order[i : i + batch]) for i in range(0, len(order), batch)]
    random.Random(seed).shuffle(out)
    return out


def _row(ref, recipe, calib: list, data: str, tmp: Path, seed: int = 0) -> dict:
    name = recipe if isinstance(recipe, str) else recipe.name
    t0, c0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = compactnn.compress(ref.model, recipe, calib_data=calib, progress=False, seed=seed)
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    path = tmp / f"a{len(list(tmp.iterdir()))}"
    compactnn.save(q, path)
    cos = ref.evaluate(q)
    print(
        f"[bench] ternarybert: {name} on {data}: cosine {cos:.4f} ({secs:.0f} s)", file=sys.stderr
    )
    return {"name": name, "data": data, "cos": cos, "bytes": artifact_bytes(path), "cpu": cpu}


def _validation_reference(ref, val: list[str]):
    """``ref`` scoring the first 256 validation texts instead of the held-out sentences."""
    from compactnn.models.minilm import embed, load_tokenizer, mean_cosine

    tokenizer, texts = load_tokenizer(), val[:256]
    reference = embed(ref.model, tokenizer, texts)
    return dataclasses.replace(
        ref, evaluate=lambda q: mean_cosine(reference, embed(q, tokenizer, texts))
    )


def run(quick: bool = False, val: bool = False) -> str:
    """Measure and return the section's Markdown (quick: 60 steps, no ablations).

    ``val``: choose settings, not report them: train on 90% of ``unlabeled_texts()`` and score
    the last 10% (``validation_split``) instead of the held-out sentences.
    """
    from compactnn.models.minilm import build_minilm

    set_threads(THREADS)
    n_all = len(sentences("calib"))
    ref = build_minilm(n_calib=n_all)
    small = ref.calib[: 512 // 16]  # the `minilm` reference's 512 sentences, batches of 16
    calib_name, small_name = f"{n_all} calib sentences", "512 calib sentences"
    texts = unlabeled_texts()
    if val:
        texts, held_aside = validation_split(texts)
        ref = _validation_reference(ref, held_aside)
    more, more_name = _batches(texts), f"{len(texts)} unlabeled texts"
    if val:  # the calib split holds validation texts: calibrate on the training part instead
        calib_name, small_name = f"{n_all} training texts", "512 training texts"
        ref = dataclasses.replace(ref, calib=_batches(texts[:n_all]))
        small = ref.calib[: 512 // 16]
    fbytes = float_artifact_bytes(ref.model)
    default = resolve_recipe("w2a8-ternarybert").steps[0].config
    steps = 60 if quick else default.steps
    runs = [("w2-g32-gptq_tune", small, small_name)]
    if not quick:
        runs.append(("w2-g32-gptq_tune", ref.calib, calib_name))
    runs.append((_ternarybert("0 steps", steps=0), ref.calib, calib_name))
    if not quick:
        short = _ternarybert(f"{ABLATION_STEPS} steps", steps=ABLATION_STEPS)
        runs.append((short, ref.calib, calib_name))
    best = len(runs)  # the recipe's defaults on the most text: the row the target reads
    target = _ternarybert(f"{steps} steps", steps=steps)
    runs.append((target, more, more_name))
    seeds = [0] * len(runs)
    if not quick and not val:  # the target row again on other seeds: its spread
        for seed in SEEDS[1:]:
            other = _batches(unlabeled_texts(seed))
            runs.append((target, other, f"{more_name}, seed {seed}"))
            seeds.append(seed)
    repeats = range(best, len(runs))
    if not quick:
        ablations = [(k, dict({"steps": ABLATION_STEPS}, **v)) for k, v in ABLATIONS.items()]
        label = lambda k: k if "steps" in k else f"{k}, {ABLATION_STEPS} steps"  # noqa: E731
        runs += [(_ternarybert(label(k), **v), more, more_name) for k, v in ablations]
        seeds += [0] * len(ablations)
    with tempfile.TemporaryDirectory(prefix="compactnn-bench-tb-") as tmp:
        rows = [
            _row(ref, r, calib, data, Path(tmp), seed)
            for (r, calib, data), seed in zip(runs, seeds, strict=True)
        ]
    scored = "Validation: 256 of the last 10% of `unlabeled_texts()`"
    scored = scored if val else "Held-out: 256 eval sentences"
    lines = [
        f"CPU: {cpu_description()}; {THREADS} thread"
        + (f"; trained on {DEVICE}, scored on the CPU" if DEVICE else "")
        + f". Float artifact {fbytes:,} bytes. "
        f"{scored}; training text: the calib split, or `unlabeled_texts()` "
        f"({len(texts)} texts: calib sentences, the corpus' other non-held-out pieces, and a "
        "random word span of each calib sentence).",
        "",
        "| recipe | training text | mean cosine | artifact bytes | smaller than float "
        "| compress CPU (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['data']} | {r['cos']:.4f} | {r['bytes']:,} | "
            f"{fbytes / r['bytes']:.1f}x | {r['cpu']:.0f} |"
        )
    gptq = max((r for r in rows if r["name"] == "w2-g32-gptq_tune"), key=lambda r: r["cos"])
    tbs = [rows[i] for i in repeats]
    mean = sum(r["cos"] for r in tbs) / len(tbs)
    low, high = min(r["cos"] for r in tbs), max(r["cos"] for r in tbs)
    size = max(r["bytes"] for r in tbs)
    met = mean >= 0.95 and low > gptq["cos"] and size <= gptq["bytes"]
    lines += [
        "",
        f"Target (cosine >= 0.95, above the best w2-g32-gptq_tune row ({gptq['cos']:.4f}) at "
        f"equal or smaller size; the defaults on the unlabeled texts, {len(tbs)} seed(s): mean "
        f"{mean:.4f} ({low:.4f}-{high:.4f}), {size:,} B): " + ("met." if met else "not met."),
        "",
        f"Reproduce: `{COMMAND}`" + (" (quick: 60 steps, no ablations)." if quick else "."),
    ]
    return "\n".join(lines)
