"""Output fidelity and batch slicing, against hand-computed values."""

from __future__ import annotations

import torch
from torch import nn

from compactnn.measure.fidelity import first_rows, fmt_quality, output_fidelity


def test_first_rows_trims_padding_of_tokenized_batches():
    batch = {
        "input_ids": torch.tensor([[5, 6, 0, 0, 0], [7, 8, 9, 0, 0], [1, 2, 3, 4, 5]]),
        "attention_mask": torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
    }
    two = first_rows(batch, 2)
    assert two["input_ids"].tolist() == [[5, 6, 0], [7, 8, 9]]
    assert two["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert torch.equal(first_rows(torch.arange(10), 3), torch.arange(3))


def test_output_fidelity_against_hand_computed_values():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    ident = nn.Identity()
    scaled = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        scaled.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.5]]))  # halves column 2
    fid = output_fidelity(ident, scaled, [x])
    # row 1 unchanged (cos 1); row 2 scaled (cos 1); noise = (2 - 1)^2, signal = 1 + 4
    assert abs(fid["cosine"] - 1.0) < 1e-6
    assert abs(fid["sqnr_db"] - 10 * torch.log10(torch.tensor(5.0)).item()) < 1e-4


def test_fmt_quality_units_and_missing_values():
    assert fmt_quality("top1", 98.1) == "98.10%"
    assert fmt_quality("top1", -0.5, delta=True) == "-0.50 pt"
    assert fmt_quality("cosine", 0.99814) == "0.9981"
    assert fmt_quality("cosine", None) == "n/a"
    assert fmt_quality("cosine", float("nan")) == "n/a"
