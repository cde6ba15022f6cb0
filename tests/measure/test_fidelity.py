"""Output fidelity and batch slicing, against hand-computed values."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from compactnn.measure.fidelity import (
    CollapseWarning,
    collapse_note,
    exact_cosine,
    first_rows,
    fmt_quality,
    output_fidelity,
)


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


def test_cosine_is_exact_at_any_scale_and_defined_for_zero_rows():
    """F.cosine_similarity clamps each norm at 1e-8: a model whose outputs are ~1e-10 scored
    0.0046 against itself (eval's float row)."""
    x = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    for scale in (1e-30, 1e-10, 1.0, 1e30):
        assert exact_cosine(x * scale, x * scale).tolist() == pytest.approx([1.0] * 6, abs=1e-12)
        assert exact_cosine(x * scale, -x).tolist() == pytest.approx([-1.0] * 6, abs=1e-12)
    fid = output_fidelity(nn.Identity(), nn.Identity(), [x * 1e-10])
    assert fid["cosine"] == pytest.approx(1.0, abs=1e-12) and fid["sqnr_db"] == float("inf")
    zero, one = torch.zeros(1, 3), torch.tensor([[0.0, 2e-12, 0.0]])
    assert exact_cosine(zero, zero).item() == 1.0  # two zero outputs are the same output
    assert exact_cosine(zero, one).item() == exact_cosine(one, zero).item() == 0.0
    # orthogonal and 45 degrees, hand-computed
    a, b = torch.tensor([[1e-12, 0.0], [1e-12, 0.0]]), torch.tensor([[0.0, 3.0], [5.0, 5.0]])
    assert exact_cosine(a, b).tolist() == pytest.approx([0.0, 2**-0.5], abs=1e-12)


class _Constant(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def test_a_quantized_output_constant_over_the_samples_is_warned_about():
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1)) * 1e-10
    with pytest.warns(CollapseWarning, match=r"the same for all 8 samples while the float"):
        output_fidelity(nn.Identity(), _Constant(), [x, x * 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollapseWarning)
        output_fidelity(nn.Identity(), nn.Identity(), [x, x * 2])  # varies: no warning
        output_fidelity(_Constant(), _Constant(), [x])  # the float one is constant too
    note = collapse_note(x, torch.zeros_like(x), step=1.0)
    assert "far smaller than one step of the output scale (1)" in note
    assert "weights or activations" in collapse_note(x, torch.zeros_like(x), step=1e-13)
    assert collapse_note(x[:1], torch.zeros(1, 3)) is None  # one sample: nothing to compare
