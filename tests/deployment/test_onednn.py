"""The oneDNN int8 modules against a float reference, and the execution plan against the
fx graph it is compiled from (bit-identical outputs, every structure of the small nets)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import compactnn
from compactnn.deployment import quantize_residuals
from compactnn.deployment.onednn import PACKED_SHAPES, Int8Conv2d, quantize_u8
from compactnn.deployment.runner import PlanRunner, plan_runner
from compactnn.errors import CompactnnError


def _deployed(qmodel: nn.Module, example: torch.Tensor):
    return compactnn.deploy(qmodel, "onednn", example=example)


def test_quantize_u8_is_the_simulation_formula():
    x = torch.tensor([-1.0, 0.0, 0.05, 0.15, 0.25, 3.0, 100.0])
    q = quantize_u8(x, (0.1, 3))
    # round half to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2; clamped to [0, 255]
    assert q.tolist() == [0, 3, 3, 5, 5, 33, 255]
    assert q.dtype == torch.uint8


def test_int8_conv_matches_a_float_computation_on_its_codes():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()).eval()
    calib = torch.randn(8, 3, 10, 10)
    dep = _deployed(compactnn.compress(net, "w8a8", calib_data=calib, progress=False), calib)
    conv = next(m for m in dep.program.modules() if isinstance(m, Int8Conv2d))
    assert conv.out is None and conv.unary == "relu"  # the model's float output, ReLU fused
    sx, zx = conv.x_qp

    def reference(q: torch.Tensor) -> torch.Tensor:  # integer codes in float64, scaled once
        acc = nn.functional.conv2d(q.double() - zx, conv.w_int8.double(), padding=1)
        scale = sx * conv.w_scale.double()[:, None, None]
        return torch.relu(acc * scale + conv.bias.double()[:, None, None])

    # the first shape, then more than PACKED_SHAPES others: each gets its own packed weights
    for shape in [(4, 3, 10, 10)] + [(1, 3, h, h) for h in range(6, 8 + PACKED_SHAPES)]:
        q = quantize_u8(torch.randn(shape), conv.x_qp)
        with torch.no_grad():
            got = conv(q)
        ref = reference(q)
        assert got.shape == ref.shape
        assert (got.double() - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert len(conv._packed_for) <= PACKED_SHAPES  # only the most recent shapes are kept


@pytest.mark.parametrize("residuals", [False, True])
def test_plan_runner_is_bit_identical_to_the_graph(qnet, residuals):
    qmodel, calib = qnet
    sim = quantize_residuals(qmodel, calib) if residuals else qmodel
    dep = _deployed(sim, calib[:8])
    runner = plan_runner(dep.program)
    assert isinstance(runner, PlanRunner) and "def run(" in runner.source
    if residuals:  # the in-place residual sum of oneDNN is in the plan
        assert any(getattr(m, "accum", None) for m in dep.program.modules())
    with torch.no_grad():
        for x in (calib[:8], calib[8:9], calib[:3]):  # batch sizes re-pack the weights
            ref = dep.program(x)
            assert torch.equal(runner(x), ref)
            assert torch.equal(runner(x), ref)  # the in-place sum left no state behind
        # and it reproduces the simulation like the graph does
        step = (sim(calib[:8]) - runner(calib[:8])).abs().max()
        assert step <= (sim(calib[:8]) - dep.program(calib[:8])).abs().max() + 1e-6


def test_plan_runner_takes_the_graphs_inputs_by_name(qnet):
    qmodel, calib = qnet
    dep = _deployed(qmodel, calib[:8])
    runner = plan_runner(dep.program)  # the graph's input is forward's x
    with torch.no_grad():
        assert torch.equal(runner(x=calib[:4]), dep.program(x=calib[:4]))
    with pytest.raises(CompactnnError, match=r"lowered graph\(x\).*unexpected keyword.*'y'"):
        runner(calib[:4], y=calib[:4])


def test_plan_runner_refuses_what_is_not_a_lowered_graph():
    with pytest.raises(CompactnnError, match=r"fx\.GraphModule"):
        plan_runner(nn.Linear(2, 2))


def test_copy_and_pickle_of_a_deployed_model_name_compactnn_save(qnet, tmp_path):
    import copy
    import pickle

    qmodel, calib = qnet
    deployed = _deployed(qmodel, calib[:4])
    for op in (copy.deepcopy, pickle.dumps, lambda m: torch.save(m, tmp_path / "d.pt")):
        with pytest.raises(CompactnnError, match=r"compactnn\.save\(deployed, path\)"):
            op(deployed)
    compactnn.save(deployed, tmp_path / "a")  # the fix it names
    again = compactnn.load(tmp_path / "a", model=type(qmodel)())
    assert torch.equal(again(calib[:4]), deployed(calib[:4]))
