"""Calibration token ids longer than a model's position table are refused for rotary models
too (Llama runs on them, at positions it was never trained at), as for GPT-2's learned ones."""

from __future__ import annotations

import pytest
import torch

import compactnn
from compactnn.core.tokens import check_positions
from compactnn.errors import CompactnnError

pytest.importorskip("transformers")
from compactnn.models.tiny_hf import tiny_model

torch.set_num_threads(1)


def _ids(length: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 128, (2, length), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sequences_past_the_position_table_are_refused(arch):
    model, _ = tiny_model(arch)  # 64 positions
    key = "n_positions" if arch == "gpt2" else "max_position_embeddings"
    if arch == "llama":
        with torch.no_grad():  # the premise: a rotary model runs past its table, silently
            assert model(**_ids(150)).logits.shape == (2, 150, 128)
    with pytest.raises(CompactnnError) as info:
        compactnn.compress(model, "w8a8", calib_data=[_ids(150)], progress=False)
    assert str(info.value) == (
        f"calib_data holds sequences of 150 tokens and the model takes at most 64 "
        f"({key} in its config.json): cut each sequence to 64 tokens or fewer "
        "(e.g. ids[:, :64], or windows of 64)."
    )


def test_sequences_up_to_the_limit_and_other_inputs_pass():
    model, _ = tiny_model("llama")
    q = compactnn.compress(model, "w8a8", calib_data=[_ids(64)], progress=False)
    assert q is not model
    check_positions(model, torch.randn(2, 300))  # float inputs: not token ids
    check_positions(torch.nn.Linear(300, 2), torch.zeros(2, 300, dtype=torch.long))  # no config


def test_a_file_named_by_the_command_line_is_named_with_its_fix():
    model, _ = tiny_model("llama")
    with pytest.raises(CompactnnError) as info:
        check_positions(model, [_ids(100)], "--data ids.npy", resave=True)
    assert str(info.value).startswith("--data ids.npy holds sequences of 100 tokens")
    assert str(info.value).endswith("(e.g. ids[:, :64], or windows of 64) and save the file again.")
