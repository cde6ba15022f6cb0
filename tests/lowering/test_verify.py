"""Verification of an integer model against the simulation, in steps of the output scale;
NaN/Inf mismatches always fail (issue 11)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compactnn.errors import CompactnnError
from compactnn.lowering.verify import compare, enforce, nonfinite_mismatch

NAN, INF = float("nan"), float("inf")


def _ref() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 10)).eval()


def _example() -> torch.Tensor:
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(1))


def _injected(model: nn.Module, value: float, at=(1, 3)):
    def candidate(x: torch.Tensor) -> torch.Tensor:
        out = model(x).clone()
        out[at] = value
        return out

    return candidate


def test_mask_against_hand_enumerated_cases():
    ref = torch.tensor([1.0, NAN, INF, -INF, NAN, 2.0, INF, 3.0])
    got = torch.tensor([1.5, NAN, INF, -INF, INF, NAN, -INF, 3.0])
    expected = [False, False, False, False, True, True, True, False]
    assert nonfinite_mismatch(ref, got).tolist() == expected


@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_injected_non_finite_output_fails_with_an_explicit_message(value):
    model = _ref()
    result = compare(model, _injected(model, value), _example(), "deploy[test]", tolerance=1e9)
    assert not result.passed  # whatever the tolerance
    assert result.nonfinite_mismatches == 1 and result.max_diff_steps == INF
    with pytest.raises(CompactnnError, match=r"1 output value\(s\) are NaN/Inf .*index \(1, 3\)"):
        enforce(result)


def test_finite_outputs_still_measured_in_steps():
    model = _ref()
    result = compare(model, _injected(model, 0.0), _example(), "x")
    with torch.no_grad():
        ref = model(_example())
    step = float(ref.max() - ref.min()) / 255
    assert result.nonfinite_mismatches == 0
    assert result.max_diff_steps == pytest.approx(abs(float(ref[1, 3])) / step, rel=1e-5)


class Exp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x)


def test_same_non_finite_on_both_sides_is_agreement():
    model = nn.Sequential(nn.Linear(8, 10), Exp()).eval()
    with torch.no_grad():
        model[0].bias[2] = 1e3  # exp overflows: column 2 is +inf in both runs
        assert torch.isinf(model(_example())[:, 2]).all()
    result = compare(model, model, _example(), "same")
    assert result.passed and result.nonfinite_mismatches == 0


def test_verification_measures_steps_of_the_output_scale():
    model = nn.Linear(4, 3)
    x = torch.randn(10, 4)
    with torch.no_grad():
        ref = model(x)
    step = (ref.max() - ref.min()).item() / 255
    result = compare(model, lambda b: model(b) + 2.5 * step, x, "shifted")
    assert result.max_diff_steps == pytest.approx(2.5, rel=1e-3)
    assert not result.passed and result.top1_agreement == 1.0
