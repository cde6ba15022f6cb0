"""Calibration batches whose attention_mask unmasks no token: refused, or warned about."""

import warnings

import pytest
import torch
from torch import nn

import compactnn
from compactnn.core.calib import as_batches
from compactnn.errors import CompactnnError


def _batch(seed: int, masked_out: bool = False) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 50, (4, 6), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1:, 4:] = 0  # padded rows
    return {"input_ids": ids, "attention_mask": torch.zeros_like(ids) if masked_out else mask}


class MaskedMean(nn.Module):
    """Token table -> Linear, mean-pooled over the unmasked tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 16)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.fc(self.tok(input_ids)) * attention_mask[..., None]
        return h.sum(1) / attention_mask.sum(1, keepdim=True).clamp(min=1)


def test_every_mask_all_zero_is_refused_naming_the_batches():
    data = [_batch(0, masked_out=True), _batch(1, masked_out=True)]
    with pytest.raises(CompactnnError) as err:
        as_batches(data)
    msg = str(err.value)
    assert msg.startswith("calibration batches 0, 1 (all 2): every attention_mask entry is 0")
    assert "no token is unmasked" in msg and "\n" not in msg
    with pytest.raises(CompactnnError, match=r"^calibration batch 0: every attention_mask"):
        as_batches({**_batch(2), "attention_mask": torch.zeros(4, 6, dtype=torch.bool)})


def test_compress_refuses_a_fully_masked_calibration_set():
    torch.manual_seed(0)
    with pytest.raises(CompactnnError, match="no token is unmasked"):
        compactnn.compress(MaskedMean().eval(), "w8a8", calib_data=[_batch(0, masked_out=True)])


def test_some_fully_masked_batches_are_named_in_a_warning():
    data = [_batch(0), _batch(1, masked_out=True), _batch(2)]
    with pytest.warns(UserWarning) as caught:
        batches = as_batches(data)
    assert len(batches) == 3
    (msg,) = [str(w.message) for w in caught if "attention_mask" in str(w.message)]
    assert msg.startswith("calibration batch 1 (of 3): every attention_mask entry is 0")
    assert "drop it or pass the tokenizer's attention_mask" in msg


def test_real_masks_and_other_masks_pass_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(as_batches([_batch(0), _batch(1)])) == 2
        additive = torch.zeros(4, 1, 6, 6)  # a 4-D additive mask: 0 means attend
        as_batches([{"input_ids": _batch(0)["input_ids"], "attention_mask": additive}])
        as_batches(torch.zeros(8, 3))  # no mask at all
