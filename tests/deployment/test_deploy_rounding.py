"""deploy on networks that amplify one-code rounding flips: the refusal names the network's own
rounding variation (the float-rounding probe), not the kernels, and suggests a tolerance that
works; a network that does not amplify verifies as before."""

from __future__ import annotations

import re

import torch

import compactnn
from compactnn.errors import CompactnnError
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


def test_amplifying_network_is_refused_with_its_diagnosis_and_a_working_tolerance():
    q, x = deep_bn_net()
    try:  # measured here: 10.3 steps off (the simulation moves 7.1 under float rounding)
        compactnn.deploy(q, "onednn", example=x)
        return  # kernels whose float rounding matches the simulation's: nothing to diagnose
    except CompactnnError as e:
        message = str(e)
    assert "amplifies one-code rounding differences" in message
    assert "steps under float rounding" in message and "report the model" not in message
    assert "0 steps when its input is scaled by 1 + 1e-06" in message  # the old probe: blind
    tolerance = float(re.search(r"tolerance=([\d.]+) \(--tolerance", message)[1])
    deployed = compactnn.deploy(q, "onednn", example=x, tolerance=tolerance)
    assert deployed.verification.passed and deployed.verification.tolerance == tolerance
