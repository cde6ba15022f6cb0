"""Sub-bit training: a run resumed from a mid-epoch checkpoint is the same run."""

from __future__ import annotations

import torch

from compactnn.quant.subbit import SubbitConfig, SubbitWeight
from compactnn.recipe import Recipe, Step
from tests._resume import assert_resume_is_exact


def test_a_resumed_run_keeps_the_codebook_of_the_epoch_it_stopped_in():
    w = -torch.ones(2, 1, 3, 3)  # both kernels all -1: the first pattern of the codebook
    wq = SubbitWeight(w, 4)
    wq.start_epoch(w, 0, 3)
    first = wq.patterns.clone()
    moved = torch.ones(2, 1, 3, 3)  # the weights moved within epoch 0 (all +1 now)
    wq.start_epoch(moved, 0, 3)  # resumed in epoch 0: the codebook of its start stands
    assert torch.equal(wq.patterns, first) and wq.patterns[0].tolist() == [-1.0] * 9
    wq.start_epoch(moved, 1, 3)  # the next epoch re-selects from the current kernels
    assert wq.patterns[0].tolist() == [1.0] * 9
    state = wq.state_dict()
    assert int(state["started"]) == 1
    del state["started"]  # a checkpoint of an older compactnn: loads, nothing started
    again = SubbitWeight(w, 4)
    again.load_state_dict(state)
    assert int(again.started) == -1 and torch.equal(again.patterns, wq.patterns)


def test_resuming_mid_epoch_gives_the_uninterrupted_logits_bit_exactly(tmp_path):
    cfg = SubbitConfig(epochs=3, batch_size=16, lr=0.05, tau=4)
    recipe = Recipe("w1a8-subbit", (Step("subbit", cfg),))  # 4 steps per epoch

    assert_resume_is_exact(recipe, (2, 5, 7, 10), tmp_path)  # mid epoch 0, 1 (twice) and 2
