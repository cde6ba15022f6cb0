"""deploy on networks that amplify one-code rounding flips: the refusal names the network's own
rounding variation (the float-rounding probe), not the kernels, and suggests a tolerance that
works; a network that does not amplify verifies as before."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

import compactnn
from compactnn.lowering.verify import DEFAULT_TOLERANCE
from tests.lowering._amplifying import deep_bn_net


def test_mnist_cnn_w8a8_still_verifies_at_the_default_tolerance():
    from compactnn.models import load_reference

    torch.manual_seed(0)
    ref = load_reference("mnist-cnn")
    q = compactnn.compress(ref.model.eval(), "w8a8", calib_data=ref.calib, progress=False)
    deployed = compactnn.deploy(q, "onednn", example=ref.example)
    v = deployed.verification
    assert v.passed and v.max_diff_steps <= DEFAULT_TOLERANCE  # measured: 0.0 steps
    assert v.sensitivity is None and v.rounding_steps is None and not v.within_rounding
    # it does not amplify (measured: 0.14 steps under float rounding), so a kernel error
    # past the tolerance can never pass for the network's own variation
    from compactnn.lowering.probes import probes

    assert probes(deployed.source, ref.example)["float rounding"][0] < 1.0


def test_amplifying_network_is_accepted_kernel_by_kernel_and_the_diagnosis_still_reads():
    """10.3 steps off at the output (the simulation moves 7.1 under float rounding) while every
    kernel matches the simulation on its own inputs: accepted with a warning; without the
    kernel check the refusal explains the amplification and names a tolerance that works."""
    from compactnn.deployment import api as deploy_api

    q, x = deep_bn_net()
    with pytest.warns(UserWarning, match="accepted: every kernel matches"):
        deployed = compactnn.deploy(q, "onednn", example=x)
    v = deployed.verification
    assert v.passed and v.isolated and v.max_diff_steps > DEFAULT_TOLERANCE
    message = deploy_api._verification_refusal(
        dataclasses.replace(v, isolated=False, kernels_checked=None)
    )
    assert "amplifies one-code rounding differences" in message
    assert "steps under float rounding" in message and "report the model" not in message
    assert "0 steps when its input is scaled by 1 + 1e-06" in message  # the old probe: blind
    tolerance = float(re.search(r"tolerance=([\d.]+) \(--tolerance", message)[1])
    assert tolerance >= v.max_diff_steps
