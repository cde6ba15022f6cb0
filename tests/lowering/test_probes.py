"""The simulated model's movement from itself under rounding-size probes, and a failed
check explained by them (:mod:`compactnn.lowering.probes`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compactnn.errors import CompactnnError
from compactnn.lowering.verify import compare, enforce
from tests.lowering._amplifying import deep_bn_net


def _ref() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 10)).eval()


def _example() -> torch.Tensor:
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(1))


def test_sensitivity_of_a_linear_model_equals_the_hand_computed_shift():
    from compactnn.lowering.probes import _nudged, probes, sensitivity
    from compactnn.lowering.verify import NUDGE

    ref, x = _ref(), _example()
    with torch.no_grad():
        y = ref(x)
        wx = y - ref[0].bias  # W x: the part a scaled input scales
    step = float(y.max() - y.min()) / 255
    want = float((wx * NUDGE).abs().max()) / step
    found = probes(ref, x)
    assert found["input scale"][0] == pytest.approx(want, rel=0.05)
    assert "float rounding" not in found  # no activation quantizer to nudge
    assert sensitivity(ref, x) == max(v[0] for v in found.values())
    assert sensitivity(ref, torch.randint(0, 5, (4, 8))) is None  # no float input to nudge
    ids = torch.ones(2, dtype=torch.long)
    nested = _nudged({"a": (x,), "ids": ids}, 0.5)  # float tensors scaled, the rest kept
    assert torch.equal(nested["a"][0], x * 1.5) and nested["ids"] is ids


@pytest.fixture(scope="module")
def deep_bn():
    return deep_bn_net()


def _quantizers(model: nn.Module) -> list[nn.Module]:
    from compactnn.core.qlayers import ActQuantizer

    return [m for m in model.modules() if isinstance(m, ActQuantizer)]


def _run_with_rounding(model: nn.Module, x: torch.Tensor, ulps: int, seed: int) -> torch.Tensor:
    """``model(x)`` with each activation quantizer's input times ``1 +- ulps * eps`` (signs
    from ``seed``): a float summation order other than the simulation's."""
    gen = torch.Generator().manual_seed(seed)

    def hook(_m, args):
        sign = torch.randint(0, 2, args[0].shape, generator=gen) * 2 - 1
        return (args[0] * (1 + sign * ulps * torch.finfo(torch.float32).eps),)

    handles = [q.register_forward_pre_hook(hook) for q in _quantizers(model)]
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for h in handles:
            h.remove()


def test_float_rounding_probe_sees_the_amplification_the_input_scale_misses(deep_bn):
    """The tester's torchvision CNNs (digits at 64x64) moved 0 steps under the input-scale
    probe and 11-16 steps in deployment: few distinct input values sit far from every input
    code boundary, so only rounding *inside* the network shows the amplification."""
    from compactnn.lowering.probes import probes, sensitivity
    from compactnn.lowering.verify import DEFAULT_TOLERANCE

    q, x = deep_bn
    aq = _quantizers(q)[0]  # the input's grid: no input code flips under either nudge
    codes = (x / aq.scale).round()
    assert torch.equal(codes, (x * (1 + 1e-6) / aq.scale).round())
    found = probes(q, x)
    assert found["input scale"][0] == 0.0 and found["input nudge"][0] == 0.0
    steps, agreement = found["float rounding"]
    assert steps > DEFAULT_TOLERANCE and 0.0 < agreement <= 1.0
    assert sensitivity(q, x) == steps  # seeded: the same numbers every call
    # an independent rounding perturbation (own hooks, own seed) moves it too
    with torch.no_grad():
        y = q(x)
    step = float(y.max() - y.min()) / 255
    assert float((_run_with_rounding(q, x, 4, 7) - y).abs().max()) / step > DEFAULT_TOLERANCE


def test_gap_within_the_simulations_rounding_variation_is_named_and_still_refused(deep_bn):
    from compactnn.lowering.probes import explained
    from compactnn.lowering.verify import _above

    q, x = deep_bn
    moved = _run_with_rounding(q, x, 2, 3)  # a deployment summing in another order
    result = explained(compare(q, lambda _: moved, x, "deploy[test]"), q, x)
    assert result.max_diff_steps > result.tolerance and not result.passed
    assert result.within_rounding and result.sensitivity_probe == "float rounding"
    assert result.max_diff_steps <= result.rounding_steps == result.sensitivity
    assert result.input_scale_steps == 0.0
    record = result.to_dict()
    assert record["within_rounding"] and record["rounding_steps"] == result.rounding_steps
    text = str(result)
    assert f"the simulated model itself moves {result.rounding_steps:.3g} steps under float" in text
    assert "within the simulation's own rounding variation" in text
    t = _above(result.max_diff_steps)
    with pytest.raises(CompactnnError, match="amplifies one-code rounding") as err:
        enforce(result)
    assert f"tolerance={t:g} (--tolerance {t:g} on the command line)" in str(err.value)
    assert "report the model" not in str(err.value)
    assert compare(q, lambda _: moved, x, "deploy[test]", tolerance=t).passed  # it works


def test_a_wrong_scale_in_one_layer_is_still_refused_as_a_kernel_error(deep_bn):
    import copy

    from compactnn.lowering.probes import explained

    q, x = deep_bn
    wrong = copy.deepcopy(q)
    _quantizers(wrong)[2].scale.mul_(1.5)  # the third layer's input grid 50% off
    result = explained(compare(q, wrong, x, "deploy[test]"), q, x)
    assert not result.passed and not result.within_rounding
    assert result.max_diff_steps > result.rounding_steps  # beyond rounding's reach
    with pytest.raises(CompactnnError, match="does not reproduce the simulated one"):
        enforce(result)


def test_agreement_below_the_simulations_own_is_refused_as_a_kernel_error():
    from dataclasses import replace

    from compactnn.lowering.probes import rounding_explains
    from compactnn.lowering.verify import Verification

    base = Verification("deploy[x]", 10.0, 1.0, 0.1, 0.75, 2.0, 32, rounding_steps=20.0)
    base = replace(base, sensitivity=20.0, sensitivity_probe="float rounding")
    # the simulation agrees with itself on 28/32 under rounding: one sample less is kept
    ok = replace(base, rounding_agreement=0.78125, top1_agreement=0.75)
    assert rounding_explains(ok)
    low = replace(base, rounding_agreement=0.875, top1_agreement=0.8125)  # two samples less
    assert not rounding_explains(low)
    with pytest.raises(CompactnnError, match="more than rounding changes its predictions"):
        enforce(low)
    assert not rounding_explains(replace(ok, max_diff_steps=20.5))  # beyond the probe
