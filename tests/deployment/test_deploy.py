import copy
import sys
import warnings

import pytest
import torch
from torch import nn

import compactnn
from compactnn.core.qlayers import QuantConv2d, QuantLinear
from compactnn.data import load_digits8
from compactnn.deployment import api as deploy_api
from compactnn.deployment.onednn import Int8Conv2d, Int8Linear
from compactnn.errors import CompactnnError
from tests.deployment.conftest import make_net


def steps(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Independent re-computation of the difference in steps of the output scale."""
    step = (ref.max() - ref.min()).item() / 255
    return (ref - out).abs().max().item() / step


@pytest.mark.parametrize(
    ("backend", "residual"), [("onednn", "exact"), ("onednn", "fast"), ("onnxruntime", "exact")]
)
def test_matches_simulation_within_one_step_on_fresh_inputs(qnet, backend, residual):
    qmodel, calib = qnet
    deployed = compactnn.deploy(qmodel, backend, example=calib[:8], residual=residual)
    assert deployed.backend == backend and deployed.verification.max_diff_steps <= 1.0
    x = torch.randn(16, 3, 16, 16) * 1.5  # not the example: a check the deploy did not see
    with torch.no_grad():
        ref, out = qmodel(x), deployed(x)
    assert steps(ref, out) <= 1.0
    assert (ref.argmax(1) == out.argmax(1)).float().mean() >= 0.9


def test_real_digit_images():
    split = load_digits8()
    x = torch.nn.functional.interpolate(split.x_train[:64].float(), size=16)
    qmodel = compactnn.compress(make_net(in_ch=1), "w8a8", calib_data=x, progress=False)
    deployed = compactnn.deploy(qmodel, example=x[:16])  # auto: times both backends
    assert set(deployed.selection) == {"onednn", "onnxruntime"}
    assert deployed.backend == min(deployed.selection, key=deployed.selection.get)
    test = torch.nn.functional.interpolate(split.x_test[:64].float(), size=16)
    with torch.no_grad():
        assert steps(qmodel(test), deployed(test)) <= 1.0


def test_every_layer_runs_on_int8_kernels_with_the_same_codes(qnet):
    qmodel, calib = qnet
    deployed = compactnn.deploy(qmodel, "onednn", example=calib[:4])
    int8 = [m for m in deployed.program.modules() if isinstance(m, (Int8Conv2d, Int8Linear))]
    qlayers = [m for m in qmodel.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    assert len(int8) == len(qlayers) == 6 and not deployed.kept_float
    codes = sorted(tuple(q.weight_codes.flatten().tolist()) for q in qlayers)
    assert codes == sorted(tuple(m.w_int8.flatten().tolist()) for m in int8)
    # the residual add and its ReLU are fused into the pointwise conv's kernel
    assert sum(getattr(m, "accum", None) is not None for m in int8) == 1
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.program.modules())


def test_int8_conv_against_hand_formula():
    torch.manual_seed(0)
    qmodel = compactnn.compress(
        nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2)),
        "w8a8", calib_data=torch.randn(8, 4, 9, 9), progress=False,
    )  # fmt: skip
    layer = qmodel[0]
    scale, zero = float(layer.input_quantizer.scale), int(layer.input_quantizer.zero)
    x = torch.randn(2, 4, 9, 9)
    q = torch.clamp(torch.round(x / scale) + zero, 0, 255)
    w = layer.weight_codes.float() * layer.weight_scale.reshape(-1, 1, 1, 1)
    ref = nn.functional.conv2d((q - zero) * scale, w, layer.bias, stride=2, padding=1, groups=2)
    out = Int8Conv2d(layer, None)(q.to(torch.uint8).contiguous(memory_format=torch.channels_last))
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


class WithConv1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.seq = nn.Conv1d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.conv(x)).flatten(2)  # (N, 8, H*W)
        return self.fc(self.seq(x).mean(-1))


def test_unsupported_layer_kept_in_float_with_a_warning_or_refused():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 6, 6)
    qmodel = compactnn.compress(WithConv1d(), "w8a8", calib_data=x, progress=False)
    with pytest.warns(UserWarning, match=r"kept in float.*seq \(QuantConv1d"):
        deployed = compactnn.deploy(qmodel, "onednn", example=x)
    assert list(deployed.kept_float) == ["seq"]
    with torch.no_grad():
        assert steps(qmodel(x), deployed(x)) <= 1.0
    with pytest.raises(CompactnnError, match=r"ignore=\['seq'\]"):
        compactnn.deploy(qmodel, "onednn", example=x, unsupported="error")


def test_bad_inputs_fail_loudly(qnet):
    qmodel, calib = qnet
    with pytest.raises(CompactnnError, match="example="):
        compactnn.deploy(qmodel)
    with pytest.raises(CompactnnError, match="backend"):
        compactnn.deploy(qmodel, backend="tpu", example=calib[:2])
    with pytest.raises(CompactnnError, match="no quantized layers"):
        compactnn.deploy(make_net(), example=calib[:2])
    weight_only = compactnn.compress(make_net(), "w8", progress=False)
    with warnings.catch_warnings(), pytest.raises(CompactnnError, match="w8a8"):
        warnings.simplefilter("ignore")
        compactnn.deploy(weight_only, example=calib[:2])
    with pytest.raises(CompactnnError, match="FAILED"):
        compactnn.deploy(qmodel, example=calib[:4], tolerance=-1.0)


def test_weights_packed_per_input_shape_give_the_same_results():
    from compactnn.deployment.onednn import PACKED_SHAPES

    torch.manual_seed(0)
    qmodel = compactnn.compress(
        nn.Sequential(nn.Conv2d(16, 32, 3, padding=1)), "w8a8",
        calib_data=torch.randn(8, 16, 10, 10), progress=False,
    )  # fmt: skip
    conv = Int8Conv2d(qmodel[0], None)
    q = torch.randint(0, 256, (8, 16, 10, 10), dtype=torch.uint8)
    q = q.contiguous(memory_format=torch.channels_last)
    whole = conv(q)
    for n in (1, 3, 5, 2, 8):  # more shapes than are kept: the oldest layouts are dropped
        assert torch.equal(conv(q[:n].contiguous(memory_format=torch.channels_last)), whole[:n])
    assert len(conv._packed_for) == PACKED_SHAPES


def test_example_is_keyword_only(qnet):
    qmodel, calib = qnet
    with pytest.raises(TypeError):
        compactnn.deploy(qmodel, "onednn", calib[:4])


def test_missing_onnxruntime_names_the_extra(qnet, monkeypatch):
    qmodel, calib = qnet
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(CompactnnError, match=r"pip install 'compactnn\[onnx\]'"):
        compactnn.deploy(qmodel, "onnxruntime", example=calib[:4])
    with pytest.warns(UserWarning, match=r"skipped backends: onnxruntime .*compactnn\[onnx\]"):
        deployed = compactnn.deploy(qmodel, example=calib[:4])  # auto: oneDNN only
    assert deployed.backend == "onednn" and deployed.selection == {}


class _Off(nn.Module):
    """A wrong 'integer' program: the simulation's output shifted by 100 output steps."""

    def __init__(self, sim: nn.Module) -> None:
        super().__init__()
        self.sim = sim

    def forward(self, x):
        return self.sim(x) + 100.0


def test_auto_keeps_the_backend_that_passes_verification(monkeypatch, qnet):
    qmodel, calib = qnet
    real_build = deploy_api._build

    def build(backend, sim, *args):
        if backend == "onnxruntime":  # make this candidate diverge
            return deploy_api.DeployedModel(_Off(copy.deepcopy(sim)), "onnxruntime", {})
        return real_build(backend, sim, *args)

    monkeypatch.setattr(deploy_api, "_build", build)
    with pytest.warns(UserWarning, match=r"failed verification: onnxruntime"):
        fast = compactnn.deploy(qmodel, example=calib[:8])
    assert fast.backend == "onednn" and fast.verification.passed
    assert fast.selection == {}  # only one candidate passed: nothing to time


def test_auto_raises_when_every_backend_diverges(monkeypatch, qnet):
    qmodel, calib = qnet
    monkeypatch.setattr(
        deploy_api,
        "_build",
        lambda backend, sim, *a: deploy_api.DeployedModel(_Off(copy.deepcopy(sim)), backend, {}),
    )
    with pytest.raises(CompactnnError, match="steps"):
        compactnn.deploy(qmodel, example=calib[:8])


def test_a_deployed_model_cannot_be_saved(qnet, tmp_path):
    qmodel, calib = qnet
    fast = compactnn.deploy(qmodel, "onednn", example=calib[:8])
    with pytest.raises(CompactnnError, match="deployed model holds compiled"):
        compactnn.save(fast, tmp_path / "d")
    assert not (tmp_path / "d").exists()
