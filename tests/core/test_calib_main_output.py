"""main_output: the tensor scored and compared in a model's output (issue: a plain dict whose
first key is not the logits was scored on that first value)."""

from __future__ import annotations

import torch

from compactnn.core.calib import main_output


def test_a_plain_dict_is_scored_on_its_logits_key_whatever_its_order():
    feat, logits = torch.zeros(2, 32), torch.ones(2, 10)
    assert main_output({"feat": feat, "logits": logits}) is logits
    assert main_output({"feat": feat, "last_hidden_state": logits}) is logits


def test_a_dict_without_known_keys_still_gives_its_first_value():
    a, b = torch.zeros(1), torch.ones(1)
    assert main_output({"a": a, "b": b}) is a
    assert main_output((a, b)) is a
