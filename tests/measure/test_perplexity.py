"""Next-token perplexity (``measure/perplexity.py``) against cross-entropy computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compactnn.errors import CompactnnError
from compactnn.measure.perplexity import is_causal_lm, next_token_nll, perplexity
from compactnn.models.tiny_hf import tiny_model


def _hand_perplexity(model: nn.Module, ids: torch.Tensor, real: list[range]) -> float:
    """exp(mean cross-entropy of logits[t] vs ids[t + 1]) over the targets t + 1 of each
    row for which both t and t + 1 are in that row's ``real`` positions; one row at a time."""
    losses, count = [], 0
    for row, keep in zip(ids, real, strict=True):
        with torch.no_grad():
            logits = model(input_ids=row[None, keep.start : keep.stop]).logits[0]  # (T', V)
        targets = row[keep.start + 1 : keep.stop]
        losses.append(F.cross_entropy(logits[:-1], targets, reduction="sum"))
        count += len(targets)
    return math.exp(float(sum(losses)) / count)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_perplexity_matches_cross_entropy_by_hand_with_padding_left_out(arch):
    torch.set_num_threads(1)
    model, _ = tiny_model(arch, seed=3)
    ids = torch.randint(4, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding: targets 8..11 of row 1 are not scored
    padded = ids.clone()
    padded[1, 8:] = 0  # what a tokenizer pads with: must not matter
    batches = [{"input_ids": padded[:2], "attention_mask": mask[:2]}, ids[2:]]  # dict, tensor
    real = [range(0, 12), range(0, 8), range(0, 12), range(0, 12)]
    expected = _hand_perplexity(model, ids, real)
    assert perplexity(model, batches) == pytest.approx(expected, rel=1e-4)
    # every token scored (no mask): another, larger set of targets
    full = _hand_perplexity(model, ids, [range(0, 12)] * 4)
    assert perplexity(model, [ids]) == pytest.approx(full, rel=1e-4)
    assert full != pytest.approx(expected, rel=1e-4)


def test_next_token_nll_leaves_out_targets_predicted_from_left_padding():
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 6]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    total, count = next_token_nll(logits, ids, mask)
    # row 0: only targets 3 and 4 (predicted from real positions 2 and 3); row 1: all 4
    want = F.cross_entropy(logits[0, 2:4], ids[0, 3:5], reduction="sum")
    want = want + F.cross_entropy(logits[1, :4], ids[1, 1:], reduction="sum")
    assert int(count) == 6
    assert float(total) == pytest.approx(float(want), rel=1e-6)


def test_perplexity_keeps_the_train_mode_and_refuses_what_is_not_a_causal_lm():
    model, _ = tiny_model("llama")
    model.train()
    perplexity(model, [torch.randint(4, 128, (2, 5))])
    assert model.training
    with pytest.raises(CompactnnError, match="at least one predicted token"):
        perplexity(model, [torch.randint(4, 128, (2, 1))])
    with pytest.raises(CompactnnError, match="token ids"):
        perplexity(model, [torch.randn(2, 5)])
    with pytest.raises(CompactnnError, match=r"logits of shape \(B, T, vocab\)"):
        perplexity(nn.Flatten(0), [torch.randint(0, 5, (2, 5))])  # (10,): not (B, T, V)
    bert, _ = tiny_model("bert")  # last hidden states, not logits over tokens
    assert is_causal_lm(tiny_model("gpt2")[0]) and is_causal_lm(model)
    assert not is_causal_lm(bert) and not is_causal_lm(nn.Linear(2, 2))
