"""Binary augmented pruning: a run resumed from a mid-epoch checkpoint is the same run."""

from __future__ import annotations

import torch

from compactnn.quant.bap import BAPConfig, BAPWeight
from compactnn.recipe import Recipe, Step
from tests._resume import assert_resume_is_exact


def test_a_resumed_run_keeps_the_support_of_the_epoch_it_stopped_in():
    w = torch.tensor([[1.0, 0.1, 0.5, 0.4]])
    wq = BAPWeight(w, BAPConfig(density=0.25, reselect_fraction=0.5))
    wq.start_epoch(w, 0, 4)
    moved = torch.tensor([[0.5, 0.1, 0.5, 3.0]])  # the weights moved within epoch 0
    wq.start_epoch(moved, 0, 4)  # resumed in epoch 0: the support of its start stands
    assert torch.equal(wq.mask, torch.tensor([[True, False, False, False]]))
    wq.start_epoch(moved, 1, 4)  # the next epoch re-selects (1 < ceil(0.5 * 4))
    assert torch.equal(wq.mask, torch.tensor([[False, False, False, True]]))
    state = wq.state_dict()
    assert int(state["started"]) == 1
    del state["started"]  # a checkpoint of an older compactnn: loads, nothing started
    again = BAPWeight(w, BAPConfig(density=0.25))
    again.load_state_dict(state)
    assert int(again.started) == -1 and torch.equal(again.mask, wq.mask)


def test_resuming_mid_epoch_gives_the_uninterrupted_logits_bit_exactly(tmp_path):
    cfg = BAPConfig(epochs=3, batch_size=16, lr=0.05, density=0.05)
    recipe = Recipe("bap", (Step("bap", cfg),))  # 4 steps per epoch, support re-selected twice

    # mid epoch 0, 1 (both re-select the support) and 2
    assert_resume_is_exact(recipe, (2, 5, 8), tmp_path)
