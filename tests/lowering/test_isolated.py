"""Each lowered kernel checked alone on the simulation's own inputs
(:mod:`compactnn.lowering.isolated`, :func:`compactnn.deployment.localize.isolate`): an
amplifying network whose kernels are all right is deployed; a wrong kernel is refused by name
even where its output gap hides in the network's own rounding variation."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import compactnn
from compactnn.errors import CompactnnError
from compactnn.lowering.isolated import RUNNER, KernelCheck, kernel_check, with_kernels
from compactnn.lowering.verify import DEFAULT_TOLERANCE, Verification
from tests.lowering._amplifying import deep_bn_net


def test_kernel_check_tells_rounding_ties_from_scale_and_zero_point_errors():
    gen = torch.Generator().manual_seed(0)
    ref = torch.rand(4, 8, 6, 6, generator=gen) * 2.0  # codes 0..200 on a 0.01 grid
    grid = (0.01, 0)
    codes = (ref / 0.01).round()
    exact = codes.to(torch.uint8)
    tie = exact.clone().flatten()
    tie[7] += 1  # one float-rounding tie, as a correct kernel gives (1 of 1152 positions)
    ok = kernel_check("conv", ref, tie.view_as(exact), grid)
    assert ok.passed and ok.max_steps == 1.0 and ok.off_fraction == pytest.approx(1 / 1152)
    zero = kernel_check("conv", ref, (codes + 1).to(torch.uint8), grid)  # zero point + 1
    assert not zero.passed and zero.max_steps == 1.0 and zero.mean_steps == pytest.approx(1.0)
    scale = kernel_check("conv", ref, (ref / 0.0102).round().to(torch.uint8), grid)  # x 1/1.02
    assert not scale.passed and scale.max_steps >= 3.0
    swapped = exact.clone()
    swapped[:, [0, 1]] = exact[:, [1, 0]]
    assert not kernel_check("conv", ref, swapped, grid).passed
    # a float output: steps of the reference's range / 255
    logits = torch.randn(16, 10, generator=gen)
    step = float(logits.max() - logits.min()) / 255
    assert kernel_check("fc", logits, logits + 1e-6, None).passed
    wrong = kernel_check("fc", logits, logits * 1.02, None)
    want = float((logits * 0.02).abs().max()) / step
    assert not wrong.passed and wrong.max_steps == pytest.approx(want, rel=1e-4)


def test_a_gap_beyond_twice_the_rounding_probe_is_not_accepted_on_its_kernels():
    base = Verification("deploy[onednn]", 10.0, 1.0, 0.1, 1.0, 2.0, 16, rounding_steps=5.0)
    fine = [KernelCheck("a", "uint8", 1.0, 0.0, 0.0, 0), KernelCheck("b", "float", 0.0, 0.0, 0)]
    assert with_kernels(base, fine).passed  # 10 <= 2 x 5
    far = with_kernels(Verification(**{**base.to_dict(), "max_diff_steps": 10.5}), fine)
    assert not far.passed and not far.isolated and far.kernels_checked == 2
    assert not with_kernels(base, None).passed  # kernels that cannot run alone: refused
    assert not with_kernels(base, [KernelCheck(RUNNER, "float", 0.0, 0.0, 0.0)]).passed
    assert not with_kernels(Verification(**{**base.to_dict(), "rounding_steps": None}), fine).passed


@pytest.fixture(scope="module")
def deep_bn():
    return deep_bn_net()


def test_an_amplifying_network_with_exact_kernels_is_deployed(deep_bn):
    q, x = deep_bn
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        deployed = compactnn.deploy(q, "onednn", example=x)
    v = deployed.verification
    # measured: 10.3 steps off at the output, the simulation moves 7.1 under float rounding
    assert v.max_diff_steps > DEFAULT_TOLERANCE and v.tolerance == DEFAULT_TOLERANCE
    assert v.passed and v.isolated and v.kernels_checked == 30 and not v.kernel_failure
    assert v.max_diff_steps <= 2 * v.rounding_steps
    accepted = "accepted: every kernel matches the simulation on its own inputs"
    assert accepted in str(v) and any(accepted in str(w.message) for w in caught)
    assert v.to_dict()["isolated"] is True
    # the runner's fused calls are checked against the graph's separate kernels
    from compactnn.deployment.localize import isolate

    real = deployed._fast
    deployed.__dict__["_fast"] = lambda *args: real(*args) * 1.02
    checks = isolate(deployed, x)
    assert [c.name for c in checks if not c.passed] == [RUNNER] and checks[-1].max_steps > 1
    v = deployed.verify(x)
    assert not v.passed and v.kernel_failure == RUNNER and v.kernels_checked == 30


def _lower_with(layer: str, change):
    """``lower`` that applies ``change`` to the lowered kernel of ``layer`` (a lowering bug)."""
    from compactnn.deployment import api as deploy_api

    real = deploy_api.lower

    def lower(plan):
        gm = real(plan)
        [kernel] = [m for n, m in gm.named_children() if n.endswith(f"_{layer}")]
        change(kernel)
        kernel._packed_for.clear()
        kernel.packed = kernel._prepack(None)
        return gm

    return lower


@pytest.mark.parametrize(
    "layer, change, what",
    [
        # the last convolution's float output 2% too large: 8.1 steps at the output, within
        # twice the simulation's 7.1 under float rounding (an output-only rule passes it)
        ("84", lambda k: setattr(k, "w_scale_t", k.w_scale_t * 1.02), "mean +0.2"),
        # a middle convolution writes its codes one zero point up: 9.3 steps at the output
        ("45", lambda k: setattr(k, "out", (k.out[0], k.out[1] + 1)), "mean +1,"),
    ],
    ids=["scale", "zero-point"],
)
def test_an_injected_kernel_error_is_refused_with_the_layer_named(
    deep_bn, monkeypatch, layer, change, what
):
    from compactnn.deployment import api as deploy_api

    q, x = deep_bn
    monkeypatch.setattr(deploy_api, "lower", _lower_with(layer, change))
    with pytest.raises(CompactnnError) as err:
        compactnn.deploy(q, "onednn", example=x)
    message = str(err.value)
    assert f"Layer '{layer}' does not reproduce its simulated layer even on the" in message
    assert f"30 kernels run alone on the simulation's inputs: first to fail {layer} " in message
    assert what in message and "accepted" not in message
    gap = float(re.search(r"max difference ([\d.]+) steps", message)[1])
    rounding = float(re.search(r"itself moves ([\d.]+) steps under float rounding", message)[1])
    assert gap <= 2 * rounding  # the output gap alone hides in the network's own variation


def test_healthy_small_nets_pass_alone_and_fast_residual_sums_are_not_checked():
    from compactnn.deployment import api as deploy_api
    from compactnn.deployment import quantize_residuals
    from compactnn.deployment.localize import isolate
    from tests.deployment.conftest import make_net

    calib = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    q = compactnn.compress(make_net(), "w8a8", calib_data=calib, progress=False).eval()

    def alone(model, residual):
        deployed = deploy_api._build("onednn", model, calib[:8], residual, "float")
        deployed.__dict__["source"] = model
        return isolate(deployed, calib[:8])

    checks = alone(q, "exact")  # 6 kernels (a residual sum among them) and the runner
    assert len(checks) == 7 and all(c.passed and c.max_steps < 1e-3 for c in checks)
    assert all(c.passed for c in alone(quantize_residuals(q), "fast"))  # codes on both sides
    # "fast" adds an operand's codes where the simulation adds its float value (measured:
    # 12% of pw.0's codes one off): no simulated layer to compare with, so not accepted
    assert alone(q, "fast") is None
