"""PE-wise pruning: exact resume from a mid-epoch checkpoint; which epochs ``keep_best`` may
keep (only those at the final sparsity)."""

from __future__ import annotations

import pytest
import torch

import compactnn
from compactnn.prune.pewise import PEWiseConfig, PEWiseWeight, group_norms
from compactnn.quant.base import short_weight_spec
from compactnn.recipe import Recipe, Step
from tests._resume import assert_resume_is_exact


def test_a_resumed_epoch_keeps_its_mask_and_sets_its_phase():
    torch.manual_seed(0)
    w = torch.randn(4, 8)
    cfg = PEWiseConfig(group=(1, 4), sparsity=0.5, schedule="sequential", ramp_share=1 / 3)
    q = PEWiseWeight(w, short_weight_spec(2), cfg)
    q.start_epoch(w, 0, 6)  # 4 of 8 tiles pruned, by the norms of w
    mask = q.mask.clone()
    moved = torch.flip(w, (0,))  # the weights moved within epoch 0: other tiles are small
    q.float_phase = False  # a fresh process: the flags are not in the checkpoint
    q.start_epoch(moved, 0, 6)
    assert torch.equal(q.mask, mask) and q.float_phase
    again = PEWiseWeight(w, short_weight_spec(2), cfg)
    again.start_epoch(moved, 0, 6)  # what re-ranking the moved weights would have given
    assert not torch.equal(again.mask, mask)
    state = q.state_dict()
    assert int(state["started"]) == 0
    del state["started"]  # a checkpoint of an older compactnn loads (nothing started)
    again.load_state_dict(state)
    assert int(again.started) == -1


@pytest.mark.parametrize("recipe", ["w2a8-pe50", "w2a8-pe50-seq"])
def test_resuming_mid_epoch_gives_the_uninterrupted_logits_bit_exactly(tmp_path, recipe):
    step = compactnn.resolve_recipe(recipe).steps[0]
    # 4 steps per epoch, the masks grow over 2; the penalty shrinks kept tiles within an
    # epoch, so re-ranking the tiles on resuming would prune others
    kw = {"epochs": 3, "batch_size": 16, "lr": 0.05, "wpc": 0.9}
    recipe = Recipe(recipe, (Step("pe", PEWiseConfig(**{**step.config.__dict__, **kw})),))

    # mid epoch 0 (the masks start) and 1 (they grow)
    assert_resume_is_exact(recipe, (2, 6), tmp_path)


def test_only_epochs_at_the_final_sparsity_are_eligible_for_keep_best():
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    cfg = PEWiseConfig(group=(1, 8), sparsity=0.5)  # 4 epochs: a ramp of 3 (2/3 of them)
    q = PEWiseWeight(w, short_weight_spec(2), cfg)
    eligible, pruned = [], []
    for epoch in range(4):
        q.start_epoch(w, epoch, 4)
        eligible.append(q.keep_eligible())
        pruned.append(int((group_norms(q.mask, (1, 8)) == 0).sum()))
    # sparsity 0.5 (1 - (1 - t)^3) for t = 1/3, 2/3, 1, 1: 5.6, 7.7, 8, 8 of 16 tiles
    assert pruned == [6, 8, 8, 8]
    assert eligible == [False, True, True, True]  # epoch 1 already prunes round(7.7) = 8
    # the default (compress: the one-shot mask at the final sparsity) is eligible
    assert PEWiseWeight(w, short_weight_spec(2), cfg).keep_eligible()
