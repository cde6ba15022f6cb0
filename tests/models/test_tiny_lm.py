import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compactnn
from compactnn.data import text
from compactnn.errors import CompactnnError
from compactnn.models import REFERENCES, cache, load_reference, tiny_lm
from compactnn.models.tiny_lm import LMFitConfig, TinyLMConfig

# a tiny architecture and a few steps: exercises train -> cache -> load in about a second
ARCH = TinyLMConfig(
    hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, context=32, vocab_size=320
)
FIT = LMFitConfig(steps=4, batch_size=4, warmup=2)
SMALL = dict(n_calib=8, calib_batch=4, n_eval=16)


@pytest.fixture(scope="module")
def ref(cache_root):
    return tiny_lm.build_tiny_lm(progress=False, arch=ARCH, fit=FIT, **SMALL)


def test_lm_split_is_disjoint_and_covers_every_paragraph():
    paragraphs = text.lm_paragraphs()
    assert len(set(paragraphs)) == len(paragraphs)  # deduplicated
    train = [p for p in paragraphs if text.lm_split_of(p) == "train"]
    held = [p for p in paragraphs if text.lm_split_of(p) == "eval"]
    assert set(train).isdisjoint(held) and len(train) + len(held) == len(paragraphs)
    assert text.lm_text("train") == "\n\n".join(train)
    assert text.lm_text("eval") == "\n\n".join(held)
    # about an eighth of the text is held out, by content hash
    fraction = len(text.lm_text("eval")) / (len(text.lm_text("train")) + len(text.lm_text("eval")))
    assert 0.05 < fraction < 0.3
    assert all(text.lm_split_of(p) == "eval" for p in held[:20])
    with pytest.raises(CompactnnError, match="train"):
        text.lm_text("calib")


def test_no_held_out_paragraph_occurs_in_the_training_text():
    train = text.lm_text("train")
    long_held = [p for p in text.lm_text("eval").split("\n\n") if len(p) > 200]
    assert long_held and not any(p in train for p in long_held)


def test_tokenizer_round_trips_any_text_and_drops_specials():
    tok = tiny_lm.load_tokenizer()
    assert tok.vocab_size == 1024 and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    sample = text.lm_text("eval")[:3000] + " naïve “quotes” — ünïcode \x00\t end"
    ids = tok.encode(sample)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == sample
    assert len(ids) < len(sample.encode()) / 2  # the merges compress this text
    assert tok.decode([tok.bos_id, *tok.encode("ab"), tok.eos_id, tok.pad_id]) == "ab"


def test_tokenizer_is_deterministic_and_learned_from_the_training_text_only(monkeypatch):
    first = tiny_lm.load_tokenizer(320)
    tiny_lm.load_tokenizer.cache_clear()
    try:
        again = tiny_lm.load_tokenizer(320)
        assert again is not first and again.fingerprint() == first.fingerprint()
        # the trainer sees lm_text("train") and nothing else: other text, other merges
        monkeypatch.setattr(text, "lm_text", lambda split: "zzz qqq " * 500)
        assert tiny_lm.load_tokenizer.__wrapped__(320).fingerprint() != first.fingerprint()
    finally:
        monkeypatch.undo()
        tiny_lm.load_tokenizer.cache_clear()


def test_windows_cut_consecutive_tokens_and_spread_evenly():
    ids = torch.arange(10)
    w = tiny_lm.windows(ids, 3)
    assert w.shape == (3, 3) and w[1].tolist() == [3, 4, 5]
    spread = tiny_lm.windows(torch.arange(12), 2, limit=3, spread=True)  # windows 0, 2, 5
    assert spread[:, 0].tolist() == [0, 4, 10]
    assert tiny_lm.windows(ids, 3, limit=2).tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(CompactnnError, match="fewer than one window"):
        tiny_lm.windows(torch.arange(2), 3)


def test_perplexity_matches_a_hand_computed_cross_entropy():
    torch.manual_seed(0)
    model = tiny_lm.make_model(ARCH)
    ids = torch.randint(0, ARCH.vocab_size, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding: targets 7, 8, 9 of row 1 are not scored
    batches = [{"input_ids": ids[:2], "attention_mask": mask[:2]}, {"input_ids": ids[2:]}]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits  # (3, 10, V)
    losses = []
    for row, last in ((0, 10), (1, 7), (2, 10)):
        losses.append(F.cross_entropy(logits[row, : last - 1], ids[row, 1:last], reduction="sum"))
    expected = math.exp(float(sum(losses)) / (9 + 6 + 9))
    assert tiny_lm.perplexity(model, batches) == pytest.approx(expected, rel=1e-5)


def test_perplexity_of_uniform_logits_is_the_vocabulary_size():
    class Uniform(nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return torch.zeros(*input_ids.shape, 264)

    batches = tiny_lm.as_batches(torch.randint(0, 256, (5, 7)), 2)
    assert tiny_lm.perplexity(Uniform(), batches) == pytest.approx(264, rel=1e-6)


def test_reference_trains_once_then_loads_bit_identical_from_the_cache(ref, monkeypatch):
    files = list(cache.cache_dir().glob("tiny-lm-*.safetensors"))
    assert len(files) == 1
    meta = cache.cached_metadata(files[0])
    assert meta["seed"] == "0" and float(meta["eval_perplexity"]) > 1

    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of loading the cache")

    monkeypatch.setattr(tiny_lm, "train_lm", no_training)
    again = tiny_lm.build_tiny_lm(progress=False, arch=ARCH, fit=FIT, **SMALL)
    assert cache.state_equal(ref.model, again.model)
    # another seed or another training budget is another cache entry
    assert tiny_lm._key(ARCH, FIT, 0) != tiny_lm._key(ARCH, FIT, 1)
    assert tiny_lm._key(ARCH, FIT, 0) != tiny_lm._key(ARCH, LMFitConfig(steps=5), 0)


def test_training_is_deterministic_and_learns():
    ids = tiny_lm.split_ids("train", ARCH.vocab_size)[:8000]
    batches = tiny_lm.as_batches(tiny_lm.windows(ids, ARCH.context, 16), 8)
    fit = LMFitConfig(steps=12, batch_size=8, warmup=2, lr=1e-2)
    models = []
    for _ in range(2):
        torch.manual_seed(3)
        model = tiny_lm.make_model(ARCH)
        before = tiny_lm.perplexity(model, batches)
        tiny_lm.train_lm(model, ids, ARCH.context, fit, seed=5, progress=False)
        models.append(model)
    assert cache.state_equal(*models)
    assert tiny_lm.perplexity(models[0], batches) < 0.5 * before  # ~320 (random) to far below


def test_reference_fields_and_calibration_from_training_text(ref):
    assert ref.name == "tiny-lm" and ref.metric == "perplexity" and ref.kind == "transformer"
    assert len(ref.calib) == 2
    train = tiny_lm.split_ids("train", ARCH.vocab_size)
    starts = torch.linspace(0, len(train) // ARCH.context - 1, 8).round().long() * ARCH.context
    rows = torch.cat([b["input_ids"] for b in ref.calib])
    for batch in ref.calib:
        assert set(batch) == {"input_ids", "attention_mask"}
        assert batch["input_ids"].shape == (4, ARCH.context)
    for row, start in zip(rows, starts.tolist(), strict=True):  # windows of the training text
        assert torch.equal(row, train[start : start + ARCH.context])
    assert ref.evaluate(ref.model) == pytest.approx(
        tiny_lm.perplexity(ref.model, tiny_lm.eval_batches(ARCH, 16)), rel=1e-9
    )
    assert isinstance(ref.skeleton(), type(ref.model))


def test_registered_under_its_name(ref, monkeypatch):
    from compactnn.model_io import reference_names

    assert "tiny-lm" in REFERENCES and "tiny-lm" in reference_names()
    monkeypatch.setattr(
        tiny_lm,
        "build_tiny_lm",
        functools.partial(tiny_lm.build_tiny_lm, arch=ARCH, fit=FIT, **SMALL),
    )
    loaded = load_reference("tiny-lm", progress=False)
    assert cache.state_equal(loaded.model, ref.model)


def test_group_quantized_copy_scores_close_to_float_and_round_trips(ref, tmp_path):
    q = compactnn.compress(ref.model, "w8-g32", calib_data=ref.calib, progress=False)
    base, quant = ref.evaluate(ref.model), ref.evaluate(q)
    assert abs(quant / base - 1) < 0.01
    compactnn.save(q, tmp_path / "a")
    back = compactnn.load(tmp_path / "a")
    batch = ref.calib[0]
    with torch.no_grad():
        assert torch.equal(q(**batch).logits, back(**batch).logits)
