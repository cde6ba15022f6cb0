"""Probe Pruning on padded batches: a sentence gets the same channels padded or alone."""

import pytest
import torch

import compactnn
from compactnn.models.tiny_hf import tiny_model
from compactnn.prune.probe import (
    ProbeMLP,
    ProbePruneConfig,
    n_positions,
    probe_pays,
    stride_positions,
)
from compactnn.prune.probe_mask import sample_probes
from compactnn.recipe import Recipe, Step

LENGTHS = (24, 17, 9, 3)  # 3 tokens: too short to probe alone (the static rule)


def _padded(left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(4, 128, (len(LENGTHS), max(LENGTHS)), generator=gen)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(LENGTHS):
        if left:
            mask[i, ids.shape[1] - n :] = 1
        else:
            mask[i, :n] = 1
    return ids * mask, mask


def _real(row: torch.Tensor, mask_row: torch.Tensor) -> torch.Tensor:
    return row[mask_row.bool()]


def _kept(model) -> list[torch.Tensor]:
    return [m.last_kept.clone() for m in model.modules() if isinstance(m, ProbeMLP)]


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.mark.parametrize(
    "config,left",
    [
        (ProbePruneConfig(), False),  # pp30: stride probe per sample
        (ProbePruneConfig(), True),  # left padding: positions are ranks among real tokens
        (ProbePruneConfig(select="residual"), False),
        (ProbePruneConfig(mode="static", score="wanda"), False),
    ],
)
def test_padded_sentence_matches_it_alone(llama, config, left):
    model, calib = llama
    pruned = compactnn.compress(model, Recipe("x", (Step("probe", config),)), calib_data=calib)
    ids, mask = _padded(left)
    with torch.no_grad():
        full = pruned(input_ids=ids, attention_mask=mask).logits
        kept = _kept(pruned)
        for i in range(len(LENGTHS)):
            alone = pruned(input_ids=_real(ids[i], mask[i])[None]).logits[0]
            ref = _real(full[i], mask[i])
            rel = float((alone - ref).abs().max() / ref.abs().max())
            assert rel < 1e-5, (i, rel)  # before the fix: 4-7 % (the probe read padding)
            for layer, alone_kept in zip(kept, _kept(pruned), strict=True):
                assert torch.equal(layer[i], alone_kept.reshape(-1))


def test_batch_mode_ignores_what_the_padding_holds(llama):
    model, calib = llama
    config = ProbePruneConfig(mode="batch", samples=0.5, tokens=0.5)
    pruned = compactnn.compress(model, Recipe("x", (Step("probe", config),)), calib_data=calib)
    ids, mask = _padded()
    other = torch.where(mask.bool(), ids, torch.full_like(ids, 99))  # other padding tokens
    with torch.no_grad():
        a = pruned(input_ids=ids, attention_mask=mask).logits
        kept = _kept(pruned)
        b = pruned(input_ids=other, attention_mask=mask).logits
    assert all(k.dim() == 1 for k in kept)  # batch-wise by design: one set per batch
    assert all(torch.equal(x, y) for x, y in zip(kept, _kept(pruned), strict=True))
    m = mask.bool()
    torch.testing.assert_close(a[m], b[m], rtol=1e-5, atol=1e-5)


def test_sample_probes_by_hand():
    cfg = ProbePruneConfig(tokens=0.3)
    valid = torch.tensor([[False] + [True] * 7, [True] * 3 + [False] * 5])
    norms = torch.arange(16.0).reshape(2, 8)

    def pick(row, n):
        return stride_positions(row.shape[1], n)

    pos, slots, probed = sample_probes(norms, valid, cfg, probe_pays, n_positions, pick)
    # sample 0: 7 real tokens (1..7), 3 probe positions evenly over them (cost 2*3/(3*7) <= 0.3);
    # sample 1: 3 tokens, whose probe of 2 would cost more than it skips: the static rule
    assert probed.tolist() == [True, False]
    assert pos[0].tolist() == [1, 4, 7] and slots.tolist() == [[True] * 3, [False] * 3]
