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


def test_layer_gap_in_codes_of_the_layer_grid():
    from compactnn.lowering.verify import layer_gap

    ref = torch.tensor([[-0.3, 0.0, 0.26, 1.0]])
    # codes by hand on the grid (scale 0.1, zero 3): clamp(round(x / 0.1) + 3, 0, 255)
    assert (
        layer_gap("c", ref, torch.tensor([[0, 3, 6, 13]], dtype=torch.uint8), (0.1, 3)).steps == 0
    )
    gap = layer_gap("c", ref, torch.tensor([[0, 3, 6, 9]], dtype=torch.uint8), (0.1, 3))
    assert (gap.steps, gap.step, gap.form) == (4.0, 0.1, "uint8")


def test_layer_gap_in_steps_of_the_float_range_and_non_finite():
    from compactnn.lowering.verify import layer_gap

    ref = torch.linspace(-1.0, 1.55, 256)  # range 2.55: step 0.01
    got = ref.clone()
    got[7] += 0.05
    assert layer_gap("f", ref, got, None).steps == pytest.approx(5.0, rel=1e-4)
    got[9] = NAN
    assert layer_gap("f", ref, got, None).steps == INF


def test_failed_verification_lists_worst_layers_and_the_first_past_tolerance():
    from compactnn.lowering.verify import LayerGap, Verification, with_layers

    gaps = [
        LayerGap("conv1", 0.0, 0.1, "uint8", 0),
        LayerGap("conv2", 3.0, 0.1, "uint8", 1),  # first beyond 2 steps: the likely cause
        LayerGap("conv3", 40.0, 0.1, "uint8", 2),
        LayerGap("fc", 12.5, 0.02, "float", 3),
    ]
    result = with_layers(Verification("deploy[x]", 12.5, 0.25, 0.02, None, 2.0, 4), gaps)
    assert [g.name for g in result.layers] == ["conv3", "fc", "conv2", "conv1"]
    assert result.first_past_tolerance == "conv2"
    text = str(result)
    assert "worst layers: conv3 40 steps (uint8), fc 12.5 steps (float)" in text
    with pytest.raises(CompactnnError, match=r"likely 'conv2', the first layer past"):
        enforce(result)
    passing = with_layers(Verification("x", 0.5, 0.01, 0.02, None, 2.0, 4), gaps[:1])
    assert passing.first_past_tolerance == "" and enforce(passing) is passing


class _Amplifier(nn.Module):
    """Rounds its input to a fine grid, then multiplies by a large gain: a nudge that crosses
    a rounding boundary moves the output by whole codes, as a chaotic deep network does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * 64) * 40 + x


def test_amplified_gap_is_named_as_the_networks_and_a_tolerance_suggested():
    from compactnn.lowering.probes import sensitivity
    from compactnn.lowering.verify import _above

    amp = _Amplifier()
    x = torch.tensor([[0.5 / 64 - 1e-9, 0.1, -0.2, 0.3]] * 4)  # the first value on a boundary
    x = x + torch.linspace(0, 0.01, 4)[:, None]
    nudged = x.clone()
    nudged[:, 0] *= 1 + 2e-6  # one input value crosses its rounding boundary

    def candidate(_):
        return amp(nudged)

    result = compare(amp, candidate, x, "deploy[test]", tolerance=2.0)
    assert not result.passed
    from dataclasses import replace

    result = replace(result, sensitivity=sensitivity(amp, x))
    assert result.amplified and result.sensitivity > 2
    with pytest.raises(CompactnnError, match="amplifies one-code rounding") as err:
        enforce(result)
    t = _above(result.max_diff_steps)
    assert f"tolerance={t:g} (--tolerance {t:g} on the command line)" in str(err.value)
    assert _above(13.3) == 20.0 and _above(1.0) == 4.0 and _above(300) == 451.0
    # a smooth model with one wrong output value: the usual message, not the network's
    bad = compare(_ref(), _injected(_ref(), 50.0), _example(), "deploy[test]", tolerance=2.0)
    bad = replace(bad, sensitivity=sensitivity(_ref(), _example()))
    assert not bad.amplified
    with pytest.raises(CompactnnError, match="does not reproduce") as err:
        enforce(bad)
    assert "Raise tolerance= (--tolerance)" in str(err.value) and "--ignore NAME" in str(err.value)


class TwoInputs(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a - 2 * b


def test_candidate_takes_a_tuple_example_as_positional_arguments():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    result = compare(TwoInputs(), lambda a, b: a - 2 * b, (a, b), "two inputs")
    assert result.passed and result.max_diff_steps == 0.0
    keywords = compare(TwoInputs(), lambda *, a, b: a - 2 * b, {"a": a, "b": b}, "dict")
    assert keywords.passed


def test_unlocalised_failure_points_to_the_backend_that_localises_and_bias_steps_are_named():
    from dataclasses import replace

    from compactnn.lowering.verify import Verification

    failed = Verification("deploy[onnxruntime]", 9.0, 0.9, 0.1, None, 2.0, 4)
    with pytest.raises(CompactnnError, match=r"not localised: .*backend='onednn'"):
        enforce(failed)
    passed = replace(failed, max_diff_steps=0.0, bias_rounding_steps=5.25)
    assert enforce(passed) is passed
    assert "int32 biases (as integer kernels add them) move the output 5.25 steps" in str(passed)


class _TwoHeads(nn.Module):
    """Two outputs of the same shape with different values, keys not in sorted order."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.zeta, self.alpha = nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"zeta": self.zeta(x), "alpha": 3 * self.alpha(x)}


def test_dict_outputs_pair_by_key_or_in_the_graph_order():
    """An ONNX Runtime session returns a dict model's outputs as a tuple in the dict's own
    order (the graph's); sorting the keys paired zeta with alpha (956 steps on a w8a8 net)."""
    ref, x = _TwoHeads().eval(), _example()
    with torch.no_grad():
        out = ref(x)
    assert (out["zeta"] - out["alpha"]).abs().max() > 0.1  # pairing them wrong would show
    as_graph = compare(ref, lambda x: (out["zeta"], out["alpha"]), x, "ort")
    assert as_graph.max_diff_steps == 0.0 and as_graph.passed
    reordered = compare(ref, lambda x: {"alpha": out["alpha"], "zeta": out["zeta"]}, x, "dict")
    assert reordered.max_diff_steps == 0.0
    off = out["alpha"] + 0.01  # a real gap in one head is measured in that head's steps
    step = float(out["alpha"].max() - out["alpha"].min()) / 255
    moved = compare(ref, lambda x: (out["zeta"], off), x, "ort")
    assert moved.max_diff_steps == pytest.approx(0.01 / step, rel=1e-3)
    with pytest.raises(CompactnnError, match=r"outputs are named \['alpha', 'beta'\]"):
        compare(ref, lambda x: {"alpha": out["alpha"], "beta": out["zeta"]}, x, "dict")
